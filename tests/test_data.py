"""Data: built-in digits, ImageFolder, CIFAR-10 format, samplers and seeded augmentation."""
import io
import multiprocessing
import os
import pickle
import random
import re
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from fasttrain.config import load
from fasttrain.data import (DatasetError, EpochSampler, ShardSampler, build_digits,
                            build_loaders, load_cifar10, write_cifar10)
from fasttrain.data.check import scan
from fasttrain.data.datasets import (ImageFolderDataset, SkippedSample, _publish_dir,
                                     folder_files, read_image, read_image_box)
from fasttrain.data.transforms import random_resized_crop_params
from fasttrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))


def test_digits_are_real_jpegs_with_a_deterministic_split(data_root, tmp_path):
    root = data_root / "digits"
    files = listing(root)
    assert len(files) == 1797
    train = [f for f in files if f.startswith("train/")]
    val = [f for f in files if f.startswith("val/")]
    assert (len(train), len(val)) == (1433, 364)
    assert sorted({Path(f).parent.name for f in val}) == [str(d) for d in range(10)]
    sample = root / val[0]
    assert sample.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG SOI marker
    with Image.open(sample) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (32, 32))
    # A second build elsewhere gives the same split, file for file.
    again = build_digits(tmp_path / "digits")
    assert listing(again) == files
    # Idempotent: an existing tree is left alone.
    mtime = sample.stat().st_mtime_ns
    build_digits(root)
    assert sample.stat().st_mtime_ns == mtime


def test_digits_at_an_unusable_path_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("kept")
    with pytest.raises(DatasetError, match=r"a_file: exists and is not a directory"):
        build_digits(tmp_path / "a_file")
    with pytest.raises(DatasetError, match=r"a_file/digits: cannot write the data set here"):
        build_digits(tmp_path / "a_file" / "digits")
    assert (tmp_path / "a_file").read_text() == "kept"


def test_a_killed_builds_temporary_folder_is_removed_by_the_next_build(tmp_path, capsys):
    """A data set build killed outright (SIGKILL, the OOM killer: CIFAR-10's download) left
    its hidden temporary folder for good, one more per kill."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    killed = tmp_path / f".data.tmp-{child.pid}-0123abcd"
    running = tmp_path / f".data.tmp-{os.getpid()}-89abcdef"  # a rank building at this moment
    other = tmp_path / f".database.tmp-{child.pid}-0123abcd"  # another data set's
    for folder in (killed, running, other):
        (folder / "train").mkdir(parents=True)
    capsys.readouterr()
    _publish_dir(lambda tmp: (tmp / "train").mkdir(parents=True), tmp_path / "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [running.name, other.name, "data"])
    assert capsys.readouterr().err == (f"removed {killed}, left by a killed build of data "
                                       f"(pid {child.pid})\n")


def _quick_cfg(*overrides):
    # These tests are about the torch backend (workers, per-sample seeding); the quickstart
    # recipe itself runs on the resident backend.
    return load(ROOT / "recipes" / "quickstart.yaml", ["--data.backend=torch", *overrides])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_normalize_reads_uint8_without_a_float_copy_and_keeps_the_layout(dtype):
    """(x/255 - mean)/std in float32, then the training dtype: uint8 batches go into the
    multiply-add directly (no float32 copy first), float batches alike; the layout is kept."""
    from fasttrain.data.transforms import Normalize

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    norm = Normalize(mean, std, dtype)
    x = torch.randint(0, 256, (4, 3, 7, 9), dtype=torch.uint8)
    want = ((x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1))
            / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1))
    for batch in (x, x.contiguous(memory_format=torch.channels_last)):
        got = norm(batch)
        assert got.dtype == dtype and got.stride() == batch.stride()
        torch.testing.assert_close(got.double(), want, atol=1e-5 if dtype == torch.float32
                                   else 2e-2, rtol=0)
        assert torch.equal(got, norm(batch.float()))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        norm(x)
    ops = [e.name for e in prof.events() if e.cpu_parent is None]
    assert ops[0] == "aten::addcmul", ops  # no conversion of the batch before it


def test_loaders_shapes_dtypes_and_normalisation(data_root):
    cfg = _quick_cfg(f"--data.path={data_root / 'digits'}", "--data.batch_size=32")
    loaders = build_loaders(cfg.data, cfg.aug, channels_last=True)
    assert loaders.num_classes == 10 and loaders.classes == [str(d) for d in range(10)]
    images, labels = next(iter(loaders.train))
    assert images.shape == (32, 3, 16, 16) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64
    # mean/std 0.5: white background pixels (255) land at +1, black strokes near -1.
    assert images.max() <= 1.0 + 1e-6 and images.min() >= -1.0 - 1e-6
    val_seen = sum(len(y) for _, y in loaders.val)
    assert val_seen == 364
    assert len(loaders.train) == 1433 // 32
    assert (loaders.train_images, loaders.val_images) == (1433, 364)


def test_augmentation_depends_on_seed_epoch_and_index_only(data_root):
    def first_batches(workers, epoch, seed=0):
        cfg = _quick_cfg(f"--data.path={data_root / 'digits'}", "--data.batch_size=16",
                         f"--data.num_workers={workers}")
        loaders = build_loaders(cfg.data, cfg.aug, seed=seed)
        loaders.train.set_epoch(epoch)
        it = iter(loaders.train)
        return [next(it) for _ in range(3)]

    a = first_batches(0, epoch=1)
    b = first_batches(2, epoch=1)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = first_batches(0, epoch=2)
    assert not torch.equal(a[0][0], c[0][0])
    d = first_batches(0, epoch=1, seed=1)
    assert not torch.equal(a[0][0], d[0][0])


def _crop(value: int, size: int = 6) -> torch.Tensor:
    """A (3, size, size) uint8 sample in (H, W, C) memory, as the training crops are."""
    return torch.full((size, size, 3), value, dtype=torch.uint8).permute(2, 0, 1)


def test_recycling_collate_reuses_a_released_buffer_and_never_a_lent_one(monkeypatch):
    from types import SimpleNamespace

    from fasttrain.data import loader as loader_mod
    from fasttrain.data.datasets import SkippedSample
    collate = loader_mod.RecyclingCollate(workers=2, slots=2)
    # Outside a worker: a plain stack, no token.
    images, labels, skipped, token = collate([(_crop(1), 3), (_crop(2), 4)])
    assert token is None and images.shape == (2, 3, 6, 6)
    assert images.is_contiguous(memory_format=torch.channels_last)

    monkeypatch.setattr(loader_mod, "get_worker_info", lambda: SimpleNamespace(id=1))
    batch = [(_crop(1), 3), SkippedSample("bad.jpg", "truncated"), (_crop(2), 4)]
    a, labels, skipped, token_a = collate(batch)
    assert token_a == (1, 0) and collate.flags.tolist() == [[0, 0], [1, 0]]
    assert labels.tolist() == [3, 4] and skipped == [("bad.jpg", "truncated")]
    assert a.is_shared() and a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a[:, 0, 0, 0], torch.tensor([1, 2], dtype=torch.uint8))
    b, _, _, token_b = collate([(_crop(5), 0)])
    assert token_b == (1, 1)  # slot 0 is still lent: the other slot
    c, _, _, token_c = collate([(_crop(6), 0)])
    assert token_c is None and c.is_shared()  # no free slot: a fresh buffer, no reuse
    assert a[0, 0, 0, 0] == 1 and b[0, 0, 0, 0] == 5  # nothing lent was written over
    collate.release(token_a)
    d, _, _, token_d = collate([(_crop(7), 0), (_crop(8), 0)])
    assert token_d == (1, 0)
    assert d.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()  # reused
    collate.release(token_d)
    # The pin-memory thread of older torch hands the token back as a list: one slot freed,
    # not every slot of rows 1 and 0.
    collate.flags.fill_(1)
    collate.release([1, 0])
    assert collate.flags.tolist() == [[1, 1], [0, 1]]
    collate.reset()
    # A larger batch than the slot holds reallocates it; the smaller buffer is not overrun.
    e, _, _, token_e = collate([(_crop(9, size=12), 0)] * 2)
    assert token_e == (1, 0) and e.shape == (2, 3, 12, 12) and torch.all(e == 9)
    collate.reset()
    assert not collate.flags.any()
    # Samples not in (H, W, C) memory (whole images, validation): default_collate, no token.
    f, _, _, token_f = collate([(torch.zeros(3, 4, 4, dtype=torch.uint8), 0)])
    assert token_f is None and f.is_contiguous()


def test_pending_crops_are_resized_and_flipped_into_the_batch(monkeypatch):
    from types import SimpleNamespace

    from fasttrain.data import loader as loader_mod
    from fasttrain.data.transforms import PendingCrop, horizontal_flip, resize_square
    g = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)
             for h, w in ((20, 17), (9, 30))]
    finished = _crop(4, size=12)  # a sample another path finished (same size)
    batch = [(PendingCrop(crops[0], 12, True), 1), (finished, 2),
             (PendingCrop(crops[1][1:8, 3:25], 12, False), 3)]  # a window: rows 90 bytes apart
    expected = torch.stack([horizontal_flip(resize_square(crops[0].permute(2, 0, 1), 12)),
                            finished,
                            resize_square(crops[1][1:8, 3:25].contiguous().permute(2, 0, 1),
                                          12)])
    collate = loader_mod.RecyclingCollate(workers=1, slots=1)
    images, labels, _, token = collate(batch)  # outside a worker: a fresh batch
    assert token is None and torch.equal(images, expected) and labels.tolist() == [1, 2, 3]
    assert images.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(loader_mod, "get_worker_info", lambda: SimpleNamespace(id=0))
    images, _, _, token = collate(batch)  # in a worker: into the shared buffer
    assert token == (0, 0) and images.is_shared() and torch.equal(images, expected)
    assert torch.equal(batch[0][0].finish(), expected[0])


def test_validation_samples_are_packed_and_stacked_into_reused_buffers(monkeypatch):
    """ValTransform's output is the resize + center crop, in (H, W, C) memory, so validation
    batches go through the workers' reused buffers rather than default_collate."""
    from types import SimpleNamespace

    import torchvision.transforms.v2.functional as TF

    from fasttrain.data import loader as loader_mod
    from fasttrain.data.transforms import ValTransform
    cfg = load(None, ["--data.val_resize=40", "--data.val_res=32"])
    g = torch.Generator().manual_seed(1)
    planar = torch.randint(0, 256, (3, 45, 61), dtype=torch.uint8, generator=g)
    hwc = torch.randint(0, 256, (50, 40, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1)
    samples = []
    for image in (planar, hwc):
        out = ValTransform(cfg.data)(image)
        expected = TF.center_crop(TF.resize(image, [40], antialias=True), [32, 32])
        assert torch.equal(out, expected) and out.permute(1, 2, 0).is_contiguous()
        samples.append((out, 0))
    monkeypatch.setattr(loader_mod, "get_worker_info", lambda: SimpleNamespace(id=0))
    batch, _, _, token = loader_mod.RecyclingCollate(workers=1)(samples)
    assert token == (0, 0) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([s for s, _ in samples]))


