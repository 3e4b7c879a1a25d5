"""The DALI backend (`data.backend=dali`) on the CPU: the `build_loaders` contract.

On the CPU, DALI reads and decodes and the loader resizes in torch (training: resize + the
coin's flip per crop; validation: the torch backend's ValTransform), so validation pixels and
whole-image training crops are compared with torch exactly.

DALI is imported unconditionally: CI installs it, and a missing DALI must fail this module, not
skip it. Samples are identified through JPEG + crop + resize by constant grey levels 10 apart
(`_grey_folder`); crop geometry is read back from colour ramps (`_ramp`).
"""
import json
import math
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import nvidia.dali  # noqa: F401  (a missing DALI fails here: CI must run these tests)
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from fasttrain.config import load
from fasttrain.data import dali_loader, resize
from fasttrain.data.datasets import ImageFolderDataset, read_image
from fasttrain.data.loader import build_loaders
from fasttrain.data.transforms import Normalize, ValTransform, random_resized_crop_params
from fasttrain.errors import ConfigError, DatasetError, RunError

ROOT = Path(__file__).resolve().parents[1]
LEVEL0, STEP = 10, 10  # grey level of sample i: LEVEL0 + STEP * i


def _cfg(path: Path, *overrides: str, dataset: str = "imagefolder"):
    return load(None, ["--data.backend=dali", f"--data.dataset={dataset}", f"--data.path={path}",
                       "--data.num_workers=1", "--data.mean=[0,0,0]", "--data.std=[1,1,1]",
                       *overrides])


def _loaders(cfg, **kwargs):
    return build_loaders(cfg.data, cfg.aug, seed=kwargs.pop("seed", cfg.train.seed), **kwargs)


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def _digits(data_root: Path, *overrides: str):
    return _cfg(data_root / "digits", "--data.batch_size=32", "--data.train_res=16",
                "--data.val_res=12", "--data.val_resize=14", *overrides, dataset="digits")


def _grey_folder(root: Path, n_train: int, n_val: int, classes: int = 3) -> Path:
    """ImageFolder of constant grey 20x24 JPEGs: sample i of a split has grey level
    LEVEL0 + STEP * i (i < 25) and class i % classes."""
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 24, 3), LEVEL0 + STEP * i, np.uint8)).save(
                folder / f"{i:03d}.jpg", quality=95)
    return root


def _identities(images: torch.Tensor) -> list[int]:
    """Sample index of each grey image (mean=0, std=1 normalisation: values are pixels/255)."""
    levels = images.float().mean(dim=(1, 2, 3)) * 255
    return ((levels - LEVEL0) / STEP).round().long().tolist()


