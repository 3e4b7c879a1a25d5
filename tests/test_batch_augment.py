"""Batched TrivialAugmentWide (fasttrain.data.batch_augment, the resident backend's) against
torchvision's per-image operations."""
import math

import pytest
import torch
import torchvision.transforms.v2 as v2

from fasttrain.config import load
from fasttrain.data import build_loaders
from fasttrain.data.batch_augment import SPACE, _pack, _unpack, apply_op, trivial_augment_wide
from fasttrain.errors import ConfigError

POLICY = v2.TrivialAugmentWide()
NAMES = [name for name, _, _ in SPACE]


def images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size): gradients plus noise, different per sample."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = torch.stack([x * 255 / size, y * 255 / size, (x + y) * 127 / size])
    noise = torch.randint(-40, 41, (n, 3, size, size), generator=g)
    return (base[None] * torch.linspace(0.4, 1.0, n).view(-1, 1, 1, 1) + noise).clamp(0, 255
                                                                                     ).to(torch.uint8)


def reference(name: str, image: torch.Tensor, magnitude: float,
              interpolation: str = "bilinear") -> torch.Tensor:
    return POLICY._apply_image_or_video_transform(image, name, magnitude,
                                                  interpolation=v2.InterpolationMode(
                                                      interpolation),
                                                  fill=POLICY._fill)


GEOMETRY = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
# Exact: nearest geometry and the integer-preserving operations. Within half a grey level:
# bilinear geometry, which torchvision rounds to uint8. Within 1: the blends, where torchvision
# truncates to uint8 and the batched path keeps the fraction.
EXACT = {"Posterize", "Solarize", "Equalize", "Identity"}


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("name", NAMES)
def test_each_operation_matches_torchvision_per_sample(name, interpolation):
    batch = images()
    _, magnitudes, signed = SPACE[NAMES.index(name)]
    if magnitudes is None:
        mags = torch.zeros(len(batch))
    else:  # a different bin and sign per sample, extremes included
        bins = torch.tensor([0, 30, 7, 15, 22, 30])
        mags = magnitudes[bins].to(torch.float32)
        if signed:
            mags = mags * torch.tensor([1, -1, 1, -1, -1, 1])
    got = apply_op(name, batch.float(), mags, interpolation)
    for i in range(len(batch)):
        ref = reference(name, batch[i], float(mags[i]), interpolation).float()
        diff = (got[i] - ref).abs()
        if name in EXACT or (name in GEOMETRY and interpolation == "nearest"):
            assert diff.max() == 0, (name, i, float(mags[i]), diff.max())
        elif name in GEOMETRY:
            assert diff.max() <= 0.5 + 1e-3, (name, i, float(mags[i]), diff.max())
        else:  # Sharpness: torchvision also rounds the blur, weighted by up to 1.99
            bound = 1.0 + (0.5 * abs(float(mags[i])) if name == "Sharpness" else 0.0)
            assert diff.max() <= bound, (name, i, float(mags[i]), diff.max())


def test_affine_operations_on_a_non_square_batch_match_torchvision():
    batch = images(4, 32)[:, :, :24, :]  # H != W: centres and grid scales differ per axis
    for name in ("ShearX", "ShearY", "TranslateX", "Rotate"):
        _, magnitudes, _ = SPACE[NAMES.index(name)]
        mags = magnitudes[torch.tensor([3, 12, 25, 30])].to(torch.float32) * torch.tensor(
            [1, -1, 1, -1])
        got = apply_op(name, batch.float(), mags, "nearest")
        smooth = apply_op(name, batch.float(), mags)
        for i in range(4):
            ref = reference(name, batch[i], float(mags[i]), "nearest").float()
            assert torch.equal(got[i], ref), name
            ref = reference(name, batch[i], float(mags[i])).float()
            assert (smooth[i] - ref).abs().max() <= 0.5 + 1e-3, name


def test_draws_cover_every_operation_bin_and_sign_and_follow_the_generator():
    batch = images(4096 // 64, 8).repeat(64, 1, 1, 1).float()
    a = trivial_augment_wide(batch, torch.Generator().manual_seed(1))
    b = trivial_augment_wide(batch, torch.Generator().manual_seed(1))
    c = trivial_augment_wide(batch, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(1)
    ops = torch.randint(len(SPACE), (len(batch),), generator=g)
    counts = torch.bincount(ops, minlength=len(SPACE)).float()
    expected = len(batch) / len(SPACE)
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()
    changed = (a != batch).flatten(1).any(1)
    identity = ops == NAMES.index("Identity")
    assert not changed[identity].any() and changed[~identity].float().mean() > 0.8


def test_resident_backend_accepts_trivialaugment_and_randaugment_stays_an_error(data_root):
    base = ["--data.dataset=digits", f"--data.path={data_root / 'digits'}",
            "--data.backend=resident", "--data.batch_size=64", "--data.train_res=32",
            "--aug.train_crop=pad_random", "--aug.padding=4"]
    cfg = load(None, base + ["--aug.auto_augment=trivialaugment"])
    loaders = build_loaders(cfg.data, cfg.aug, channels_last=True, seed=0)
    plain = load(None, base)
    plain_loaders = build_loaders(plain.data, plain.aug, channels_last=True, seed=0)
    loaders.train.set_epoch(0)
    plain_loaders.train.set_epoch(0)
    (x, y), (x0, y0) = next(iter(loaders.train)), next(iter(plain_loaders.train))
    assert x.shape == x0.shape == (64, 3, 32, 32) and torch.equal(y, y0)
    assert not torch.equal(x, x0)  # augmented on top of the same crops and flips
    nearest = load(None, base + ["--aug.auto_augment=trivialaugment",
                                 "--aug.auto_augment_interpolation=nearest"])
    nearest_loaders = build_loaders(nearest.data, nearest.aug, channels_last=True, seed=0)
    nearest_loaders.train.set_epoch(0)
    x1, y1 = next(iter(nearest_loaders.train))
    assert torch.equal(y1, y)
    # the same draws: only the rotated, sheared and translated samples differ
    differ = (x1 != x).flatten(1).any(1)
    assert 0 < int(differ.sum()) < len(x)
    with pytest.raises(ConfigError, match="does not implement aug.auto_augment=randaugment"):
        load(None, base + ["--aug.auto_augment=randaugment"])


@pytest.mark.cuda
def test_cuda_batches_equal_the_cpu_twin():
    batch = images(64, 32).float()
    cpu = trivial_augment_wide(batch, torch.Generator().manual_seed(5))
    gpu = trivial_augment_wide(batch.cuda(), torch.Generator().manual_seed(5)).cpu()
    # Same draws (CPU generator); float rounding on the GPU may move a nearest-neighbour pick
    # that sits on a pixel boundary, or a blend by a fraction of a level.
    diff = (gpu - cpu).abs()
    assert diff.gt(1.0).float().mean() < 1e-3 and diff.mean() < 0.05


def test_parameters_cross_to_the_device_exactly():
    """The one-transfer packing of a batch's parameters (indices, magnitudes, float64 matrices,
    flips) gives back every value bit for bit, in its own dtype and shape."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randperm(1000, generator=g), torch.randn(37, generator=g),
               torch.randn(5, 2, 3, dtype=torch.float64, generator=g),
               torch.tensor([2**40 + 1, -3]), torch.rand(9, generator=g) < 0.5, torch.zeros(0)]
    back = _unpack(_pack(tensors), tensors)
    for a, b in zip(tensors, back):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