@pytest.mark.parametrize("workers", [0, 2])
def test_crops_resized_into_the_batch_are_the_torch_ops_batches(data_root, workers,
                                                                 monkeypatch):
    """Training crops resized and flipped into the batch by fasttrain's resize function (the
    default) give the batches of torch's ops per sample (a build without it), bit for bit."""
    from fasttrain.data import resize
    from fasttrain.data.transforms import PendingCrop

    def batches():
        cfg = _quick_cfg(f"--data.path={data_root / 'digits'}", "--data.batch_size=32",
                         f"--data.num_workers={workers}", "--aug.hflip=0.5")
        loaders = build_loaders(cfg.data, cfg.aug, channels_last=True, dtype=torch.uint8,
                                seed=7)
        loaders.train.set_epoch(2)
        sample, _ = loaders.train.loader.dataset[(2, 5, 0)]
        assert isinstance(sample, PendingCrop) == resize.AVAILABLE
        return [(x.clone(), y) for x, y in loaders.train][:8]

    native = batches()
    monkeypatch.setattr(resize, "AVAILABLE", False)
    for (x, y), (x_ref, y_ref) in zip(native, batches()):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_recycled_buffers_never_change_a_batch_already_handed_out(data_root):
    """Worker buffers are reused (2 workers, 4 slots each, 40+ batches), yet every batch kept
    from an epoch equals the 0-worker batch; raw uint8 batches are views until the next one."""
    def epoch(workers, dtype):
        cfg = _quick_cfg(f"--data.path={data_root / 'digits'}", "--data.batch_size=32",
                         f"--data.num_workers={workers}")
        loaders = build_loaders(cfg.data, cfg.aug, channels_last=True, dtype=dtype)
        loaders.train.set_epoch(1)
        if dtype == torch.uint8:  # valid until the next batch is asked for: keep copies
            return [(x.clone(), y) for x, y in loaders.train], loaders
        return list(loaders.train), loaders

    reference, _ = epoch(0, torch.float32)
    kept, loaders = epoch(2, torch.float32)
    assert len(kept) == len(reference) == 1433 // 32
    for (x, y), (x_ref, y_ref) in zip(kept, reference):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    collate = loaders.train.loader.collate_fn
    assert not collate.flags.any()  # every slot released at the end of the epoch
    raw, loaders = epoch(2, torch.uint8)
    norm = loaders.train.normalize
    for (x, _), (x_ref, _) in zip(raw, reference):
        x = torch.addcmul(norm.shift, x.float(), norm.scale)
        assert torch.allclose(x, x_ref, atol=1e-6)
    # An iteration abandoned mid-epoch leaves slots lent; the next one starts from none.
    it = iter(loaders.train)
    next(it), next(it)
    assert loaders.train.loader.collate_fn.flags.any()  # the workers did hand out slots
    del it
    again = [(x.clone(), y) for x, y in loaders.train]
    assert [torch.equal(x, x_raw) for (x, _), (x_raw, _) in zip(again, raw)] == [True] * len(raw)


@pytest.mark.cuda
def test_recycled_buffers_on_cuda_through_pinned_memory(data_root):
    """The CUDA path: batches go from the workers' reused buffers through the pinning thread to
    the device, and equal the CPU loader's; every buffer is released by the epoch's end."""
    def epoch(device):
        cfg = _quick_cfg(f"--data.path={data_root / 'digits'}", "--data.batch_size=32",
                         "--data.num_workers=2")
        loaders = build_loaders(cfg.data, cfg.aug, device=torch.device(device),
                                channels_last=True)
        loaders.train.set_epoch(1)
        return [(x.cpu(), y.cpu()) for x, y in loaders.train], loaders

    reference, _ = epoch("cpu")
    on_gpu, loaders = epoch("cuda")
    assert len(on_gpu) == len(reference)
    for (x, y), (x_ref, y_ref) in zip(on_gpu, reference):
        assert torch.equal(y, y_ref) and torch.allclose(x, x_ref, atol=1e-6)
    assert not loaders.train.loader.collate_fn.flags.any()


