"""Region JPEG decoding (csrc/jpeg, fasttrain.data.jpeg) against torchvision's whole-image decode,
and its use by the torch backend's RandomResizedCrop."""
import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain.config import load
from fasttrain.data import build_loaders, jpeg
from fasttrain.data.datasets import read_image_box
from fasttrain.data.transforms import random_resized_crop_params


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 with detail at every scale (smooth gradients + noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (height + width)], -1)
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, subsampling: int = 2, quality: int = 90, mode: str = "RGB"
           ) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(buf, "JPEG", quality=quality, **({"subsampling": subsampling}
                                                 if mode != "L" else {}))
    return buf.getvalue()


def test_the_decoder_is_built():
    # CI installs libjpeg-turbo's headers (tools/env.sh): a build without the decoder is a bug.
    assert jpeg.AVAILABLE, jpeg.LOAD_ERROR
    assert jpeg.lib_version().count(".") == 2


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
@pytest.mark.parametrize("size", [(1, 1), (8, 8), (37, 53), (301, 207)])
def test_whole_box_equals_torchvision(subsampling, size):
    raw = encode(photo(*size), subsampling)
    info = jpeg.jpeg_info(raw)
    assert (info.height, info.width, info.rgb) == (*size, True)
    box = (0, 0, *size)
    assert torch.equal(jpeg.decode_region(raw, box), jpeg.decode_region_reference(raw, box))


