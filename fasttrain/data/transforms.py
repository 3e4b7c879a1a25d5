"""Per-sample augmentation on uint8 (C, H, W) tensors, and batched normalisation on the device.

The random parameters are drawn from a `random.Random` the caller seeds per sample, and the pixel
work is done by torchvision's functional ops. torchvision's transform classes draw from torch's
global RNG instead: isolating that per sample (`torch.random.fork_rng`) costs ~250 us, more than
decoding and cropping a small image together, and the classes add ~100 us of dispatch each.
"""
from __future__ import annotations

import math
import random
from typing import Any, NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF

from ..config import AugConfig, DataConfig
from . import resize


def _random_box(height: int, width: int, scale: tuple[float, float],
                ratio: tuple[float, float], rng: random.Random, *, erasing: bool = False
                ) -> tuple[int, int, int, int] | None:
    """A box with area uniform in `scale` of the image and log aspect ratio uniform in `ratio`,
    placed uniformly; None after 10 failed tries (torchvision's sampling rules).

    `RandomResizedCrop.get_params` takes the ratio as w/h and lets the box fill the image;
    `RandomErasing.get_params` (`erasing`) takes it as h/w and wants the box strictly smaller
    than the image on both sides."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        along = int(round(math.sqrt(target_area * aspect)))
        across = int(round(math.sqrt(target_area / aspect)))
        h, w = (along, across) if erasing else (across, along)
        fits = (0 < h < height and 0 < w < width) if erasing else (0 < h <= height
                                                                     and 0 < w <= width)
        if fits:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return None


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float],
                               ratio: tuple[float, float], rng: random.Random
                               ) -> tuple[int, int, int, int]:
    """(top, left, h, w) drawn like torchvision's `RandomResizedCrop.get_params`: area uniform in
    `scale` of the image, log aspect ratio uniform in `ratio`, 10 tries, then a central crop
    clamped to `ratio`."""
    box = _random_box(height, width, scale, ratio, rng)
    if box is not None:
        return box
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def progressive_resolution(data: DataConfig, epoch: int) -> int:
    """Training resolution of `epoch` (0-based): `train_res`, or with progressive resizing
    (`min_res` > 0) min_res up to `start_ramp`, max_res from `end_ramp`, and in between the
    linear interpolation rounded to a multiple of 32 (ffcv-imagenet's `get_resolution`), kept
    within [min_res, max_res] (rounding alone gives 0 px for min_res 8, or 32 px above a
    max_res of 24, when the ends are not multiples of 32)."""
    if not data.min_res:
        return data.train_res
    if epoch <= data.start_ramp:
        return data.min_res
    if epoch >= data.end_ramp:
        return data.max_res
    interp = np.interp(epoch, [data.start_ramp, data.end_ramp], [data.min_res, data.max_res])
    return min(max(int(np.round(interp / 32)) * 32, data.min_res), data.max_res)


class AutoAugment:
    """TrivialAugmentWide or RandAugment with torchvision's operations and magnitude bins, the
    choices drawn from the caller's per-sample generator.

    RandAugment's magnitude is a level out of 10 (timm's scale, `rand-m7-mstd0.5`): each
    operation uses level ~ N(magnitude, magnitude_std) clipped to [0, 10], mapped onto
    torchvision's 31 bins, and is applied with probability `randaug_prob` (timm's RandAugment
    applies each of its operations with probability 0.5, torchvision's always).
    torchvision's operation set and magnitude ranges are used: timm's adds Invert and SolarizeAdd
    and has no Identity, and its `inc1` Posterize keeps 4 down to 0 bits where torchvision's
    keeps 8 down to 4 (2 bits against 5 at level 7).
    """

    BINS = 31

    def __init__(self, aug: AugConfig) -> None:
        self.kind, self.ops = aug.auto_augment, aug.randaug_ops
        self.magnitude, self.magnitude_std = aug.randaug_magnitude, aug.randaug_magnitude_std
        self.prob = aug.randaug_prob if self.kind == "randaugment" else 1.0
        interpolation = v2.InterpolationMode(aug.auto_augment_interpolation)
        self.policy = (v2.TrivialAugmentWide(interpolation=interpolation)
                       if self.kind == "trivialaugment"
                       else v2.RandAugment(interpolation=interpolation))
        self.space = sorted(self.policy._AUGMENTATION_SPACE.items())

    # The space holds torchvision's lambdas, which cannot be pickled; spawn and forkserver
    # workers (macOS, Python >= 3.14 on Linux) receive the augmentation pickled.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "space"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.space = sorted(self.policy._AUGMENTATION_SPACE.items())

    def _level(self, rng: random.Random) -> int:
        if self.kind == "trivialaugment":
            return rng.randrange(self.BINS)
        level = self.magnitude
        if self.magnitude_std > 0:
            level = min(10.0, max(0.0, rng.gauss(level, self.magnitude_std)))
        return int(round(level / 10 * (self.BINS - 1)))

    def __call__(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        height, width = image.shape[-2:]
        for _ in range(1 if self.kind == "trivialaugment" else self.ops):
            name, (magnitudes_fn, signed) = self.space[rng.randrange(len(self.space))]
            # timm draws the operation, then whether to apply it; at 1 nothing is drawn, so
            # the per-sample stream (and every earlier run) is unchanged.
            if self.prob < 1 and rng.random() >= self.prob:
                continue
            magnitudes = magnitudes_fn(self.BINS, height, width)
            magnitude = 0.0
            if magnitudes is not None:
                magnitude = float(magnitudes[self._level(rng)])
                if signed and rng.random() < 0.5:
                    magnitude = -magnitude
            image = self.policy._apply_image_or_video_transform(
                image, name, magnitude, interpolation=self.policy.interpolation,
                fill=self.policy._fill)
        return image


def random_erase_box(height: int, width: int, rng: random.Random,
                     scale: tuple[float, float] = (0.02, 0.33),
                     ratio: tuple[float, float] = (0.3, 3.3)) -> tuple[int, int, int, int] | None:
    """(top, left, h, w) by torchvision `RandomErasing.get_params`' rule; None (erase nothing)
    after 10 failed tries."""
    return _random_box(height, width, scale, ratio, rng, erasing=True)


class TrainAugment:
    """Random crop (RandomResizedCrop, or zero-pad + random crop), horizontal flip, then the
    optional auto-augment policy and random erasing (filled with the mean colour, which is what
    erasing to 0 after normalisation gives)."""

    def __init__(self, data: DataConfig, aug: AugConfig) -> None:
        self.data, self.aug = data, aug
        self.auto = AutoAugment(aug) if aug.auto_augment != "none" else None
        self.erase_fill = torch.tensor([round(m * 255) for m in data.mean],
                                       dtype=torch.uint8)[:, None, None]

    @property
    def crops_at_decode(self) -> bool:
        """True when the crop box can be chosen from the image size alone (RandomResizedCrop), so
        a loader may decode only the box (`crop_box`, then `after_crop`)."""
        return self.aug.train_crop == "random_resized"

    def crop_box(self, height: int, width: int, rng: random.Random
                 ) -> tuple[int, int, int, int]:
        """RandomResizedCrop's (top, left, h, w) for a height x width image: the first draws
        from `rng`, as in __call__."""
        return random_resized_crop_params(height, width, self.aug.scale, self.aug.ratio, rng)

    def after_crop(self, crop: torch.Tensor, rng: random.Random, size: int,
                   pending: bool = False) -> torch.Tensor | PendingCrop:
        """The rest of __call__ for a RandomResizedCrop box already cut out (maybe downscaled
        while decoding): resize to `size` (the epoch's resolution, `progressive_resolution`),
        then flip, auto-augment, erasing.

        `pending`: when only the resize and flip remain (no auto-augment, no erasing), fasttrain's
        resize function is built and the crop's pixels are packed (H, W, 3) memory (decoded
        crops are), return them as a `PendingCrop` instead, with the flip drawn: the collate
        function resizes it straight into the batch (`loader.RecyclingCollate`). The same
        draws from `rng` either way."""
        pixels = crop.permute(1, 2, 0)
        if (pending and self.auto is None and self.aug.random_erase == 0 and resize.AVAILABLE
                and resize.is_packed_rgb(pixels)):
            flip = self.aug.hflip > 0 and rng.random() < self.aug.hflip
            return PendingCrop(pixels, size, flip)
        return self._finish(resize_square(crop, size), rng, size)

    def __call__(self, image: torch.Tensor, rng: random.Random, epoch: int = 0) -> torch.Tensor:
        _, height, width = image.shape  # (C, H, W) uint8
        size, aug = progressive_resolution(self.data, epoch), self.aug
        if aug.train_crop == "random_resized":
            top, left, h, w = self.crop_box(height, width, rng)
            image = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        else:
            pad = aug.padding
            # Pad at least enough for a `size` crop, like RandomCrop(pad_if_needed=True).
            pad_h, pad_w = max(pad, (size - height + 1) // 2), max(pad, (size - width + 1) // 2)
            if pad_h or pad_w:
                image = TF.pad(image, [pad_w, pad_h])
            top = rng.randint(0, image.shape[1] - size)
            left = rng.randint(0, image.shape[2] - size)
            image = image[:, top:top + size, left:left + size]
        return self._finish(image, rng, size)

    def _finish(self, image: torch.Tensor, rng: random.Random, size: int) -> torch.Tensor:
        aug = self.aug
        if aug.hflip > 0 and rng.random() < aug.hflip:
            image = horizontal_flip(image)
        if self.auto is not None:
            image = self.auto(image, rng)
        if aug.random_erase > 0 and rng.random() < aug.random_erase:
            box = random_erase_box(size, size, rng)
            if box is not None:
                top, left, h, w = box
                image = image.clone()
                image[:, top:top + h, left:left + w] = self.erase_fill
        return channels_last_sample(image)


class PendingCrop(NamedTuple):
    """A training crop whose resize to size x size (and flip) is left to whoever writes the
    batch: `write` puts it into a row of the batch with one C call (`resize.resize_rgb`), where
    `finish()` + a copy would make a tensor per image and pass three of torch's dispatches.
    `finish()` is what `TrainAugment.after_crop` would have returned.

    Deferring the resize costs memory and cache: a worker holds its batch's decoded crops until
    the batch is written (a box at least twice the output size is decoded at a reduced DCT
    scale, so ~(2 size)^2 pixels each at most for ordinary photos), and the resize reads a crop
    that has left the cache. Still, it is the cheapest order measured: 0.945 of the CPU per
    image of torch's ops, against 0.985 for the C call right after the decode plus the copy into
    the batch (each timed like benchmarks/bench_native_resize.py's one-process row)."""

    pixels: torch.Tensor  # (H, W, 3) uint8, packed pixels (rows may be further apart)
    size: int
    flip: bool

    def write(self, out: torch.Tensor) -> None:
        """out (size, size, 3), contiguous = the finished image."""
        resize.resize_rgb(self.pixels, self.size, self.size, self.flip, out)

    def finish(self) -> torch.Tensor:
        """The finished (3, size, size) image, in (H, W, C) memory."""
        return resize.resize_rgb(self.pixels, self.size, self.size, self.flip).permute(2, 0, 1)


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """TF.resize(image, [size, size], antialias=True), pixel for pixel. A uint8 CPU image in
    (H, W, C) memory (a decoded crop) goes to `interpolate` directly, restrided as torchvision
    does so that the output keeps that layout and torch's uint8 kernel runs: torchvision's
    dispatch is ~10 % of the resize of a crop to 224 (193 vs 174 us)."""
    channels, height, width = image.shape
    if (image.dtype != torch.uint8 or image.device.type != "cpu"
            or not image.permute(1, 2, 0).is_contiguous() or (height, width) == (size, size)):
        return TF.resize(image, [size, size], antialias=True)
    batch = image.as_strided((1, channels, height, width),
                             (height * width * channels, 1, width * channels, channels))
    return torch.nn.functional.interpolate(batch, size=(size, size), mode="bilinear",
                                           align_corners=False, antialias=True)[0]


def horizontal_flip(image: torch.Tensor) -> torch.Tensor:
    """TF.horizontal_flip, in the image's (H, W, C) memory when it has it (the crops): flipping
    that dimension of the (H, W, C) view is 2x faster than flipping the strided (C, H, W) view
    (22 vs 50 us for 224x224, with torchvision's dispatch), and keeps the layout."""
    hwc = image.permute(1, 2, 0)
    if hwc.is_contiguous():
        return hwc.flip(1).permute(2, 0, 1)
    return TF.horizontal_flip(image)


def channels_last_sample(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) whose memory is (H, W, C), a no-op when it already is (the resize kernels'
    output): batches of such samples stack without a transposing copy into the channels-last
    layout training uses (`loader.RecyclingCollate`)."""
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)


class ValTransform:
    """Resize the shorter side to `val_resize` (skipped when already there), center-crop
    `val_res`; the result in (H, W, C) memory (`channels_last_sample`).

    Why the packed copy: the crop is a view into the resized image, and a batch of views goes
    through default_collate (a fresh shared-memory buffer per batch and a transposing copy);
    packed samples are stacked into the workers' reused buffers (`loader.RecyclingCollate`):
    the torch backend's validation ran 1.14x the images/s (2 workers, 500x375 JPEGs, medians of
    8 alternating epochs), for a 150 KB copy per 224 px image."""

    def __init__(self, data: DataConfig) -> None:
        self.resize, self.crop = data.val_resize, data.val_res

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if min(image.shape[1:]) != self.resize:
            image = TF.resize(image, [self.resize], antialias=True)
        if tuple(image.shape[1:]) != (self.crop, self.crop):
            image = TF.center_crop(image, [self.crop, self.crop])
        return channels_last_sample(image)


class Normalize(torch.nn.Module):
    """uint8 batch (N, C, H, W) → (x/255 - mean) / std in `dtype` (the training input dtype),
    computed in float32 with one fused multiply-add. `dtype=torch.uint8` asks for the raw
    pixels instead (a float batch is rounded back): loader benchmarks, models that normalise
    themselves."""

    def __init__(self, mean: list[float], std: list[float],
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype
        std_t = torch.tensor(std, dtype=torch.float32) * 255.0
        self.register_buffer("scale", (1.0 / std_t).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (-torch.tensor(mean) * 255.0 / std_t).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.uint8:  # raw pixels requested: no normalisation
            if images.dtype == torch.uint8:
                return images
            return images.round().clamp_(0, 255).to(torch.uint8)
        # uint8 in: the kernel converts as it reads (type promotion), so no float32 copy of the
        # batch is written and read back first (one kernel and ~150 MB of traffic per 224 px
        # step of 256 images less on a GPU); the values are those of the float32 formula.
        return torch.addcmul(self.shift, images, self.scale).to(self.dtype)