def _ramp(path: Path, height: int, width: int) -> None:
    """Red = column, green = row, as linear ramps over 0..255 (lossless-ish JPEG, 4:4:4)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), np.full_like(x, 128.0)], -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.round().astype(np.uint8)).save(path, quality=100, subsampling=0)


# ---------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("channels_last", [True, False])
def test_batches_shape_dtype_layout_device(data_root, channels_last):
    cfg = _digits(data_root, "--data.val_batch_size=128")
    loaders = _loaders(cfg, channels_last=channels_last)
    assert (loaders.num_classes, loaders.classes) == (10, [str(i) for i in range(10)])
    assert len(loaders.train) == 1433 // 32
    assert (loaders.train_images, loaders.val_images) == (1433, 364)
    batches = _epoch(loaders.train, 0)
    assert len(batches) == len(loaders.train)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels in batches[:3]:
        assert images.shape == (32, 3, 16, 16) and images.dtype == torch.float32
        assert images.device.type == "cpu" and images.is_contiguous(memory_format=fmt)
        assert labels.shape == (32,) and labels.dtype == torch.int64
        assert 0 <= labels.min() and labels.max() < 10
    val = list(loaders.val)
    assert len(val) == len(loaders.val) == math.ceil(364 / 128)
    assert [len(y) for _, y in val] == [128, 128, 108]
    assert all(x.shape[1:] == (3, 12, 12) and x.is_contiguous(memory_format=fmt)
               for x, _ in val)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_dtypes_are_the_fp32_batches_rounded(data_root, dtype):
    cfg = _digits(data_root, "--data.mean=[0.5,0.4,0.3]", "--data.std=[0.2,0.3,0.25]")
    (ref, _), = _epoch(_loaders(cfg, dtype=torch.float32).train, 0)[:1]
    (low, _), = _epoch(_loaders(cfg, dtype=dtype).train, 0)[:1]
    assert low.dtype == dtype and low.is_contiguous(memory_format=torch.channels_last)
    # CPU: Normalize computes float32 and casts, so both are the float32 batch exactly rounded.
    assert torch.equal(low, ref.to(dtype))


@pytest.mark.parametrize("channels_last", [True, False])
def test_uint8_batches_are_the_raw_pixels(data_root, channels_last):
    """dtype=torch.uint8: the raw resized pixels (no normalisation), in the asked layout; the
    float32 batches are exactly their Normalize."""
    cfg = _digits(data_root, "--data.val_batch_size=128", "--data.mean=[0.5,0.4,0.3]",
                  "--data.std=[0.2,0.3,0.25]")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref = _loaders(cfg, channels_last=channels_last, dtype=torch.float32)
    raw = _loaders(cfg, channels_last=channels_last, dtype=torch.uint8)
    normalize = Normalize(cfg.data.mean, cfg.data.std)
    for (x_ref, y_ref), (x, y) in [*zip(_epoch(ref.train, 0)[:3], _epoch(raw.train, 0)[:3]),
                                   *zip(ref.val, raw.val)]:
        assert x.dtype == torch.uint8 and x.is_contiguous(memory_format=fmt)
        assert x.shape[1:] in ((3, 16, 16), (3, 12, 12)) and x.shape[0] == len(y)
        assert torch.equal(normalize(x), x_ref) and torch.equal(y, y_ref)


def test_val_matches_the_torch_backend_order_labels_and_pixels(data_root):
    """World size 1: validation is the sorted ImageFolder list, and its pixels are the torch
    backend's Normalize(ValTransform(image)) exactly (both decode with libjpeg-turbo, and the
    CPU path resizes and crops with ValTransform itself)."""
    cfg = _digits(data_root, "--data.val_batch_size=364", "--data.mean=[0.5,0.5,0.5]",
                  "--data.std=[0.5,0.5,0.5]")
    (images, labels), = list(_loaders(cfg, channels_last=False).val)
    train = ImageFolderDataset(data_root / "digits" / "train")
    reference = ImageFolderDataset(data_root / "digits" / "val", ValTransform(cfg.data),
                                   class_to_idx=train.class_to_idx)
    assert labels.tolist() == reference.targets
    expected = Normalize(cfg.data.mean, cfg.data.std)(
        torch.stack([reference[i][0] for i in range(len(reference))]))
    assert images.dtype == expected.dtype and torch.equal(images, expected)


def test_val_crop_is_torch_center_crop_region_with_exact_size(tmp_path):
    """Landscape, portrait, upscaled and padded images, odd and even margins: the DALI val
    output is ValTransform's, pixel for pixel, at exactly val_res."""
    shapes = [(40, 60), (70, 30), (12, 10), (33, 47)]
    for split in ("train", "val"):
        for c, (h, w) in enumerate(shapes):
            _ramp(tmp_path / split / f"c{c}" / "img.jpg", h, w)
    for resize, crop in ((28, 24), (20, 23)):  # 20 < 23: torchvision pads with black
        cfg = _cfg(tmp_path, "--data.batch_size=4", f"--data.val_res={crop}",
                   f"--data.val_resize={resize}", "--data.train_res=8")
        (images, labels), = list(_loaders(cfg, channels_last=False).val)
        assert images.shape == (4, 3, crop, crop) and labels.tolist() == [0, 1, 2, 3]
        reference = ImageFolderDataset(tmp_path / "val", ValTransform(cfg.data))
        expected = Normalize(cfg.data.mean, cfg.data.std)(
            torch.stack([reference[i][0] for i in range(4)]))
        assert torch.equal(images, expected)


