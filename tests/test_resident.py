"""The resident backend: whole set on the device, batched crop/flip, same contract as torch."""
import io
import os
import random
import warnings
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import encode_jpeg

from fasttrain.config import load
from fasttrain.data import DatasetError, build_loaders
from fasttrain.data import datasets, resident
from fasttrain.data.resident import BatchAugment, random_resized_crop_boxes
from fasttrain.data.transforms import random_resized_crop_params
from fasttrain.engine import train
from fasttrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
GREY_STEP, GREY_BASE = 5, 10  # image i is a constant grey GREY_BASE + GREY_STEP * i


def grey_folder(root: Path, count: int, classes: int = 3, size=(20, 24), val: int = 0) -> Path:
    """ImageFolder of constant-grey JPEGs: an image's identity survives JPEG, crop and resize."""
    for split, n in (("train", count), ("val", val or count)):
        for i in range(n):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            image = torch.full((3, *size), GREY_BASE + GREY_STEP * i, dtype=torch.uint8)
            (folder / f"{i:03d}.jpg").write_bytes(encode_jpeg(image, quality=95).numpy())
    return root


def identities(images: torch.Tensor) -> list[int]:
    """Back from normalised (mean 0.5, std 0.5) batches to the grey index of each image."""
    grey = (images.float() * 0.5 + 0.5) * 255
    return [round((v - GREY_BASE) / GREY_STEP) for v in grey.mean(dim=(1, 2, 3)).tolist()]


def cfg_for(root: Path, *overrides: str):
    return load(ROOT / "recipes" / "quickstart.yaml",
                ["--data.dataset=imagefolder", f"--data.path={root}", "--data.backend=resident",
                 "--data.batch_size=8", "--data.val_batch_size=8", "--data.train_res=16",
                 "--data.val_res=16", "--data.val_resize=16", "--aug.hflip=0.5", *overrides])


@pytest.fixture(scope="module")
def grey_root(tmp_path_factory) -> Path:
    return grey_folder(tmp_path_factory.mktemp("grey"), count=37)


def epoch_batches(loader, epoch: int, start_batch: int = 0):
    loader.set_epoch(epoch, start_batch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_batches_shapes_dtype_layout_and_labels(grey_root):
    cfg = cfg_for(grey_root)
    loaders = build_loaders(cfg.data, cfg.aug, channels_last=True, dtype=torch.bfloat16)
    assert loaders.classes == ["c0", "c1", "c2"] and loaders.num_classes == 3
    assert len(loaders.train) == 37 // 8
    assert (loaders.train_images, loaders.val_images) == (37, 37)
    for images, labels in epoch_batches(loaders.train, 0):
        assert images.shape == (8, 3, 16, 16) and images.dtype == torch.bfloat16
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64
        # Each image's label is the class folder it was written to.
        assert [i % 3 for i in identities(images)] == labels.tolist()
    val = epoch_batches(loaders.val, 0)
    assert [len(y) for _, y in val] == [8, 8, 8, 8, 5]
    ids = [i for x, _ in val for i in identities(x)]
    assert sorted(ids) == list(range(37))


def test_same_seed_same_batches_epochs_differ_and_resume_is_the_tail(grey_root):
    cfg = cfg_for(grey_root)
    a = build_loaders(cfg.data, cfg.aug, seed=3)
    b = build_loaders(cfg.data, cfg.aug, seed=3)
    one, again = epoch_batches(a.train, 1), epoch_batches(b.train, 1)
    assert all(torch.equal(x, y) and torch.equal(l, m) for (x, l), (y, m) in zip(one, again))
    other = epoch_batches(a.train, 2)
    assert [identities(x) for x, _ in one] != [identities(x) for x, _ in other]
    tail = epoch_batches(b.train, 1, start_batch=2)
    assert len(tail) == len(one) - 2
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(tail, one[2:]))
    seeded = build_loaders(cfg.data, cfg.aug, seed=4)
    assert [identities(x) for x, _ in epoch_batches(seeded.train, 1)] != \
        [identities(x) for x, _ in one]


