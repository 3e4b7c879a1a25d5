"""Batch-level mixing (mixup, cutmix), soft targets and the classification losses."""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from ..config import AugConfig, OptimConfig


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(N,) int labels → (N, C) float targets: 1 - s + s/C on the label, s/C elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float, rng: random.Random
               ) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a box of area ~(1 - lam) centred uniformly in the image, clipped at
    the border (torchvision's and timm's rule)."""
    cut = math.sqrt(1.0 - lam)
    cy, cx = rng.randrange(height), rng.randrange(width)
    half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
    return (max(cy - half_h, 0), min(cy + half_h, height),
            max(cx - half_w, 0), min(cx + half_w, width))


class BatchMixer:
    """Mixup / cutmix on a device batch: with probability `mix_prob` the batch is mixed with
    itself rolled by one, by mixup or cutmix (chosen with equal odds when both are on), with
    lambda ~ Beta(alpha, alpha). Targets are the same mixture of smoothed one-hot labels; for
    cutmix lambda is corrected to the pasted box's true area."""

    def __init__(self, aug: AugConfig, num_classes: int, label_smoothing: float) -> None:
        self.mixup, self.cutmix, self.prob = aug.mixup_alpha, aug.cutmix_alpha, aug.mix_prob
        self.num_classes, self.smoothing = num_classes, label_smoothing

    @property
    def enabled(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, rng: random.Random
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Returns (images, targets (N, C), lambda); lambda is 1.0 when the batch is not mixed.
        `images` (N, C, H, W) is modified in place by cutmix."""
        targets = one_hot_smoothed(labels, self.num_classes, self.smoothing)
        if not self.enabled or rng.random() >= self.prob:
            return images, targets, 1.0
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or rng.random() < 0.5)
        lam = rng.betavariate(*(2 * [self.cutmix if use_cutmix else self.mixup]))
        rolled = images.roll(1, 0)
        if use_cutmix:
            height, width = images.shape[-2:]
            y0, y1, x0, x1 = cutmix_box(height, width, lam, rng)
            images[:, :, y0:y1, x0:x1] = rolled[:, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        else:
            images = images.mul(lam).add_(rolled, alpha=1.0 - lam)
        targets = targets.mul(lam).add_(targets.roll(1, 0), alpha=1.0 - lam)
        return images, targets, lam


def classification_loss(cfg: OptimConfig, logits: torch.Tensor, labels: torch.Tensor,
                        targets: torch.Tensor | None) -> torch.Tensor:
    """Mean loss of fp32 logits. `targets` (N, C) are soft targets (mixed and smoothed) or None
    (hard labels; smoothing then applied here for CE).

    ce: softmax cross-entropy. bce: per-class binary cross-entropy with logits averaged over
    N x C (timm's BinaryCrossEntropy); `bce_target_thresh` binarises the targets first.
    """
    logits = logits.float()
    if cfg.loss == "ce":
        if targets is None:
            return F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        return F.cross_entropy(logits, targets)
    if targets is None:
        targets = one_hot_smoothed(labels, logits.shape[1], cfg.label_smoothing)
    if cfg.bce_target_thresh > 0:
        targets = (targets > cfg.bce_target_thresh).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets)