def test_training_crop_is_resized_in_torch_and_flipped_by_the_coin(tmp_path):
    """A crop forced to the whole (square) image: the training image is torch's antialiased
    resize of the decoded file, pixel for pixel, mirrored with aug.hflip=1, not with 0."""
    for split in ("train", "val"):
        _ramp(tmp_path / split / "a" / "img.jpg", 32, 32)
    expected = TF.resize(read_image(str(tmp_path / "train" / "a" / "img.jpg")), [20, 20],
                         antialias=True)
    for hflip, want in ((0.0, expected), (1.0, expected.flip(-1))):
        cfg = _cfg(tmp_path, "--data.batch_size=1", "--data.train_res=20",
                   "--aug.scale=[1.0,1.0]", "--aug.ratio=[1.0,1.0]", f"--aug.hflip={hflip}")
        (images, labels), = _epoch(_loaders(cfg, dtype=torch.uint8).train, 0)
        assert images.shape == (1, 3, 20, 20) and labels.tolist() == [0]
        assert torch.equal(images[0], want)


def test_hflip_mirrors_the_same_crops(data_root):
    """Same seed and epoch: aug.hflip=1 gives aug.hflip=0's random crops mirrored (the flip
    comes after the resize)."""
    def batches(hflip: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg = _digits(data_root, f"--aug.hflip={hflip}")
        return _epoch(_loaders(cfg, seed=2, dtype=torch.uint8).train, 1)[:3]

    for (plain, y0), (flipped, y1) in zip(batches(0.0), batches(1.0)):
        assert torch.equal(y0, y1) and not torch.equal(plain, flipped)
        assert torch.equal(flipped, plain.flip(-1))


@pytest.mark.parametrize("native", [True, False])
def test_per_image_torch_work_runs_on_one_thread_and_restores_the_count(data_root, native,
                                                                       monkeypatch):
    """The crops are resized and flipped with one torch thread (idle intra-op threads would
    spin on the cores DALI decodes on), one C call per image (`native`: the batch written by
    fasttrain's resize function) or torch's ops per sample (a build without it); the caller's
    thread count is back for what follows."""
    seen = []
    if native:
        target, name = resize, "resize_into"
    else:
        monkeypatch.setattr(resize, "AVAILABLE", False)
        target, name = dali_loader.ResizeFlip, "__call__"
    original = getattr(target, name)

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, recording)
    kept = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batches = _epoch(_loaders(_digits(data_root)).train, 0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(kept)
    assert len(seen) == (1 if native else 32) * len(batches) and set(seen) == {1}


def test_batches_written_by_the_c_function_are_torch_ops_batches(data_root, monkeypatch):
    """The training batch written straight from DALI's buffers by fasttrain's resize function
    is, bit for bit, the per-sample torch path's (resize_square, horizontal_flip, stack), in
    both layouts (contiguous-format batches always take the torch path)."""
    cfg = _digits(data_root, "--data.batch_size=16", "--aug.hflip=0.5",
                  "--aug.scale=[0.3,1.0]")
    native = _epoch(_loaders(cfg, seed=5, dtype=torch.uint8).train, 1)[:6]
    monkeypatch.setattr(resize, "AVAILABLE", False)
    reference = _epoch(_loaders(cfg, seed=5, dtype=torch.uint8).train, 1)[:6]
    contiguous = _epoch(_loaders(cfg, seed=5, dtype=torch.uint8, channels_last=False).train,
                        1)[:6]
    for (x, y), (xr, yr), (xc, yc) in zip(native, reference, contiguous):
        assert x.is_contiguous(memory_format=torch.channels_last) and xc.is_contiguous()
        assert torch.equal(x, xr) and torch.equal(x, xc)
        assert torch.equal(y, yr) and torch.equal(y, yc)


def test_progressive_resolution_per_epoch(data_root):
    cfg = _digits(data_root, "--data.min_res=8", "--data.max_res=32", "--data.start_ramp=0",
                  "--data.end_ramp=3")
    train = _loaders(cfg).train
    assert _epoch(train, 0)[0][0].shape[-2:] == (8, 8)
    assert _epoch(train, 3)[0][0].shape[-2:] == (32, 32)


# ------------------------------------------------------------------ determinism and resume


def test_same_seed_same_batches_other_epoch_other_order(data_root):
    cfg = _digits(data_root, "--data.batch_size=64", "--aug.hflip=0.5")
    first = _epoch(_loaders(cfg, seed=3).train, 1)
    again = _epoch(_loaders(cfg, seed=3).train, 1)
    assert len(first) == len(again) == 22
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other_epoch = _epoch(_loaders(cfg, seed=3).train, 2)
    other_seed = _epoch(_loaders(cfg, seed=4).train, 1)
    labels = torch.cat([y for _, y in first])
    assert not torch.equal(labels, torch.cat([y for _, y in other_epoch]))
    assert not torch.equal(labels, torch.cat([y for _, y in other_seed]))


def test_set_epoch_start_batch_yields_the_tail_of_the_epoch(data_root):
    cfg = _digits(data_root, "--data.batch_size=128", "--aug.hflip=0.5")
    train = _loaders(cfg, seed=1).train
    full = _epoch(train, 2)
    train.set_epoch(2, 4)
    assert len(train) == len(full) - 4
    tail = list(train)
    assert len(tail) == len(full) - 4
    for (x1, y1), (x2, y2) in zip(tail, full[4:]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    train.set_epoch(2)
    assert len(train) == len(full)


# ---------------------------------------------------------------------------------- sharding


def test_train_shards_equal_lengths_no_duplicates(tmp_path):
    """21 images on 2 ranks: shares of 10 each, each rank 2 batches of 4; within an epoch no
    image appears twice and only the documented remainder (21 - 2*2*4 = 5) is dropped."""
    root = _grey_folder(tmp_path, 21, 3)
    cfg = _cfg(root, "--data.batch_size=8", "--data.train_res=8", "--data.val_res=8")
    ranks = [_loaders(cfg, rank=r, world_size=2, seed=5).train for r in range(2)]
    assert [len(t) for t in ranks] == [2, 2]
    dropped = []
    for epoch in range(3):
        seen = []
        for train in ranks:
            batches = _epoch(train, epoch)
            assert len(batches) == 2 and all(len(y) == 4 for _, y in batches)
            for images, labels in batches:
                ids = _identities(images)
                assert [i % 3 for i in ids] == labels.tolist()  # class of the folder
                seen += ids
        assert len(seen) == len(set(seen)) == 16 and set(seen) <= set(range(21))
        dropped.append(set(range(21)) - set(seen))
    assert dropped[0] != dropped[1]  # the remainder changes with the epoch's permutation


def test_each_rank_reads_the_torch_backends_share_so_a_resume_may_change_ranks(tmp_path):
    """DALI's shards were contiguous parts of the permutation, the torch backend's shares are
    perm[rank::world]: a checkpoint inside an epoch resumed on another number of ranks skipped
    the batches of another order (2 -> 1 ranks: 8 of 96 images twice, 8 never)."""
    root = _grey_folder(tmp_path, 21, 3)
    overrides = ("--data.batch_size=6", "--data.train_res=8", "--data.val_res=8")
    cfg = _cfg(root, *overrides)
    torch_cfg = _cfg(root, *overrides, "--data.backend=torch", "--data.num_workers=0")
    for world in (1, 2, 3):
        for rank in range(world):
            batch = 6 // world
            mine = _loaders(cfg, rank=rank, world_size=world, seed=5).train
            twin = _loaders(torch_cfg, rank=rank, world_size=world, seed=5).train
            ids = [_identities(x) for x, _ in _epoch(mine, 1)]
            assert ids == [_identities(x) for x, _ in _epoch(twin, 1)], (world, rank)
            assert all(len(i) == batch for i in ids)
    # 2 steps done on 2 ranks (12 images), the rest of the epoch on 1 rank (6 more)
    two = [_loaders(cfg, rank=r, world_size=2, seed=5).train for r in range(2)]
    done = [i for t in two for x, _ in _epoch(t, 1)[:2] for i in _identities(x)]
    one = _loaders(cfg, rank=0, world_size=1, seed=5).train
    one.set_epoch(1, start_batch=2)
    rest = [i for x, _ in one for i in _identities(x)]
    assert len(done + rest) == len(set(done + rest)) == 18


@pytest.mark.parametrize("n_val,ranks", [(11, 2), (3, 2), (2, 3), (1, 2)])
def test_val_covers_every_sample_once_across_ranks(tmp_path, n_val, ranks):
    """Fewer images than ranks too: DALI's reader refused a list shorter than its shard count,
    so 2 images on 3 ranks failed on the ranks that had one."""
    root = _grey_folder(tmp_path, 12, n_val)
    cfg = _cfg(root, "--data.batch_size=6" if ranks == 3 else "--data.batch_size=8",
               "--data.train_res=8", "--data.val_res=8", "--data.val_resize=8")
    seen = []
    for rank in range(ranks):
        val = _loaders(cfg, rank=rank, world_size=ranks).val
        batches = list(val)
        assert len(batches) == len(val)
        for images, labels in batches:
            ids = _identities(images)
            assert [i % 3 for i in ids] == labels.tolist()
            seen += ids
    assert sorted(seen) == list(range(n_val))


# --------------------------------------------------------------------------- augmentation


def test_crop_scale_and_aspect_statistics_match_torch(tmp_path):
    """Read each crop's size back from the ramps (the slope of red across columns gives the
    crop's width, green down rows its height) and compare the kept-area fraction and the log
    aspect ratio with torchvision's rule (`random_resized_crop_params`): two-sample
    Kolmogorov-Smirnov distance below the alpha = 0.001 critical value, mean area within 4
    standard errors. (1,024 crops: a lower bound of 0.2 instead of 0.08, or an aspect range
    off by 10 %, fails.)"""
    height, width, res, n_files, epochs = 160, 200, 32, 64, 16
    _ramp(tmp_path / "train" / "a" / "000.jpg", height, width)
    for i in range(1, n_files):
        os.link(tmp_path / "train" / "a" / "000.jpg", tmp_path / "train" / "a" / f"{i:03d}.jpg")
    _ramp(tmp_path / "val" / "a" / "000.jpg", height, width)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    cfg = _cfg(tmp_path, f"--data.batch_size={n_files}", f"--data.train_res={res}",
               f"--aug.scale={list(scale)}", f"--aug.ratio={list(ratio)}", "--aug.hflip=0.5")
    train = _loaders(cfg, channels_last=False, seed=11).train
    crops = torch.cat([_epoch(train, e)[0][0] for e in range(epochs)])  # (N, 3, res, res)
    cols = torch.arange(2, res - 2, dtype=torch.float64)  # interior: no edge clamping

    def slope(profile: torch.Tensor) -> torch.Tensor:  # least squares, per crop
        p = profile[:, 2:res - 2].double()
        c = cols - cols.mean()
        return (p * c).sum(1) / (c * c).sum()

    red = slope(crops[:, 0].mean(1))  # per output column, in 1/255 units
    green = slope(crops[:, 1].mean(2))
    w = red.abs() * res * (width - 1)  # source pixels spanned by the crop
    h = green.abs() * res * (height - 1)
    dali_area = (w * h / (height * width)).numpy()
    dali_aspect = torch.log(w / h).numpy()
    assert 0.35 < (red < 0).double().mean() < 0.65  # flips at p = 0.5

    rng = random.Random(0)
    boxes = [random_resized_crop_params(height, width, scale, ratio, rng)
             for _ in range(20000)]
    torch_area = np.array([bh * bw / (height * width) for _, _, bh, bw in boxes])
    torch_aspect = np.log([bw / bh for _, _, bh, bw in boxes])

    def ks(a: np.ndarray, b: np.ndarray) -> float:
        grid = np.sort(np.concatenate([a, b]))
        cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
        return float(np.abs(cdf(a) - cdf(b)).max())

    n, m = len(dali_area), len(torch_area)
    critical = 1.95 * math.sqrt((n + m) / (n * m))
    assert ks(dali_area, torch_area) < critical
    assert ks(dali_aspect, torch_aspect) < critical
    assert abs(dali_area.mean() - torch_area.mean()) < 4 * torch_area.std() / math.sqrt(n)


# ------------------------------------------------------------------------------- failures


def test_undecodable_file_is_a_dataset_error_naming_it(tmp_path, capfd):
    root = _grey_folder(tmp_path, 19, 5)
    bad = b"\xff\xd8\xff\xe0" + b"not a jpeg" * 40 + b"\xff\xd9"
    (root / "train" / "class0" / "zz_bad.jpg").write_bytes(bad)
    (root / "val" / "class1" / "zz_bad.jpg").write_bytes(bad)
    cfg = _cfg(root, "--data.batch_size=4", "--data.train_res=8", "--data.val_res=8",
               "--data.val_batch_size=2")
    loaders = _loaders(cfg)
    assert len(loaders.train) == 5  # 20 files: the bad one is in the epoch
    with pytest.raises(DatasetError, match=r"train/class0/zz_bad\.jpg: DALI cannot decode"):
        _epoch(loaders.train, 0)
    with pytest.raises(DatasetError) as info:
        list(loaders.val)
    assert "val/class1/zz_bad.jpg" in str(info.value) and "\n" not in str(info.value)
    assert loaders.train.skipped == {} and loaders.val.skipped == {}


@pytest.mark.parametrize("kind", ["empty", "dangling"])
def test_a_file_the_reader_cannot_map_is_the_one_named(tmp_path, kind):
    # DALI's reader reads ahead: its failure surfaces on the sample before the bad file.
    root = _grey_folder(tmp_path, 19, 5)
    bad = root / "train" / "class0" / "zz_bad.jpg"
    if kind == "empty":
        bad.write_bytes(b"")
    else:
        bad.symlink_to(tmp_path / "gone.jpg")
    cfg = _cfg(root, "--data.batch_size=4", "--data.train_res=8", "--data.val_res=8")
    reason = "empty file" if kind == "empty" else "broken symbolic link"
    with pytest.raises(DatasetError, match=rf"train/class0/zz_bad\.jpg: DALI cannot decode this "
                                           rf"file \({reason}\)"):
        _epoch(_loaders(cfg).train, 0)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_fifo_stops_the_run_before_dali_opens_it(tmp_path, split):
    """DALI's reader opened a FIFO among the images and waited for a writer for good (the run
    hung, deaf to SIGTERM); the torch backend skips it unopened. A link to one is one too."""
    root = _grey_folder(tmp_path, 8, 4)
    fifo = root / split / "class0" / "zz.jpg"
    os.mkfifo(fifo)
    (root / split / "class1" / "zz_link.jpg").symlink_to(fifo)
    cfg = _cfg(root, "--data.batch_size=4", "--data.train_res=8", "--data.val_res=8")
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(fifo))}: not a regular file \(a "
                                           rf"FIFO\) \(and 1 more\); data.backend=dali stops"):
        _loaders(cfg)
    # a file that became one after the listing is named, not opened, when a batch fails
    from fasttrain.data.dali_loader import _first_undecodable

    assert _first_undecodable([str(fifo)]) == (str(fifo), "not a regular file (a FIFO)")