@pytest.mark.parametrize("size,world", [(1437, 2), (10, 3), (7, 1)])
def test_epoch_sampler_gives_each_rank_a_disjoint_equal_shard(size, world):
    shards = []
    for rank in range(world):
        sampler = EpochSampler(size, rank, world, seed=3)
        sampler.set_epoch(5)
        pairs = list(sampler)
        assert all(epoch == 5 and repeat == 0 for epoch, _, repeat in pairs)
        assert len(pairs) == len(sampler) == size // world
        shards.append({i for _, i, _ in pairs})
    union = set().union(*shards)
    assert sum(map(len, shards)) == len(union)  # disjoint
    assert len(union) == size // world * world
    sampler = EpochSampler(size, 0, world, seed=3)
    sampler.set_epoch(6)
    if size > 7:
        assert [i for _, i, _ in sampler] != [i for _, i, _ in EpochSampler(size, 0, world, seed=3)]


@pytest.mark.parametrize("world", [1, 2])
def test_epoch_sampler_resumed_inside_an_epoch_yields_the_rest_of_it(world):
    for rank in range(world):
        sampler = EpochSampler(23, rank, world, seed=3)
        sampler.set_epoch(4)
        full = list(sampler)
        for start in (1, 5):
            sampler.set_epoch(4, start=start)
            assert list(sampler) == full[start:] and len(sampler) == len(full) - start


def test_shard_sampler_covers_every_sample_once():
    seen = [i for rank in range(3) for i in ShardSampler(10, rank, 3)]
    assert sorted(seen) == list(range(10))


def test_random_resized_crop_params_stay_inside_the_image_and_bounds():
    rng = random.Random(0)
    for _ in range(2000):
        top, left, h, w = random_resized_crop_params(40, 60, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        assert 0.08 * 2400 * 0.8 <= h * w <= 2400
    # Impossible constraints fall back to a centered crop clamped to the ratio range.
    assert random_resized_crop_params(10, 100, (0.99, 1.0), (1.0, 1.0), rng) == (0, 45, 10, 10)


def test_imagefolder_with_grayscale_png_and_cmyk_files(tmp_path):
    for split in ("train", "val"):
        for cls, mode in (("a", "L"), ("b", "CMYK")):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                img = Image.new(mode, (40, 30), color=i * 40 if mode == "L" else (i, 0, 0, 0))
                img.save(folder / f"{i}.jpg", format="JPEG")
        Image.new("RGB", (40, 30)).save(tmp_path / split / "a" / "png_named.JPEG", format="PNG")
    cfg = load(None, [f"--data.dataset=imagefolder", f"--data.path={tmp_path}",
                      "--data.batch_size=4", "--data.train_res=24", "--data.val_res=24",
                      "--data.val_resize=28", "--data.num_workers=0"])
    loaders = build_loaders(cfg.data, cfg.aug)
    assert loaders.classes == ["a", "b"]
    images, labels = next(iter(loaders.val))
    assert images.shape == (4, 3, 24, 24)
    assert sum(len(y) for _, y in loaders.val) == 9  # 4 grayscale + 4 CMYK + 1 PNG


def test_16_bit_pngs_decode_to_8_bit_rgb(tmp_path):
    """libpng hands torchvision uint16 values for 16-bit PNGs; normalised as if uint8 they were
    256x too large (and broke batching with 8-bit images)."""
    gray = np.array([[0, 255, 256, 33067, 65535]], np.uint16)
    Image.fromarray(gray).save(tmp_path / "gray16.png")
    image = read_image(str(tmp_path / "gray16.png"))
    assert image.dtype == torch.uint8 and image.shape == (3, 1, 5)
    assert image[0].tolist() == [[0, 0, 1, 129, 255]]  # the high byte, like PIL's 8-bit view
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / "set" / split / cls
            folder.mkdir(parents=True)
            Image.fromarray(np.full((20, 20), 33067, np.uint16)).save(folder / "16.png")
            Image.new("RGB", (20, 20), (129, 129, 129)).save(folder / "8.png")
    cfg = load(None, ["--data.dataset=imagefolder", f"--data.path={tmp_path / 'set'}",
                      "--data.batch_size=4", "--data.val_batch_size=4", "--data.val_res=16",
                      "--data.val_resize=16", "--data.num_workers=0"])
    images, _ = next(iter(build_loaders(cfg.data, cfg.aug).val))
    assert images.shape == (4, 3, 16, 16)
    torch.testing.assert_close(images, images[:1].expand_as(images))  # 16-bit == 8-bit 129


def test_an_animated_gif_decodes_to_its_first_frame(tmp_path):
    """torchvision returns (frames, C, H, W) for an animated GIF; PIL's convert("RGB") keeps
    the first frame, and so does read_image."""
    frames = [Image.new("RGB", (6, 4), color) for color in ((200, 0, 0), (0, 0, 200))]
    frames[0].save(tmp_path / "anim.jpg", format="GIF", save_all=True,
                   append_images=frames[1:], duration=100, loop=0)
    image = read_image(str(tmp_path / "anim.jpg"))
    with Image.open(tmp_path / "anim.jpg") as pil:
        first = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)
    assert image.shape == (3, 4, 6) and torch.equal(image, first)


def test_an_animated_webp_decodes_to_its_first_frame(tmp_path):
    """torchvision.io refuses animated WebP ("not supported"): the torch, resident and ffcv
    backends skipped such files, which DALI and torchvision's ImageFolder read."""
    frames = [Image.new("RGB", (6, 4), color) for color in ((200, 0, 0), (0, 0, 200))]
    frames[0].save(tmp_path / "anim.webp", format="WEBP", save_all=True, lossless=True,
                   append_images=frames[1:], duration=100, loop=0)
    image = read_image(str(tmp_path / "anim.webp"))
    with Image.open(tmp_path / "anim.webp") as pil:
        assert pil.n_frames == 2
        first = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)
    assert image.shape == (3, 4, 6) and torch.equal(image, first)
    assert image[:, 0, 0].tolist() == [200, 0, 0]


def test_imagefolder_errors(tmp_path):
    cfg = load(None, ["--data.dataset=imagefolder", f"--data.path={tmp_path / 'none'}"])
    with pytest.raises(DatasetError, match="none/train: directory not found"):
        build_loaders(cfg.data, cfg.aug)
    (tmp_path / "flat" / "train").mkdir(parents=True)  # images straight in train/, no classes
    (tmp_path / "flat" / "val").mkdir(parents=True)
    cfg = load(None, ["--data.dataset=imagefolder", f"--data.path={tmp_path / 'flat'}"])
    with pytest.raises(DatasetError, match=r"flat/train: no class folders \(images go in "):
        build_loaders(cfg.data, cfg.aug)
    (tmp_path / "x" / "train" / "a").mkdir(parents=True)
    (tmp_path / "x" / "val").mkdir(parents=True)
    cfg = load(None, ["--data.dataset=imagefolder", f"--data.path={tmp_path / 'x'}"])
    with pytest.raises(DatasetError, match="no image files found"):
        build_loaders(cfg.data, cfg.aug)


