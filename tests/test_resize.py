"""The C entry point to torch's antialiased bilinear resize and flip (csrc/cpu/resize_u8.cpp,
fasttrain.data.resize) against its twin, torchvision's resize and horizontal_flip as the torch
backend calls them."""
import threading

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from fasttrain.data import resize
from fasttrain.data.transforms import horizontal_flip, resize_square


def _image(height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g)


def _reference(hwc: torch.Tensor, height: int, width: int, flip: bool = False) -> torch.Tensor:
    chw = TF.resize(hwc.permute(2, 0, 1).contiguous(), [height, width], antialias=True)
    return (TF.horizontal_flip(chw) if flip else chw).permute(1, 2, 0)


def test_the_function_is_built():
    # tools/env.sh builds fasttrain/ops/_C: a library without the function is a stale build.
    assert resize.AVAILABLE, resize.LOAD_ERROR


@pytest.mark.parametrize("size, out", [
    ((280, 300), (224, 224)),  # a typical crop, downscaled (antialiasing filter > 1 pixel)
    ((100, 90), (224, 224)),  # upscaled: plain bilinear
    ((500, 375), (176, 150)),  # non-square output
    ((224, 224), (224, 224)),  # nothing to resize: a copy
    ((7, 3), (32, 5)),  # tiny, mixed up/down
    ((1, 1), (4, 4)),
    ((640, 33), (3, 2)),  # extreme downscale
])
@pytest.mark.parametrize("flip", [False, True])
def test_pixels_equal_torchvision_resize(size, out, flip):
    image = _image(*size, seed=size[0])
    assert torch.equal(resize.resize_rgb(image, *out, flip=flip), _reference(image, *out, flip))


def test_a_window_of_a_larger_image_is_resized_in_place():
    big = _image(300, 400, seed=1)
    window = big[17:17 + 250, 33:33 + 290]  # rows 1,200 bytes apart, not packed
    assert not window.is_contiguous()
    expected = _reference(window, 224, 224)
    assert torch.equal(resize.resize_rgb(window, 224, 224), expected)
    # the torch backend's call, which sees a packed crop
    assert torch.equal(resize_square(window.contiguous().permute(2, 0, 1), 224),
                       expected.permute(2, 0, 1))
    flipped = horizontal_flip(resize_square(window.contiguous().permute(2, 0, 1), 224))
    assert torch.equal(resize.resize_rgb(window, 224, 224, flip=True), flipped.permute(1, 2, 0))
    # same size: the window mirrored, nothing resampled
    assert torch.equal(resize.resize_rgb(window, 250, 290, flip=True), window.flip(1))


def test_results_are_written_into_out():
    image = _image(120, 90, seed=3)
    batch = torch.full((3, 64, 48, 3), 7, dtype=torch.uint8)
    row = batch[1]
    assert resize.resize_rgb(image, 64, 48, flip=True, out=row) is row
    assert torch.equal(batch[1], _reference(image, 64, 48, flip=True))
    assert (batch[0] == 7).all() and (batch[2] == 7).all()  # its neighbours untouched
    with pytest.raises(ValueError, match=r"out must be a contiguous \(64, 48, 3\)"):
        resize.resize_rgb(image, 64, 48, out=batch[1].permute(1, 0, 2))
    with pytest.raises(ValueError, match=r"\(64, 48, 3\).*\(64, 47, 3\)"):
        resize.resize_rgb(image, 64, 48, out=batch[1, :, :47])


def test_resize_into_fills_a_batch_from_addresses():
    big = _image(300, 400, seed=5)
    images = [_image(200, 150, seed=6), big[10:10 + 120, 20:20 + 333], _image(32, 32, seed=7)]
    flips = [True, False, True]
    sources = [(im.data_ptr(), im.shape[0], im.shape[1], im.stride(0)) for im in images]
    batch = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)
    assert resize.resize_into(batch, sources, flips) is batch
    for i, (image, flip) in enumerate(zip(images, flips)):
        assert torch.equal(batch[i], _reference(image, 32, 32, flip)), i
    assert (batch[3] == 0).all()
    with pytest.raises(ValueError, match="3 sources but 2 flips"):
        resize.resize_into(batch, sources, flips[:2])
    with pytest.raises(ValueError, match=r"N >= 3"):
        resize.resize_into(batch[:2], sources, flips)
    with pytest.raises(RuntimeError, match=r"source 1 \(120x333, row stride 900\)"):
        resize.resize_into(batch, [sources[0], (sources[1][0], 120, 333, 900)], flips[:2])


def test_threads_resize_concurrently():
    """FFCV's threads call the function at once (ctypes drops the GIL): each result is the
    serial one."""
    images = [_image(200 + 7 * i, 260 - 5 * i, seed=i) for i in range(8)]
    expected = [_reference(im, 96, 112) for im in images]
    results: dict[int, list[torch.Tensor]] = {}

    def work(k: int) -> None:
        results[k] = [resize.resize_rgb(im, 96, 112) for im in images * 5]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        assert all(torch.equal(r, expected[i % 8]) for i, r in enumerate(results[k]))


@pytest.mark.parametrize("image, message", [
    (torch.zeros(4, 4, 3, dtype=torch.float32), "uint8"),
    (torch.zeros(4, 4, 4, dtype=torch.uint8), r"\(4, 4, 4\)"),
    (torch.zeros(3, 4, 4, dtype=torch.uint8).permute(1, 2, 0), "strides"),  # planar memory
    (torch.zeros(0, 4, 3, dtype=torch.uint8), r"\(0, 4, 3\)"),
])
def test_bad_images_are_refused(image, message):
    with pytest.raises(ValueError, match=message):
        resize.resize_rgb(image, 8, 8)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="0x8"):
        resize.resize_rgb(_image(4, 4, 0), 0, 8)


def test_the_c_function_refuses_bad_arguments_without_raising():
    fn = resize.numba_resizer()
    image = _image(4, 4, 0)
    out = torch.empty(8, 8, 3, dtype=torch.uint8)
    assert fn(image.data_ptr(), 4, 4, 12, out.data_ptr(), 8, 8, 0) == 0
    assert fn(image.data_ptr(), 4, 4, 12, out.data_ptr(), 8, 8, 1) == 0
    assert fn(0, 4, 4, 12, out.data_ptr(), 8, 8, 0) == -1  # null source
    assert fn(image.data_ptr(), 4, 4, 11, out.data_ptr(), 8, 8, 0) == -1  # rows overlap
    assert fn(image.data_ptr(), 4, 4, 12, out.data_ptr(), 0, 8, 1) == -1


class _Available(torch.utils.data.Dataset):
    """One sample: `resize.AVAILABLE` as the worker process that loads it sees it."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> bool:
        return resize.AVAILABLE


def test_switching_the_function_off_reaches_forkserver_workers(monkeypatch):
    """The benchmarks' torch's-ops arms switched the function off in their own process only:
    spawned and forkserver workers (macOS, Linux from Python 3.14) re-imported this module, saw
    True and timed the C function under the other arm's name. (spawn: in test_bench_scripts;
    an environment variable would not reach a forkserver started before it was set.)"""
    monkeypatch.setattr(resize, "AVAILABLE", False)
    loader = torch.utils.data.DataLoader(_Available(), batch_size=None, num_workers=1,
                                         multiprocessing_context="forkserver")
    resize.pin_in_workers(loader)
    assert list(loader) == [False]