def test_a_relative_data_path_reads_from_the_working_directory(tmp_path, monkeypatch):
    _grey_folder(tmp_path / "set", 8, 4)
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(Path("set"), "--data.batch_size=4", "--data.train_res=8", "--data.val_res=8")
    loaders = _loaders(cfg)
    assert sum(len(labels) for _, labels in _epoch(loaders.train, 0)) == 8
    assert sum(len(labels) for _, labels in loaders.val) == 4


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    """The file list was written as UTF-8 text: a Latin-1 name (valid on Linux, surrogate-
    escaped by Python) raised UnicodeEncodeError at the first epoch."""
    root = _grey_folder(tmp_path / "set", 8, 4)
    first = root / "train" / "class0" / "000.jpg"
    os.rename(first, os.fsdecode(bytes(first.parent) + b"/caf\xe9.jpg"))
    loaders = _loaders(_cfg(root, "--data.batch_size=4", "--data.train_res=8",
                            "--data.val_res=8"))
    seen = torch.cat([labels for _, labels in _epoch(loaders.train, 0)])
    assert len(seen) == 8


def test_a_file_name_with_a_line_break_is_refused_before_the_first_epoch(tmp_path):
    root = _grey_folder(tmp_path / "set", 8, 4)
    os.rename(root / "val" / "class1" / "001.jpg", root / "val" / "class1" / "x\n1.jpg")
    with pytest.raises(DatasetError, match=r"x\\n1.jpg': a file name with a line break cannot "
                                           r"be listed for DALI"):
        _loaders(_cfg(root, "--data.batch_size=4", "--data.train_res=8", "--data.val_res=8"))