def test_cifar10_format_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(60, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=60).tolist()
    write_cifar10(tmp_path, images, labels, per_batch=10)
    train = load_cifar10(tmp_path, train=True, download=False)
    test = load_cifar10(tmp_path, train=False, download=False)
    assert (len(train), len(test)) == (50, 10)
    assert train.classes[0] == "airplane"
    image, label = train[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(images[3])) and label == labels[3]
    cfg = load(None, ["--data.dataset=cifar10", f"--data.path={tmp_path}", "--data.batch_size=8",
                      "--data.train_res=32", "--data.val_res=32", "--data.val_resize=32",
                      "--aug.train_crop=pad_random", "--data.num_workers=0"])
    loaders = build_loaders(cfg.data, cfg.aug)
    assert next(iter(loaders.train))[0].shape == (8, 3, 32, 32)
    assert sum(len(y) for _, y in loaders.val) == 10


def test_cifar10_missing_without_download_and_hostile_pickle(tmp_path):
    with pytest.raises(DatasetError, match="data.download is false"):
        load_cifar10(tmp_path, train=True, download=False)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(tmp_path, np.zeros((6, 32, 32, 3), np.uint8), [0] * 6, per_batch=1)
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}))
    with pytest.raises(DatasetError, match="refusing to load builtins.print"):
        load_cifar10(tmp_path, train=True, download=False)


def _cifar_meta(names) -> bytes:
    return pickle.dumps({"label_names": names})


@pytest.mark.parametrize("file, content, message", [
    # Labels outside the class list failed the loss with an IndexError mid-training.
    ("data_batch_2", {"data": np.zeros((1, 3072), np.uint8), "labels": [10]},
     "data_batch_2: label 10 is not one of the 10 classes (0 to 9)"),
    ("data_batch_2", {"data": np.zeros((1, 3072), np.uint8), "labels": [-1]},
     "data_batch_2: label -1 is not one of the 10 classes (0 to 9)"),
    ("batches.meta", _cifar_meta(["cat", "dog", "bird"]),
     "data_batch_2: label 3 is not one of the 3 classes (0 to 2)"),
    # Any other shape was reshaped into scrambled images.
    ("data_batch_3", {"data": np.zeros((1, 32, 32, 3), np.uint8), "labels": [0]},
     "data_batch_3: data has shape (1, 32, 32, 3), not (images, 3072)"),
    ("data_batch_3", {"data": np.zeros((2, 1536), np.uint8), "labels": [0]},
     "data_batch_3: data has shape (2, 1536), not (images, 3072)"),
    # Cast without a word: floats in [0, 1] became pixels of 0 and 1, wider ints wrapped.
    ("data_batch_3", {"data": np.full((1, 3072), 0.5, np.float32), "labels": [0]},
     "data_batch_3: data has dtype float32, not uint8 (bytes 0-255)"),
    ("data_batch_3", {"data": np.full((1, 3072), 300, np.int64), "labels": [0]},
     "data_batch_3: data has dtype int64, not uint8 (bytes 0-255)"),
    # A broken meta file was an UnpicklingError or KeyError traceback.
    ("batches.meta", b"not a pickle", "batches.meta: not a CIFAR-10 meta file ("),
    ("batches.meta", pickle.dumps({"names": ["a"]}),
     "batches.meta: not a CIFAR-10 meta file (no 'label_names')"),
    ("batches.meta", _cifar_meta("airplane"),
     "batches.meta: label_names is not a list of class names"),
    ("batches.meta", _cifar_meta([]), "batches.meta: label_names is not a list of class names"),
    # A missing file was "not a CIFAR-10 batch file ([Errno 2] No such file or directory...)".
    ("data_batch_4", None,
     "data_batch_4: missing (CIFAR-10 has data_batch_1 to data_batch_5 and test_batch)"),
], ids=["label-10", "label-minus-1", "3-class-names", "4-d-data", "short-rows", "float-data",
        "int64-data", "meta-garbage",
        "meta-no-names", "meta-names-a-string", "meta-no-classes", "missing-batch"])
def test_a_malformed_cifar10_folder_is_one_error_naming_the_file(tmp_path, file, content,
                                                                 message):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(tmp_path, np.zeros((6, 32, 32, 3), np.uint8), [0, 3, 9, 1, 2, 5],
                  per_batch=1)
    if content is None:
        (folder / file).unlink()
    else:
        (folder / file).write_bytes(content if isinstance(content, bytes)
                                    else pickle.dumps(content))
    with pytest.raises(DatasetError) as e:
        load_cifar10(tmp_path, train=True, download=False)
    assert str(e.value).startswith(f"{folder}/{message}"), str(e.value)
    assert "\n" not in str(e.value)


def test_a_cifar10_download_without_network_says_so_and_leaves_no_folder(tmp_path,
                                                                          monkeypatch):
    """No network was reported as "cannot write the data set here" (urllib's URLError is an
    OSError), pointing at the folder's permissions, and left the empty data folder behind,
    also from `train.py --dry-run`."""
    import socket
    import urllib.error

    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    root = tmp_path / "data" / "c10"
    with pytest.raises(DatasetError) as e:
        load_cifar10(root, train=True, download=True)
    assert str(e.value) == (f"cannot download CIFAR-10 to {root} (no answer from "
                            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz: [Errno -2] "
                            f"Name or service not known); place cifar-10-batches-py/ there by hand")
    assert list(tmp_path.iterdir()) == []
    # a folder that was there stays, and a write error is still one
    root.mkdir(parents=True)

    def unwritable(url, folder, **kwargs):
        raise PermissionError(13, "Permission denied", f"{folder}/cifar-10-python.tar.gz")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", unwritable)
    with pytest.raises(DatasetError, match="cannot write the data set here .Permission denied"):
        load_cifar10(root, train=True, download=True)
    assert list(root.iterdir()) == []


def test_batch_must_split_across_ranks(data_root):
    cfg = _quick_cfg(f"--data.path={data_root / 'digits'}", "--data.batch_size=63")
    with pytest.raises(ConfigError, match="data.batch_size=63 is not divisible by the 2 ranks"):
        build_loaders(cfg.data, cfg.aug, rank=0, world_size=2)