@pytest.mark.parametrize("subsampling", [0, 2])
def test_random_boxes_equal_torchvision_inside_the_band_edges(subsampling):
    """Rows are exact; columns too except where the box's edge is the decoded band's edge
    (libjpeg upsamples chroma there as at an image edge)."""
    raw = encode(photo(375, 500, seed=1), subsampling)
    rng = random.Random(0)
    for _ in range(40):
        box = random_resized_crop_params(375, 500, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        got, ref = jpeg.decode_region(raw, box), jpeg.decode_region_reference(raw, box)
        assert got.shape == ref.shape == (3, box[2], box[3])
        diff = (got.int() - ref.int()).abs()
        assert diff[:, :, 1:-1].max() == 0
        assert diff.float().mean() < 0.5


def test_grayscale_decodes_to_rgb():
    raw = encode(photo(40, 30), mode="L")
    box = (3, 4, 30, 20)
    got = jpeg.decode_region(raw, box)
    assert got.shape == (3, 30, 20) and torch.equal(got[0], got[2])
    assert torch.equal(got, jpeg.decode_region_reference(raw, box))


@pytest.mark.parametrize("min_size,scale", [((100, 100), 2), ((50, 50), 4), ((40, 30), 8),
                                            ((300, 300), 1)])
def test_dct_downscaling_keeps_the_minimum_size_and_the_content(min_size, scale):
    raw = encode(photo(375, 500, seed=2))
    box = (10, 20, 340, 460)
    assert jpeg.dct_scale(340, 460, *min_size) == scale
    got = jpeg.decode_region(raw, box, min_size)
    t, l, h, w = jpeg.scaled_box(box, scale, 375, 500)
    assert got.shape == (3, h, w) and h >= min_size[0] and w >= min_size[1]
    assert abs(h - 340 / scale) <= 2 and abs(w - 460 / scale) <= 2
    # The same content as an antialiased resize of the full-size box (blur + noise aside).
    ref = torch.nn.functional.interpolate(jpeg.decode_region_reference(raw, box)[None].float(),
                                          size=(h, w), mode="bilinear", antialias=True)[0]
    assert (got.float() - ref).abs().mean() < 8


def test_scaled_box_covers_the_box():
    assert jpeg.scaled_box((0, 0, 8, 8), 1, 8, 8) == (0, 0, 8, 8)
    assert jpeg.scaled_box((3, 5, 10, 7), 2, 101, 99) == (1, 2, 6, 4)  # rows 1..6, cols 2..5
    assert jpeg.scaled_box((0, 0, 101, 99), 8, 101, 99) == (0, 0, 13, 13)


def test_errors_are_value_errors_with_libjpeg_reason():
    raw = encode(photo(64, 64))
    with pytest.raises(ValueError, match="cannot decode"):
        jpeg.jpeg_info(b"\xff\xd8\xff" + b"\x00" * 100)
    with pytest.raises(ValueError, match="outside the 64x64 image"):
        jpeg.decode_region(raw, (10, 10, 60, 10))
    corrupt = raw[:200] + bytes(len(raw) - 202) + raw[-2:]
    try:  # libjpeg may decode zeroed entropy data with warnings only; it must not crash
        out = jpeg.decode_region(corrupt, (0, 0, 64, 64))
        assert out.shape == (3, 64, 64)
    except ValueError as e:
        assert "cannot decode" in str(e)
    cmyk = io.BytesIO()
    Image.new("CMYK", (16, 16), (10, 20, 30, 40)).save(cmyk, "JPEG")
    assert not jpeg.jpeg_info(cmyk.getvalue()).rgb
    with pytest.raises(ValueError, match="CMYK"):
        jpeg.decode_region(cmyk.getvalue(), (0, 0, 16, 16))


def with_junk_before_the_scan(raw: bytes, count: int = 16) -> bytes:
    """`raw` with `count` stray bytes before its start-of-scan marker: libjpeg decodes it with
    the warning "Corrupt JPEG data: 16 extraneous bytes before marker 0xda"."""
    sos = raw.index(b"\xff\xda")
    return raw[:sos] + bytes(count) + raw[sos:]


def test_decode_warning_names_damage_libjpeg_decodes_past():
    raw = encode(photo(48, 64))
    assert jpeg.decode_warning(raw) is None
    assert jpeg.decode_warning(encode(photo(48, 64), mode="CMYK")) is None  # any colour space
    assert jpeg.decode_warning(with_junk_before_the_scan(raw)) == (
        "Corrupt JPEG data: 16 extraneous bytes before marker 0xda")
    with pytest.raises(ValueError, match="^cannot decode: "):
        jpeg.decode_warning(b"\xff\xd8\xff" + bytes(40))


def test_a_library_built_from_older_sources_is_unavailable_not_a_traceback(monkeypatch):
    """A library without a function the bindings name (built before it was added) made every
    import of fasttrain.data an AttributeError traceback."""
    import types

    class OlderLibrary:
        def __init__(self, path):
            pass

        def __getattr__(self, name):
            if name == "ft_jpeg_check":
                raise AttributeError(f"undefined symbol: {name}")
            function = types.SimpleNamespace()
            setattr(self, name, function)
            return function

    for name in ("_lib", "AVAILABLE", "LOAD_ERROR"):  # restored after the test
        monkeypatch.setattr(jpeg, name, getattr(jpeg, name))
    monkeypatch.setattr(jpeg.ctypes, "CDLL", OlderLibrary)
    jpeg._lib, jpeg.AVAILABLE = None, False
    jpeg._load()
    assert not jpeg.AVAILABLE and jpeg._lib is None
    assert jpeg.LOAD_ERROR.endswith("is a build of older sources (undefined symbol: "
                                    "ft_jpeg_check); rebuild it (tools/env.sh does when csrc/ "
                                    "changes)")


def test_read_image_box_falls_back_for_png_and_cmyk(tmp_path):
    calls = []

    def choose(h, w):
        calls.append((h, w))
        return (1, 2, h - 3, w - 4)

    Image.fromarray(photo(30, 40)).save(tmp_path / "a.png")
    Image.new("CMYK", (40, 30), (0, 50, 0, 0)).save(tmp_path / "b.jpg")
    (tmp_path / "c.jpg").write_bytes(encode(photo(30, 40)))
    for name in ("a.png", "b.jpg", "c.jpg"):
        out = read_image_box(str(tmp_path / name), choose, (20, 20))
        assert out.shape == (3, 27, 36) and out.dtype == torch.uint8
    assert calls == [(30, 40)] * 3  # one draw per image, from the header's size
    whole = read_image_box(str(tmp_path / "c.jpg"), choose, None, region_decode=False)
    region = read_image_box(str(tmp_path / "c.jpg"), choose, None)
    assert (whole.int() - region.int()).abs()[:, :, 1:-1].max() == 0


def _folder(root: Path, n: int = 24) -> Path:
    for split in ("train", "val"):
        for i in range(n):
            folder = root / split / f"c{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.jpg").write_bytes(encode(photo(300 + i, 400 - i, seed=i)))
    return root