def test_missing_dataset_is_a_dataset_error(tmp_path):
    cfg = _cfg(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="nowhere/train: directory not found"):
        _loaders(cfg)


def test_unsupported_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.backend=dali does not implement "
                                          "aug.train_crop=pad_random"):
        load(None, ["--data.backend=dali", "--aug.train_crop=pad_random"])
    cfg = load(None, ["--data.dataset=cifar10"])
    cfg.data.backend = "dali"  # bypassing load(): build_loaders checks again
    with pytest.raises(ConfigError, match="reads image folders, not data.dataset=cifar10"):
        build_loaders(cfg.data, cfg.aug)


def test_missing_dali_is_a_one_line_run_error(data_root, monkeypatch):
    dali_loader._dali.cache_clear()
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali → ImportError
    try:
        with pytest.raises(RunError) as info:
            _loaders(_digits(data_root))
    finally:
        dali_loader._dali.cache_clear()
    assert str(info.value) == ("data.backend=dali needs NVIDIA DALI: pip install "
                               "--no-build-isolation -e .[dali] (nvidia-dali-cuda130)")


def test_pipelines_are_released_after_each_epoch(data_root):
    """Each epoch's pipeline (its worker threads) is shut down at the epoch's end, also when the
    consumer stops early."""
    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    cfg = _digits(data_root, "--data.num_workers=2")
    loaders = _loaders(cfg)
    _epoch(loaders.train, 0)
    list(loaders.val)
    settled = threads()
    for epoch in range(1, 4):
        _epoch(loaders.train, epoch)
        list(loaders.val)
        loaders.train.set_epoch(epoch)
        batches = iter(loaders.train)
        next(batches)
        del batches  # abandoned mid-epoch (train.max_steps)
    assert threads() <= settled