def _noise(size=(30, 20), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_check_data_lists_exactly_the_files_the_loaders_read(tmp_path):
    """Symbolic links to class folders and to subfolders are followed, as the loaders'
    os.walk(followlinks=True) does; a dangling link is listed and reported as broken."""
    elsewhere = tmp_path / "elsewhere"
    for name in ("cls", "sub"):
        (elsewhere / name).mkdir(parents=True)
        for i in range(2):
            _noise(seed=i).save(elsewhere / name / f"{name}{i}.jpg")
    train = tmp_path / "data" / "train"
    for cls in ("a", "b"):
        (train / cls).mkdir(parents=True)
        for i in range(3):
            _noise(seed=i).save(train / cls / f"{i}.jpg")
    os.symlink(elsewhere / "cls", train / "c_linked")  # a class folder that is a link
    os.symlink(elsewhere / "sub", train / "b" / "sub")  # a subfolder that is a link
    os.symlink(tmp_path / "nowhere.jpg", train / "a" / "gone.jpg")
    dataset = ImageFolderDataset(train)
    report = scan(tmp_path / "data", workers=1)
    assert report.class_counts == {"train": {"a": 4, "b": 5, "c_linked": 2}}
    assert report.images == len(dataset) == 11
    assert report.problems == [
        (str(tmp_path / "data" / "val"), "folder missing (training reads train/ and val/)"),
        (str(train / "a" / "gone.jpg"), f"broken symbolic link (to {tmp_path / 'nowhere.jpg'})")]
    gone = next(i for i, (p, _) in enumerate(dataset.samples) if p.endswith("gone.jpg"))
    assert dataset[gone] == SkippedSample(*report.problems[1])  # the loaders' reason too


def test_a_fifo_or_a_link_to_a_device_is_an_unreadable_image(tmp_path):
    """Named like images, a FIFO made check_data wait forever for a writer and a link to
    /dev/zero was read until memory ran out; both are unreadable files (here /dev/null stands
    in for the endless device: same kind, nothing to exhaust without the check)."""
    cls = tmp_path / "data" / "a"
    cls.mkdir(parents=True)
    _noise().save(cls / "0.jpg")
    os.symlink("/dev/null", cls / "device.jpg")
    fifo = cls / "fifo.jpg"
    os.mkfifo(fifo)

    # Were the FIFO opened (once, by the scan), this writer would make it a file holding no
    # image, a wrong answer rather than a hang.
    def writer():
        try:
            with open(fifo, "wb") as f:  # waits for a reader
                f.write(b"not an image")
        except BrokenPipeError:  # the reader below left first
            pass
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        report = scan(tmp_path / "data", workers=1)
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # lets a waiting writer go on
        thread.join()
    assert report.problems == [(str(cls / "device.jpg"),
                                "not a regular file (a character device)"),
                               (str(cls / "fifo.jpg"), "not a regular file (a FIFO)")]
    dataset = ImageFolderDataset(tmp_path / "data")
    assert dataset[1] == SkippedSample(*report.problems[0])  # the loaders' reason too


def test_check_data_prints_folder_names_as_they_are(tmp_path, capsys):
    """Names are data, not rich markup: '[/x]' in the root used to raise MarkupError, a class
    '[red]b' was shown as 'b'."""
    from conftest import load_tool

    root = tmp_path / "set[/x]"
    for split in ("train", "val"):
        (root / split / "[red]b").mkdir(parents=True)
        _noise(seed=0).save(root / split / "[red]b" / "0.jpg")
    assert load_tool("check_data").main([str(root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "set[/x]" in out and "1 ([red]b)" in out and "0 problem(s)" in out
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # an unset $DATA scanned the current folder
        load_tool("check_data").main([""])
    assert exc.value.code == 2 and "argument root: empty path" in capsys.readouterr().err
    assert load_tool("check_data").main([str(root), "--workers", "100000"]) == 2
    assert "--workers=100000: must be 0 (one per core) to 1024" in capsys.readouterr().err


def test_a_newline_in_a_file_name_cannot_forge_a_report_line(tmp_path, capsys):
    """A name holding a newline printed as two lines, the second one a made-up problem, and the
    count of `problem:` lines no longer matched the summary."""
    from conftest import load_tool

    folder = tmp_path / "set" / "a"
    folder.mkdir(parents=True)
    _noise(seed=0).save(folder / "0.jpg")
    (folder / "bad\nproblem: fake.jpg").write_bytes(b"not a jpeg")
    (folder / "notes\ttab.txt").write_text("x")
    assert load_tool("check_data").main([str(tmp_path / "set"), "--workers", "1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [l for l in lines if l.startswith("problem:")] == [
        f"problem: {folder}/bad\\nproblem: fake.jpg: cannot decode: not a JPEG, PNG, GIF, "
        f"WebP, BMP, TIFF or PBM/PGM/PPM image"]
    assert f"ignored (not an image extension): {folder}/notes\\ttab.txt" in lines
    assert "1 problem(s), 0 warning(s), 1 ignored file(s)" in lines
    # the same escaping for write_ffcv's and training's skipped-file lines; letters of any
    # script stay, and a non-UTF-8 byte is left to printable_paths' backslashreplace
    from fasttrain.errors import one_line
    assert one_line("ü/x\x1b[2Jy\r.jpg\udcff") == "ü/x\\x1b[2Jy\\r.jpg\udcff"


def test_check_data_reads_a_cifar10_folder_as_training_does(tmp_path, capsys):
    """Pointed at a CIFAR-10 data.path it reported an "empty class folder" and eight ignored
    files; it now counts the batches' classes and names a file training would refuse."""
    from conftest import load_tool

    labels = list(range(10)) * 5 + [3] * 9 + [0]  # test_batch: 9 cats, 1 airplane
    write_cifar10(tmp_path, np.zeros((60, 32, 32, 3), np.uint8), labels, per_batch=10)
    folder = tmp_path / "cifar-10-batches-py"
    for root in (tmp_path, folder):  # data.path, or the batches' folder itself
        report = scan(root)
        assert report.images == 60 and report.ignored == []
        assert report.class_counts["train"] == {name: 5 for name in report.class_counts["train"]}
        assert report.class_counts["val"]["cat"] == 9 and report.class_counts["val"]["dog"] == 0
        assert report.problems == [(str(folder), f"val: class {name!r} has no images")
                                   for name in report.class_counts["val"]
                                   if name not in ("airplane", "cat")]
    (folder / "data_batch_4").unlink()
    (folder / "test_batch").write_bytes(b"not a pickle")
    check_data = load_tool("check_data")
    assert check_data.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"problem: {folder / 'data_batch_4'}: missing (CIFAR-10 has" in out
    assert f"problem: {folder / 'test_batch'}: not a CIFAR-10 batch file (" in out
    assert "2 problem(s), 0 warning(s), 0 ignored file(s)" in out


def test_check_data_with_stdout_closed_exits_141_not_1(tmp_path):
    """`check_data.py DIR | head -5` exited 1, "problems found", silently, on a clean set."""
    import subprocess
    import sys

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        _noise(seed=0).save(tmp_path / split / "a" / "0.jpg")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        res = subprocess.run([sys.executable, str(ROOT / "tools" / "check_data.py"),
                              str(tmp_path), "--workers", "1"], stdout=write,
                             stderr=subprocess.PIPE, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(write)
    assert (res.returncode, res.stderr) == (141, "")


def test_check_data_draws_its_progress_bar_on_stderr(tmp_path, monkeypatch, capsys):
    """`check_data.py DIR > report.txt` on a terminal showed no bar: it went to stdout."""
    from conftest import load_tool

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        _noise(seed=0).save(tmp_path / split / "a" / "0.jpg")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: both streams are terminals
    assert load_tool("check_data").main([str(tmp_path), "--workers", "1"]) == 0
    printed = capsys.readouterr()
    assert "scanning" in printed.err and "scanning" not in printed.out
    assert "0 problem(s)" in printed.out
    # a pipe: the report at its natural width, as the other tools' (it followed COLUMNS=80)
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    monkeypatch.setenv("COLUMNS", "80")
    long = "n" * 70
    for split in ("train", "val"):
        (tmp_path / split / "a").rename(tmp_path / split / long)
    assert load_tool("check_data").main([str(tmp_path), "--workers", "1"]) == 0
    assert f"1 ({long}) │ 1 ({long}) │" in capsys.readouterr().out


def test_check_data_reports_what_training_refuses_at_start(tmp_path):
    """Validation classes that train/ lacks: the loaders refuse the tree, so the check must not
    call it clean."""
    for split, classes in (("train", "ab"), ("val", "abcdefg")):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            _noise(seed=0).save(tmp_path / split / cls / "0.jpg")
    report = scan(tmp_path, workers=1)
    assert report.problems == [(str(tmp_path / "val"), "5 class folders not in train/, which "
                                                       "training refuses: c, d, e, f, g")]
    cfg = load(None, ["--data.dataset=imagefolder", f"--data.path={tmp_path}"])
    with pytest.raises(DatasetError, match="classes not in train/: c, d, e, f, g"):
        build_loaders(cfg.data, cfg.aug)
    for cls in "cdefg":
        (tmp_path / "train" / cls).mkdir()
        _noise(seed=0).save(tmp_path / "train" / cls / "0.jpg")
    assert scan(tmp_path, workers=1).problems == []
    (tmp_path / "train").rename(tmp_path / "elsewhere")
    assert scan(tmp_path, workers=1).problems == [
        (str(tmp_path / "train"), "folder missing (training reads train/ and val/)")]


def test_check_data_on_one_split_reports_no_missing_partner(tmp_path):
    """`check_data DIR/train` (a folder of class folders) reported DIR/train/val missing."""
    for split in ("train", "val"):
        for cls in "ab":
            (tmp_path / split / cls).mkdir(parents=True)
            _noise(seed=0).save(tmp_path / split / cls / "0.jpg")
    for split in ("train", "val"):
        report = scan(tmp_path / split, workers=1)
        assert report.problems == [] and report.images == 2


def test_a_flat_val_folder_is_said_to_lack_class_folders(tmp_path):
    """ImageNet's validation archive unpacks as 50,000 files without class folders: "no image
    files found" said the opposite of what was there."""
    (tmp_path / "train" / "a").mkdir(parents=True)
    _noise(seed=0).save(tmp_path / "train" / "a" / "0.jpg")
    (tmp_path / "val").mkdir()
    for i in range(3):
        _noise(seed=i).save(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    cfg = load(None, ["--data.dataset=imagefolder", f"--data.path={tmp_path}"])
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(tmp_path / 'val'))}: no class "
                                           rf"folders \(images go in .*/val/<class>/, one "
                                           rf"folder per class of train/\)$"):
        build_loaders(cfg.data, cfg.aug)
    assert scan(tmp_path, workers=1).problems == [(str(tmp_path / "val"), "no class folders")]


def test_folder_listing_is_torchvisions(tmp_path):
    """Same files in the same order as torchvision's make_dataset, links to folders followed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for i in range(3):
        _noise(seed=i).save(elsewhere / f"e{i}.jpg")
    for cls in ("b", "a", "c"):
        (tmp_path / "train" / cls / "deep" / "er").mkdir(parents=True)
        for i, sub in enumerate(("", "deep", "deep/er")):
            _noise(seed=i).save(tmp_path / "train" / cls / sub / f"{cls}{i}.jpg")
        (tmp_path / "train" / cls / "notes.txt").write_text("x")
    os.symlink(elsewhere, tmp_path / "train" / "a" / "linked")
    classes = {"a": 0, "b": 1, "c": 2}
    images, others = folder_files(tmp_path / "train", classes)
    everything = make_dataset(str(tmp_path / "train"), classes, is_valid_file=lambda _: True)
    assert images == make_dataset(str(tmp_path / "train"), classes, extensions=IMG_EXTENSIONS)
    assert len(images) == 12 and len(others) == 3
    assert others == [p for p, _ in everything if (p, classes[Path(p).relative_to(
        tmp_path / "train").parts[0]]) not in images]


@pytest.mark.parametrize("links,named", [({"a/up": ".."}, "a/up"), ({"a/self": "."}, "a/self"),
                                         ({"a/to_b": "../b", "b/to_a": "../a"}, "a/to_b/to_a"),
                                         ({"a/up2": "../.."}, "a/up2")])
def test_a_symbolic_link_loop_is_refused_not_listed_forty_times(tmp_path, links, named):
    """os.walk follows a link to a containing folder until the path is too long: one
    `up -> ..` link listed every image ~40 times, other classes' under this label. The error
    names the link (it named `up/a`, a folder met through it)."""
    train = tmp_path / "data" / "train"
    for cls in ("a", "b"):
        (train / cls).mkdir(parents=True)
        _noise().save(train / cls / "0.jpg")
    for link, target in links.items():
        os.symlink(target, train / link)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(train / named))}: symbolic "
                                           rf"link to .*, a folder it is inside of"):
        ImageFolderDataset(train)
    with pytest.raises(DatasetError, match="symbolic link"):
        scan(tmp_path / "data", workers=1)


@pytest.mark.parametrize("ext,mode,fmt", [(".bmp", "RGB", "BMP"), (".tif", "RGB", "TIFF"),
                                          (".tiff", "L", "TIFF"), (".pgm", "L", "PPM"),
                                          (".ppm", "RGB", "PPM")])
def test_formats_torchvision_cannot_decode_are_read_with_pil(tmp_path, ext, mode, fmt):
    path = tmp_path / f"x{ext}"
    _noise().convert(mode).save(path, format=fmt)
    image = read_image(str(path))
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    assert image.dtype == torch.uint8 and torch.equal(image, expected)
    png = tmp_path / "x.png"
    _noise().save(png)
    assert image.stride() == read_image(str(png)).stride()  # torchvision's (C, H, W) layout
    folder = tmp_path / "data" / "a"
    folder.mkdir(parents=True)
    path.rename(folder / path.name)
    assert scan(tmp_path / "data", workers=1).ok


def _encoded(fmt: str, size=(30, 20)) -> bytes:
    out = io.BytesIO()
    _noise(size).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("content,reason", [
    (b"not an image at all" * 5, "cannot decode: not a JPEG, PNG, GIF, WebP, BMP, TIFF or "
                                 "PBM/PGM/PPM image"),
    (_encoded("PNG")[:200], "cannot decode: Truncated File Read"),
    (_encoded("BMP")[:900], "cannot decode: image file is truncated"),
])
def test_an_undecodable_file_has_a_clean_one_line_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        read_image(str(path))
    message = str(info.value)
    assert message.startswith(reason)
    assert "\n" not in message and ".cpp" not in message and "/__w/" not in message


def _declaring(fmt: str, height: int, width: int) -> bytes:
    """A tiny image whose header declares `height` x `width` pixels (a decompression bomb's
    header without its GBs of pixels)."""
    raw = _encoded(fmt)
    size = struct.pack(">II", width, height)
    if fmt == "JPEG":  # start-of-frame: marker, length, precision, height, width (16 bits)
        i = raw.index(b"\xff\xc0")
        return raw[:i + 5] + struct.pack(">HH", height, width) + raw[i + 9:]
    # PNG: signature, IHDR length, "IHDR", width, height (32 bits), rest, CRC of type + data
    ihdr = raw[12:16] + size + raw[24:29]
    return raw[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + raw[33:]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, above it
@pytest.mark.parametrize("name,content,reason", [
    # the header read by fasttrain's JPEG decoder (PIL's when it is not built)
    ("bomb.jpg", lambda: _declaring("JPEG", 3000, 4000), r"4000x3000 pixels, more than "
     r"PIL\.Image\.MAX_IMAGE_PIXELS \(1000\), could be a decompression bomb$"),
    # PIL reads the other headers, and refuses twice its limit itself (a GIF named .png:
    # .gif is not among torchvision's IMG_EXTENSIONS)
    ("bomb.png", lambda: _declaring("PNG", 3000, 4000), r"Image size \(12000000 pixels\) "
     r"exceeds limit of 2000 pixels, could be decompression bomb DOS attack\.$"),
    ("big.png", lambda: _encoded("PNG", (30, 40)), r"30x40 pixels, more than PIL\.Image"),
    ("gif.png", lambda: _encoded("GIF", (30, 40)), r"30x40 pixels, more than PIL\.Image"),
    ("big.webp", lambda: _encoded("WEBP", (30, 40)), r"30x40 pixels, more than PIL\.Image"),
    ("big.tif", lambda: _encoded("TIFF", (30, 40)), r"30x40 pixels, more than PIL\.Image"),
])
def test_images_over_pils_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch, name,
                                                                  content, reason):
    """torchvision's decoders have no size limit: a 633-byte JPEG declaring 30000x30000 pixels
    decoded to 3.5 GB, a PNG of 875 KB to 2.7 GB. What PIL refuses (MAX_IMAGE_PIXELS) is
    refused from the headers, an unreadable image like any other (here under a limit of 1000
    pixels: the 30x40 images are 1200)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    cls = tmp_path / "data" / "a"
    cls.mkdir(parents=True)
    _noise((20, 30)).save(cls / "fits.png")  # 600 pixels
    (cls / name).write_bytes(content())
    with pytest.raises(ValueError, match=f"^cannot decode: {reason}"):
        read_image(str(cls / name))
    with pytest.raises(ValueError, match=f"^cannot decode: {reason}"):
        read_image_box(str(cls / name), lambda h, w: (0, 0, 2, 2), (1, 1))  # region decode
    report = scan(tmp_path / "data", workers=1)  # its workers are forked: the limit holds
    assert [path for path, _ in report.problems] == [str(cls / name)]
    dataset = ImageFolderDataset(tmp_path / "data")
    skipped = dataset[[p for p, _ in dataset.samples].index(str(cls / name))]
    assert isinstance(skipped, SkippedSample) and re.search(reason, skipped.reason)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _raw_png(pixels: np.ndarray, depth: int, color_type: int, extra: bytes = b"",
             interlaced: bool = False) -> bytes:
    """A PNG written byte by byte (what PIL cannot write: 16-bit colour, 2- and 4-bit gray,
    Adam7): `pixels` (H, W[, C]) of samples, packed MSB first below 8 bits, big-endian at 16."""
    height, width = pixels.shape[:2]
    passes = ([(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2),
               (0, 1, 2, 2), (1, 0, 2, 1)] if interlaced else [(0, 0, 1, 1)])
    data = b""
    for top, left, dy, dx in passes:
        for row in pixels[top::dy, left::dx]:
            if depth < 8:
                samples = np.unpackbits(row.astype(np.uint8)[:, None], axis=1)[:, 8 - depth:]
                data += b"\0" + np.packbits(samples.ravel()).tobytes()
            elif row.size:
                data += b"\0" + row.astype(">u2" if depth == 16 else np.uint8).tobytes()
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, int(interlaced))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + extra
            + _png_chunk(b"IDAT", zlib.compress(data)) + _png_chunk(b"IEND", b""))


def _pil_png(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()


def _png_kinds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)

    def samples(high, *shape):
        return rng.integers(0, high, (13, 17, *shape))

    palette = _noise((17, 13)).quantize(200)
    plte = _png_chunk(b"PLTE", rng.integers(0, 256, 48, dtype=np.uint8).tobytes())
    frames = [Image.fromarray(samples(256, 4).astype(np.uint8)) for _ in range(3)]
    apng = {"save_all": True, "append_images": frames[1:], "duration": 50}
    return {
        "rgb": _pil_png(_noise((17, 13))),
        "rgba": _pil_png(Image.fromarray(samples(256, 4).astype(np.uint8))),
        "gray": _pil_png(Image.fromarray(samples(256).astype(np.uint8))),
        "gray_alpha": _pil_png(Image.fromarray(samples(256, 2).astype(np.uint8), "LA")),
        "gray_1_bit": _raw_png(samples(2), 1, 0),
        "gray_2_bit": _raw_png(samples(4), 2, 0),
        "gray_4_bit": _raw_png(samples(16), 4, 0),
        "gray_trns": _pil_png(Image.fromarray(samples(256).astype(np.uint8)), transparency=7),
        "rgb_trns": _pil_png(_noise((17, 13)), transparency=(1, 2, 3)),
        "palette": _pil_png(palette),
        "palette_trns": _pil_png(palette, transparency=bytes(range(200))),
        "palette_trns_one": _pil_png(palette, transparency=5),
        "palette_4_bit": _raw_png(samples(16), 4, 3, plte),
        "gray_16_bit": _pil_png(Image.fromarray(samples(65536).astype(np.uint16))),
        "gray_16_bit_trns": _raw_png(samples(65536), 16, 0, _png_chunk(b"tRNS", b"\1\2")),
        "gray_alpha_16_bit": _raw_png(samples(65536, 2), 16, 4),
        "rgb_16_bit": _raw_png(samples(65536, 3), 16, 2),
        "rgba_16_bit": _raw_png(samples(65536, 4), 16, 6),
        "rgb_interlaced": _raw_png(samples(256, 3), 8, 2, interlaced=True),
        "rgb_16_bit_interlaced": _raw_png(samples(65536, 3), 16, 2, interlaced=True),
        "palette_4_bit_interlaced": _raw_png(samples(16), 4, 3, plte, interlaced=True),
        "gray_2_bit_interlaced": _raw_png(samples(4), 2, 0, interlaced=True),
        "apng": _pil_png(frames[0], **apng),
        # the default image (IDAT) is not the animation's first frame
        "apng_default_image": _pil_png(frames[0], default_image=True, **apng),
    }


@pytest.mark.filterwarnings("error::UserWarning")  # PIL warns of a palette's tRNS it drops
@pytest.mark.parametrize("kind", list(_png_kinds()))
def test_pngs_decode_as_torchvision_decoded_them(tmp_path, kind):
    """PNGs are decoded by PIL (libpng crashed on corrupt ones) to exactly what torchvision's
    decode_image(ImageReadMode.RGB) gave: values, (C, H, W) strides, 16 bits scaled to 8."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    raw = _png_kinds()[kind]
    expected = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                            mode=ImageReadMode.RGB)
    if expected.dtype == torch.uint16:
        expected = to_dtype(expected, torch.uint8, scale=True)
    for name in ("x.png", "x.JPEG"):  # PNG content is found by its magic, not its name
        (tmp_path / name).write_bytes(raw)
        image = read_image(str(tmp_path / name))
        assert image.dtype == torch.uint8 and image.shape == expected.shape
        assert torch.equal(image, expected) and image.stride() == expected.stride()


def _corrupt_pngs() -> dict[str, bytes]:
    raw = _encoded("PNG")
    start = raw.index(b"IDAT") - 4
    length = int.from_bytes(raw[start:start + 4], "big")
    flipped = bytearray(raw[start + 8:start + 8 + length])
    flipped[2] ^= 0xFF  # the first deflate block's header
    with_crc = _png_chunk(b"IDAT", bytes(flipped))
    return {
        # libpng: "IDAT: invalid block type", then a segmentation fault (both)
        "stale_crc.png": raw[:start + 8] + bytes(flipped) + raw[start + 8 + length:],
        "bad_data.png": raw[:start] + with_crc + raw[start + 12 + length:],
        # libpng: "Not enough image data", then a segmentation fault
        "too_tall.png": _declaring("PNG", 40, 30),
        "header_late.png": raw[:8] + _png_chunk(b"tEXt", b"k\0v") + raw[8:],  # IHDR must lead
    }


def test_corrupt_pngs_are_unreadable_images_not_crashes(tmp_path):
    """libpng's errors went through a longjmp that torchvision's handler turned into a
    segmentation fault: one corrupt PNG killed a DataLoader worker's epoch, check_data, the
    resident backend's decode. Decoded in a subprocess, so that a crash fails this test."""
    folder = tmp_path / "data" / "a"
    folder.mkdir(parents=True)
    for name, content in _corrupt_pngs().items():
        (folder / name).write_bytes(content)
    _noise().save(folder / "fine.png")
    script = textwrap.dedent("""
        import pathlib, sys
        from fasttrain.data.check import scan
        from fasttrain.data.datasets import read_image
        folder = pathlib.Path(sys.argv[1])
        for path in sorted(folder.glob("*.png")):
            try:
                print(path.name, tuple(read_image(str(path)).shape))
            except ValueError as e:
                print(path.name, e)
        problems = scan(folder.parent, workers=1).problems
        print("problems", sorted(pathlib.Path(path).name for path, _ in problems))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "bad_data.png cannot decode: Error -3 while decompressing data: invalid block type",
        "fine.png (3, 20, 30)",
        "header_late.png cannot decode: the first chunk is not the header (IHDR)",
        "stale_crc.png cannot decode: broken PNG file (bad header checksum in b'IDAT')",
        "too_tall.png cannot decode: not enough image data (1820 of 3640 bytes)",
        "problems ['bad_data.png', 'header_late.png', 'stale_crc.png', 'too_tall.png']",
    ]


def test_jpeg_end_marker_is_looked_for_after_the_image_data(tmp_path):
    """Data appended after the end-of-image marker (phones' motion-photo trailers) made a valid
    JPEG "truncated" for every backend but DALI; an EXIF thumbnail's end marker before the
    image data must not make a truncated image pass."""
    jpeg = _encoded("JPEG")
    assert jpeg.endswith(b"\xff\xd9")
    (tmp_path / "trailer.jpg").write_bytes(jpeg + b"\x00" * 100 + b"TRAILERDATA" * 20)
    (tmp_path / "plain.jpg").write_bytes(jpeg)
    assert torch.equal(read_image(str(tmp_path / "trailer.jpg")),
                       read_image(str(tmp_path / "plain.jpg")))
    # an APP1 segment holding a thumbnail's start-of-scan and end-of-image markers
    thumbnail = b"\xff\xd8\xff\xda\x00\x02thumb\xff\xd9"
    app1 = b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    with_thumbnail = jpeg[:2] + app1 + jpeg[2:]
    (tmp_path / "thumb.jpg").write_bytes(with_thumbnail)
    read_image(str(tmp_path / "thumb.jpg"))
    for name, content in (("cut.jpg", jpeg[: len(jpeg) * 2 // 3]),
                          ("cut_thumb.jpg", with_thumbnail[: len(with_thumbnail) * 2 // 3]),
                          ("cut_header.jpg", jpeg[:40])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="truncated JPEG"):
            read_image(str(tmp_path / name))


def test_default_data_root_follows_the_cache(monkeypatch, tmp_path):
    """FASTTRAIN_DATA, else the cache tools/env.sh uses (FASTTRAIN_CACHE), else ~/.cache."""
    from fasttrain.data import default_root

    monkeypatch.delenv("FASTTRAIN_DATA", raising=False)
    monkeypatch.delenv("FASTTRAIN_CACHE", raising=False)
    assert default_root("digits") == Path.home() / ".cache" / "fasttrain" / "data" / "digits"
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    assert default_root("digits") == tmp_path / "cache" / "data" / "digits"
    monkeypatch.setenv("FASTTRAIN_DATA", str(tmp_path / "data"))
    assert default_root("cifar10") == tmp_path / "data" / "cifar10"
    # A quoted '~/...' reaches the environment as it is: it was a folder named "~".
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FASTTRAIN_DATA", "~/data")
    assert default_root("digits") == tmp_path / "home" / "data" / "digits"
    monkeypatch.delenv("FASTTRAIN_DATA")
    monkeypatch.setenv("FASTTRAIN_CACHE", "~/cache")
    assert default_root("digits") == tmp_path / "home" / "cache" / "data" / "digits"


def _sleep_after(init) -> None:
    init(0)
    time.sleep(30)


def test_loader_workers_leave_ctrl_c_to_the_main_process(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group; a worker that died of it printed
    a ConnectionResetError traceback beside the trainer's one-line message."""
    import signal

    cfg = load(None, ["--data.num_workers=1", "--data.batch_size=8"])
    loaders = build_loaders(cfg.data, cfg.aug)
    init = loaders.train.loader.worker_init_fn
    before = signal.getsignal(signal.SIGINT)
    try:
        init(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    # A group SIGTERM ends a worker quietly (exit 0: no "killed by signal" traceback), and
    # multiprocessing's SIGTERM to leftover workers at exit still ends them (if they ignored
    # it, the process waited for them forever).
    worker = multiprocessing.get_context("fork").Process(target=_sleep_after, args=(init,))
    worker.start()
    time.sleep(0.5)
    worker.terminate()
    worker.join(10)
    assert worker.exitcode == 0


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists() or not hasattr(os, "fork"),
                    reason="needs Linux's /proc/self/smaps_rollup and fork")
def test_forked_workers_reading_every_sample_keep_sharing_the_file_list():
    # DataLoader workers are forked: reading a list of (path, label) tuples writes their
    # reference counts, so each worker copied the pages (~200 MB per worker at ImageNet size).
    from fasttrain.data.datasets import SampleList

    pairs = [(f"/data/train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG", i % 1000)
             for i in range(300_000)]
    compact = SampleList(pairs)
    assert len(compact) == len(pairs) and list(compact) == pairs
    assert compact[7] == pairs[7] and compact[-1] == pairs[-1] and compact[3:5] == pairs[3:5]
    assert compact.labels() == [label for _, label in pairs]
    with pytest.raises(IndexError):
        compact[len(pairs)]

    def private_growth_kib(samples) -> int:
        def private_dirty() -> int:
            for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
                if line.startswith("Private_Dirty:"):
                    return int(line.split()[1])
            raise AssertionError("no Private_Dirty line")

        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: every sample once, scattered, with no list of indices
            try:
                before, n = private_dirty(), len(samples)
                for k in range(n):
                    samples[k * 104729 % n]
                os.write(write, str(private_dirty() - before).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            grown = f.read()
        os.waitpid(pid, 0)
        return int(grown)

    assert private_growth_kib(list(pairs)) > 10_000  # the problem, seen by this measurement
    assert private_growth_kib(compact) < 2_000


def test_an_image_folder_stores_its_samples_compactly(tmp_path):
    from fasttrain.data.datasets import SampleList

    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "x\udcff.jpg")  # not UTF-8 on disk
    dataset = ImageFolderDataset(tmp_path)
    assert isinstance(dataset.samples, SampleList)
    assert list(dataset.samples) == [(str(tmp_path / "a" / "x\udcff.jpg"), 0),
                                     (str(tmp_path / "b" / "x\udcff.jpg"), 1)]
    assert dataset.targets == [0, 1] and dataset[1][1] == 1
