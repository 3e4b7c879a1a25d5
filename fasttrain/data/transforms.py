"""Per-sample augmentation on uint8 (C, H, W) tensors, and batched normalisation on the device.

The random parameters are drawn from a `random.Random` the caller seeds per sample, and the pixel
work is done by torchvision's functional ops. torchvision's transform classes draw from torch's
global RNG instead: isolating that per sample (`torch.random.fork_rng`) costs ~250 us, more than
decoding and cropping a small image together, and the classes add ~100 us of dispatch each.
"""
from __future__ import annotations

import math
import random

import torch
import torchvision.transforms.v2.functional as TF

from ..config import AugConfig, DataConfig


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float],
                               ratio: tuple[float, float], rng: random.Random
                               ) -> tuple[int, int, int, int]:
    """(top, left, h, w) drawn like torchvision's `RandomResizedCrop.get_params`: area uniform in
    `scale` of the image, log aspect ratio uniform in `ratio`, 10 tries, then a central crop
    clamped to `ratio`."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainAugment:
    """Random crop (RandomResizedCrop, or zero-pad + random crop) and horizontal flip."""

    def __init__(self, data: DataConfig, aug: AugConfig) -> None:
        self.size, self.aug = data.train_res, aug

    def __call__(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        _, height, width = image.shape  # (C, H, W) uint8
        size, aug = self.size, self.aug
        if aug.train_crop == "random_resized":
            top, left, h, w = random_resized_crop_params(height, width, aug.scale, aug.ratio, rng)
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
        if aug.hflip > 0 and rng.random() < aug.hflip:
            image = TF.horizontal_flip(image)
        return image.contiguous()


class ValTransform:
    """Resize the shorter side to `val_resize` (skipped when already there), center-crop
    `val_res`."""

    def __init__(self, data: DataConfig) -> None:
        self.resize, self.crop = data.val_resize, data.val_res

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if min(image.shape[1:]) != self.resize:
            image = TF.resize(image, [self.resize], antialias=True)
        if tuple(image.shape[1:]) != (self.crop, self.crop):
            image = TF.center_crop(image, [self.crop, self.crop])
        return image


class Normalize(torch.nn.Module):
    """uint8 batch (N, C, H, W) → float, (x/255 - mean) / std, in one fused multiply-add."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32) * 255.0
        self.register_buffer("scale", (1.0 / std_t).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (-torch.tensor(mean) * 255.0 / std_t).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, images.float(), self.scale)