def test_the_memory_of_each_epochs_pipeline_is_given_back(data_root):
    """glibc kept each shut-down pipeline's buffers as free heap that the next pipelines did
    not reuse: RSS grew ~8 MB per epoch of the quickstart (a training and two validation
    passes), for the whole run (~0.5 GB per rank over 88 ImageNet epochs)."""
    def rss_mb() -> float:
        with open("/proc/self/status") as status:
            kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
        return kb / 1024

    cfg = load(str(ROOT / "recipes" / "quickstart.yaml"),
               ["--data.backend=dali", "--data.num_workers=2",
                f"--data.path={data_root / 'digits'}"])
    loaders = _loaders(cfg)
    for epoch in range(25):
        if epoch == 5:
            settled = rss_mb()
        _epoch(loaders.train, epoch)
        list(loaders.val), list(loaders.val)
    assert rss_mb() - settled < 40  # 166 MB over these 20 epochs before


# -------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_quickstart_trains_with_dali(run_tool, tmp_path):
    result = run_tool("train.py", str(ROOT / "recipes" / "quickstart.yaml"),
                      "--data.backend=dali", "--schedule.epochs=1", "--schedule.warmup_epochs=0",
                      f"--log.dir={tmp_path}", "--log.name=dali")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backend: dali" in (tmp_path / "dali" / "config.yaml").read_text()
    (metrics,) = [json.loads(line) for line in
                  (tmp_path / "dali" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["train_images"] == 22 * 64  # 1,433 // 64 full batches
    assert math.isfinite(metrics["train_loss"]) and 0 <= metrics["val_top1"] <= 100
    assert metrics["skipped_files"] == 0


@pytest.mark.cuda
def test_gpu_pipeline_outputs_on_the_device(data_root):
    """nvJPEG ("mixed") decode and GPU ops: batches arrive on the GPU, bf16, channels-last."""
    cfg = _digits(data_root)
    device = torch.device("cuda", 0)
    loaders = _loaders(cfg, device=device, dtype=torch.bfloat16)
    images, labels = _epoch(loaders.train, 0)[0]
    assert images.device == device and labels.device == device
    assert images.dtype == torch.bfloat16 and images.shape == (32, 3, 16, 16)
    assert images.is_contiguous(memory_format=torch.channels_last)
    val_images, val_labels = next(iter(loaders.val))
    assert val_images.shape[1:] == (3, 12, 12) and val_labels.device == device