def test_two_ranks_share_every_epoch_without_duplicates_and_val_exactly_once(grey_root):
    cfg = cfg_for(grey_root, "--data.batch_size=8", "--data.val_batch_size=6")
    ranks = [build_loaders(cfg.data, cfg.aug, rank=r, world_size=2, seed=0) for r in (0, 1)]
    assert len(ranks[0].train) == len(ranks[1].train) == (37 // 2) // 4
    for epoch in (0, 1):
        seen = [i for r in ranks for x, _ in epoch_batches(r.train, epoch)
                for i in identities(x)]
        # 4 images per rank per step, 18 per rank per epoch: 16 used, 2 dropped + 1 remainder.
        assert len(seen) == len(set(seen)) == 2 * 4 * 4
    val = [i for r in ranks for x, _ in epoch_batches(r.val, 0) for i in identities(x)]
    assert sorted(val) == list(range(37))


def test_validation_resizes_and_crops_like_the_torch_backend(tmp_path):
    root = tmp_path / "pattern"
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        for i in range(4):
            image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=gen)
            (root / split / "a" / f"{i}.png").write_bytes(
                __import__("torchvision").io.encode_png(image).numpy())
    over = ["--data.val_resize=20", "--data.val_res=18", "--data.batch_size=2",
            "--data.val_batch_size=4"]
    res = build_loaders(cfg_for(root, *over).data, cfg_for(root, *over).aug)
    ref_cfg = cfg_for(root, *over, "--data.backend=torch", "--data.num_workers=0")
    ref = build_loaders(ref_cfg.data, ref_cfg.aug)
    (x, y), = list(res.val)
    (x_ref, y_ref), = list(ref.val)
    assert x.shape == (4, 3, 18, 18)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_crop_boxes_follow_the_torch_backends_distribution():
    """Batched boxes vs the per-sample rule: area fraction, aspect and placement statistics."""
    n, height, width, scale, ratio = 20000, 30, 40, (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = random_resized_crop_boxes(n, height, width, scale, ratio,
                                      torch.Generator().manual_seed(0)).double()
    rng = random.Random(0)
    ref = torch.tensor([random_resized_crop_params(height, width, scale, ratio, rng)
                        for _ in range(n)], dtype=torch.float64)
    for b in (boxes, ref):
        assert (b[:, 2] >= 1).all() and (b[:, 3] >= 1).all()
        assert (b[:, 0] + b[:, 2] <= height).all() and (b[:, 1] + b[:, 3] <= width).all()

    def stats(b):
        area = b[:, 2] * b[:, 3] / (height * width)
        log_aspect = torch.log(b[:, 3] / b[:, 2])
        centre = (b[:, 1] + b[:, 3] / 2) / width
        return [area.mean(), area.std(), log_aspect.mean(), log_aspect.std(), centre.mean()]

    for got, want in zip(stats(boxes), stats(ref)):
        assert abs(got - want) < 0.01, (stats(boxes), stats(ref))
    # A ratio range the image cannot satisfy: both fall back to the same clamped central crop.
    tall = random_resized_crop_boxes(50, 40, 10, (0.9, 1.0), (3.0, 4.0),
                                     torch.Generator().manual_seed(1))
    want = random_resized_crop_params(40, 10, (0.9, 1.0), (3.0, 4.0), random.Random(1))
    assert all(tuple(b) == want for b in tall.tolist())


def test_batched_crop_matches_resized_crop_of_the_same_box():
    """roi_align with adaptive sampling ≈ antialiased resize of the box (up- and downscaling)."""
    gen = torch.Generator().manual_seed(0)
    # Smooth content: differences between bilinear variants are then small and meaningful.
    base = torch.randint(0, 256, (2, 3, 8, 8), generator=gen, dtype=torch.uint8).float()
    images = torch.nn.functional.interpolate(base, size=(48, 48), mode="bilinear").round()
    images = images.to(torch.uint8)
    data = cfg_for(Path("unused"), "--data.train_res=24", "--aug.hflip=0").data
    aug = cfg_for(Path("unused"), "--aug.scale=[1.0,1.0]", "--aug.ratio=[1.0,1.0]",
                  "--aug.hflip=0").aug
    out = BatchAugment(data, aug)(images, 0, torch.Generator().manual_seed(0))
    ref = TF.resize(images, [24, 24], antialias=True).float()
    # A box filter (roi_align) vs a triangle filter (antialiased bilinear): close, not equal.
    assert (out - ref).abs().mean() < 2.0 and (out - ref).abs().max() < 20
    data_up = cfg_for(Path("unused"), "--data.train_res=96", "--aug.hflip=0").data
    up = BatchAugment(data_up, aug)(images, 0, torch.Generator().manual_seed(0))
    ref_up = TF.resize(images, [96, 96], antialias=True).float()
    assert (up - ref_up).abs().mean() < 1.0


def test_pad_random_crop_and_flip_are_exact_shifts():
    """Every output is exactly one zero-padded shift (and maybe mirror) of its input."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(1, 256, (3, 8, 8), generator=gen, dtype=torch.uint8)
    cfg = cfg_for(Path("unused"), "--aug.train_crop=pad_random", "--aug.padding=2",
                  "--data.train_res=8", "--aug.hflip=0.5")
    out = BatchAugment(cfg.data, cfg.aug)(image.repeat(200, 1, 1, 1), 0,
                                          torch.Generator().manual_seed(0))
    padded = TF.pad(image, [2, 2]).float()
    candidates = {(top, left, flip): (padded[:, top:top + 8, left:left + 8].flip(2) if flip
                                      else padded[:, top:top + 8, left:left + 8])
                  for top in range(5) for left in range(5) for flip in (False, True)}
    seen = []
    for sample in out:
        (match,) = [k for k, c in candidates.items() if torch.equal(sample, c)]
        seen.append(match)
    assert {t for t, _, _ in seen} == {l for _, l, _ in seen} == set(range(5))
    assert 70 < sum(f for _, _, f in seen) < 130


@pytest.mark.cuda
@pytest.mark.parametrize("crop", ["pad_random", "random_resized"])
def test_cuda_batch_augment_equals_the_cpu_twin(crop):
    """The same draws (CPU generator) give the same crops and flips on the GPU: exact for the
    integer shifts, within float rounding for roi_align's bilinear crops."""
    images = torch.randint(0, 256, (64, 3, 20, 24), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    cfg = cfg_for(Path("unused"), f"--aug.train_crop={crop}", "--aug.padding=2")
    augment = BatchAugment(cfg.data, cfg.aug)
    cpu = augment(images, 0, torch.Generator().manual_seed(3))
    gpu = augment(images.cuda(), 0, torch.Generator().manual_seed(3)).cpu()
    if crop == "pad_random":
        assert torch.equal(gpu, cpu)
    else:
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-2)  # of 255 levels


def test_unequal_sizes_and_oversized_sets_are_refused(tmp_path, grey_root, monkeypatch):
    root = grey_folder(tmp_path / "mixed", count=4)
    odd = torch.full((3, 10, 10), 50, dtype=torch.uint8)
    (root / "train" / "c0" / "odd.jpg").write_bytes(encode_jpeg(odd).numpy())
    cfg = cfg_for(root, "--data.batch_size=2")
    with pytest.raises(DatasetError, match=r"odd\.jpg: image is \(10, 10\).*resident"):
        build_loaders(cfg.data, cfg.aug)
    monkeypatch.setattr(resident, "MEMORY_SHARE", 1e-9)
    cfg = cfg_for(grey_root)
    with pytest.raises(DatasetError, match="resident is for small sets"):
        build_loaders(cfg.data, cfg.aug)


def _no_decoding(monkeypatch) -> None:
    def decode(*args, **kwargs):
        raise AssertionError("decoded before the memory check")
    monkeypatch.setattr(datasets, "read_image", decode)
    monkeypatch.setattr(datasets, "read_image_box", decode)


def test_a_set_too_large_for_ram_is_refused_before_decoding(grey_root, monkeypatch):
    monkeypatch.setattr(resident, "_available_ram", lambda: 100_000)
    _no_decoding(monkeypatch)
    cfg = cfg_for(grey_root)
    with pytest.raises(DatasetError) as info:
        build_loaders(cfg.data, cfg.aug)
    # 37 training images of 20x24 from the first one's header, 37 validation ones at 16x16
    size = (37 * 20 * 24 + 37 * 16 * 16) * 3 / 1024
    assert str(info.value) == (
        f"{grey_root}: 74 images would take {size:.1f} KiB decoded, more than 50% of the "
        f"97.7 KiB available RAM; data.backend=resident is for small sets: use torch, ffcv or "
        f"dali")


def test_an_image_above_pils_limit_is_passed_over_by_the_size_estimate(tmp_path, monkeypatch):
    """The decode skips an image declaring more than MAX_IMAGE_PIXELS: one sorting first had its
    size taken for every image, and the set was refused as too large for memory. PIL warns
    above the limit and raises above twice it, even for a header read: neither may leak."""
    from PIL import Image

    root = grey_folder(tmp_path / "g", count=6)
    huge = torch.full((3, 200, 240), 90, dtype=torch.uint8)  # 48,000 px
    (root / "train" / "c0" / "000-huge.jpg").write_bytes(encode_jpeg(huge).numpy())
    # a truncated JPEG (a copy cut short), which the decode skips too, sorting before it
    big = encode_jpeg(torch.randint(0, 255, (3, 120, 100), dtype=torch.uint8)).numpy()
    (root / "train" / "c0" / "000-a-cut.jpg").write_bytes(big[:len(big) // 2].tobytes())
    monkeypatch.setattr(resident, "_available_ram", lambda: 20_000)
    _no_decoding(monkeypatch)
    size = (8 * 20 * 24 + 6 * 16 * 16) * 3 / 1024  # 8 training images as the 20x24 ones
    for limit in (40_000, 20_000):  # a warning, then an error, from PIL
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        cfg = cfg_for(root)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(DatasetError, match=rf"14 images would take {size:.1f} KiB "
                                                   rf"decoded"):
                build_loaders(cfg.data, cfg.aug)
        assert Image.MAX_IMAGE_PIXELS == limit


def test_every_rank_on_the_host_counts_against_the_ram(grey_root, monkeypatch):
    """Each local rank decodes its own copy at once: a set fitting alone may not fit 3 times."""
    size = (37 * 20 * 24 + 37 * 16 * 16) * 3
    monkeypatch.setattr(resident, "_available_ram", lambda: int(2.5 * size))  # fits once
    _no_decoding(monkeypatch)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    cfg = cfg_for(grey_root)
    with pytest.raises(DatasetError, match=rf"^{grey_root}: 74 images would take "
                                           rf"{size / 1024:.1f} KiB decoded on each of the 3 "
                                           rf"ranks on this host, more than 50% of the"):
        build_loaders(cfg.data, cfg.aug)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(AssertionError, match="decoded before the memory check"):
        build_loaders(cfg.data, cfg.aug)  # passes the check, then reaches the decode


def test_a_set_too_large_for_the_gpu_is_refused_before_decoding_and_moving(
        grey_root, monkeypatch):
    free = [100_000]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free.pop(0), 2**40))
    cfg = cfg_for(grey_root)
    with monkeypatch.context() as m:
        _no_decoding(m)
        with pytest.raises(DatasetError, match=r"more than 50% of the 97\.7 KiB free memory on "
                                               r"cuda; data\.backend=resident is for small"):
            build_loaders(cfg.data, cfg.aug, device=torch.device("cuda"))
    # Enough before decoding, too little for the exact size when the set is moved.
    free[:] = [2**30, 100_000]
    with pytest.raises(DatasetError, match=r"74 images would take .* KiB decoded, more than 50% "
                                           r"of the 97\.7 KiB free memory on cuda"):
        build_loaders(cfg.data, cfg.aug, device=torch.device("cuda"))
    assert not free


def test_available_ram_is_memavailable_not_memfree(monkeypatch):
    meminfo = "MemTotal:  8000000 kB\nMemFree:  100000 kB\nMemAvailable:  6000000 kB\n"
    monkeypatch.setattr(resident, "open", lambda *a, **k: io.StringIO(meminfo), raising=False)
    assert resident._available_ram() == 6000000 * 1024

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/meminfo")
    monkeypatch.setattr(resident, "open", no_proc, raising=False)
    monkeypatch.setattr(resident.os, "sysconf", {"SC_AVPHYS_PAGES": 3, "SC_PAGE_SIZE": 4096}.get)
    assert resident._available_ram() == 3 * 4096

    def darwin(name):  # macOS's sysconf names no free pages: all of RAM instead of a crash
        if name == "SC_AVPHYS_PAGES":
            raise ValueError("unrecognized configuration name")
        return {"SC_PHYS_PAGES": 5, "SC_PAGE_SIZE": 4096}[name]
    monkeypatch.setattr(resident.os, "sysconf", darwin)
    assert resident._available_ram() == 5 * 4096


def test_unsupported_augmentation_is_a_config_error():
    with pytest.raises(ConfigError, match="data.backend=resident does not implement "
                                          "aug.auto_augment=randaugment"):
        load(ROOT / "recipes" / "quickstart.yaml",
             ["--data.backend=resident", "--aug.auto_augment=randaugment"])
    with pytest.raises(ConfigError, match="data.backend=resident does not implement "
                                          "aug.random_erase"):
        load(ROOT / "recipes" / "quickstart.yaml",
             ["--data.backend=resident", "--aug.random_erase=0.25"])
    with pytest.raises(ConfigError, match="data.backend=dali reads image folders"):
        load(ROOT / "recipes" / "quickstart.yaml",
             ["--data.backend=dali", "--data.dataset=cifar10"])


def test_unreadable_files_are_left_out_and_reported(tmp_path):
    import threading

    root = grey_folder(tmp_path / "bad", count=9)
    (root / "train" / "c1" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    # a FIFO sorting first: the size estimate opened it and waited for a writer for good
    fifo = root / "train" / "c0" / "000-fifo.jpg"
    os.mkfifo(fifo)
    cfg = cfg_for(root, "--data.batch_size=3")
    built = []
    worker = threading.Thread(target=lambda: built.append(build_loaders(cfg.data, cfg.aug)),
                              daemon=True)
    worker.start()
    worker.join(120)
    if worker.is_alive():
        with open(fifo, "wb"):  # lets the blocked open return
            pass
        pytest.fail("build_loaders waited on a FIFO")
    (loaders,) = built
    assert sorted(loaders.train.skipped) == [str(fifo), str(root / "train" / "c1" / "broken.jpg")]
    assert len(loaders.train) == 3


def test_quickstart_trains_on_the_resident_backend(data_root, tmp_path):
    cfg = load(ROOT / "recipes" / "quickstart.yaml",
               [f"--data.path={data_root / 'digits'}", "--data.backend=resident",
                "--schedule.epochs=4", "--schedule.warmup_epochs=1",
                f"--log.dir={tmp_path}", "--log.progress=plain"])
    summary = train(cfg)
    assert summary["val_top1"] > 50  # chance: 10 %; torch backend ~70 % here


def test_raw_uint8_batches_on_request(grey_root):
    """dtype=torch.uint8 skips normalisation (benchmarks, models that normalise themselves)."""
    cfg = cfg_for(grey_root)
    raw = build_loaders(cfg.data, cfg.aug, dtype=torch.uint8)
    images, _ = next(iter(raw.train))
    assert images.dtype == torch.uint8
    grey = images.float().mean(dim=(1, 2, 3))
    assert all(abs(g - GREY_BASE) % GREY_STEP <= 1 or abs(g - GREY_BASE) % GREY_STEP >= 4
               for g in grey.tolist())
    torch_cfg = cfg_for(grey_root, "--data.backend=torch", "--data.num_workers=0")
    ref = build_loaders(torch_cfg.data, torch_cfg.aug, dtype=torch.uint8)
    (x, _), (x_ref, _) = next(iter(raw.val)), next(iter(ref.val))
    assert x.dtype == x_ref.dtype == torch.uint8 and torch.equal(x, x_ref)