@pytest.mark.parametrize("train_res", [96, 32])  # 32: boxes often decoded at 1/2 .. 1/8
def test_torch_backend_region_decode_matches_whole_decode(tmp_path, train_res):
    """Same seed → the same boxes and flips with and without region decoding (the draws
    happen in the same order); pixels agree up to the band edges and, where DCT downscaling
    applies, the resampling difference."""
    root = _folder(tmp_path)
    batches = {}
    for region in (True, False):
        cfg = load(None, ["--data.dataset=imagefolder", f"--data.path={root}",
                          f"--data.region_decode={str(region).lower()}", "--data.batch_size=8",
                          f"--data.train_res={train_res}", "--data.num_workers=0"])
        loaders = build_loaders(cfg.data, cfg.aug, channels_last=False, dtype=torch.uint8)
        loaders.train.set_epoch(1)
        batches[region] = [(x.clone(), y.clone()) for x, y in loaders.train]
    for (xr, yr), (xw, yw) in zip(batches[True], batches[False]):
        assert torch.equal(yr, yw) and xr.shape == xw.shape == (8, 3, train_res, train_res)
        diff = (xr.float() - xw.float()).abs()
        assert diff.mean() < (2 if train_res == 96 else 8), diff.mean()


def test_the_box_is_decoded_into_its_own_buffer():
    """The decoder returns just the box, as a channels-last view of (h, w, 3) memory (guards
    against a silent fallback to whole-image decoding + slicing)."""
    raw = encode(photo(400, 400, seed=3))
    out = jpeg.decode_region(raw, (100, 100, 200, 200))
    assert out.shape == (3, 200, 200) and out.stride() == (1, 600, 3)
    assert out.untyped_storage().nbytes() == 200 * 200 * 3


def test_without_the_library_boxes_come_from_whole_decodes(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(encode(photo(30, 40)))
    box = (2, 3, 20, 30)
    region = read_image_box(str(tmp_path / "a.jpg"), lambda h, w: box, None)
    monkeypatch.setattr(jpeg, "AVAILABLE", False)
    whole = read_image_box(str(tmp_path / "a.jpg"), lambda h, w: box, None)
    assert torch.equal(whole, jpeg.decode_region_reference((tmp_path / "a.jpg").read_bytes(), box))
    assert (whole.int() - region.int()).abs()[:, :, 1:-1].max() == 0


def test_progressive_and_restart_marker_jpegs_match_torchvision():
    import cv2
    pixels = photo(301, 407, seed=4)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, progressive=True)
    ok, restart = cv2.imencode(".jpg", pixels[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90,
                                                           cv2.IMWRITE_JPEG_RST_INTERVAL, 3])
    assert ok
    rng = random.Random(1)
    for raw in (buf.getvalue(), restart.tobytes()):
        whole = (0, 0, 301, 407)
        assert torch.equal(jpeg.decode_region(raw, whole), jpeg.decode_region_reference(raw, whole))
        for _ in range(20):
            box = random_resized_crop_params(301, 407, (0.08, 1.0), (3 / 4, 4 / 3), rng)
            diff = (jpeg.decode_region(raw, box).int()
                    - jpeg.decode_region_reference(raw, box).int()).abs()
            assert diff[:, :, 1:-1].max() == 0
