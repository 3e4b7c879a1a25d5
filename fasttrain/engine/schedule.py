"""Learning-rate schedules stepped once per optimizer step (not per epoch)."""
from __future__ import annotations

import math

import torch

from ..config import ScheduleConfig


def warmup_steps(cfg: ScheduleConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the linear LR warmup: steps 0 .. warmup_steps - 1 (0-based)."""
    return round(cfg.warmup_epochs * steps_per_epoch)


def lr_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based).

    Linear warmup from `warmup_start_factor` to 1 over `warmup_epochs`, then cosine to
    `min_lr_factor` at the end of training, step decay by `gamma` at each milestone epoch, or
    constant. The cosine runs from the end of warmup (`cosine_span: after_warmup`, torchvision's
    SequentialLR) or over the whole run with warmup in place of its start (`whole_run`, timm's
    CosineLRScheduler: the LR after warmup is the cosine's value there, just under 1).
    `triangular` (ffcv-imagenet's "cyclic") interpolates linearly, per step, through 1e-4 at
    epoch 0, 1 at `peak_epoch` and 0 at the last epoch.
    """
    if cfg.kind == "triangular":
        epoch = step / steps_per_epoch
        if epoch <= cfg.peak_epoch:
            return 1e-4 + (1 - 1e-4) * epoch / cfg.peak_epoch if cfg.peak_epoch else 1.0
        return max(0.0, (cfg.epochs - epoch) / (cfg.epochs - cfg.peak_epoch))
    total = cfg.epochs * steps_per_epoch
    warmup = warmup_steps(cfg, steps_per_epoch)
    if step < warmup:
        return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / warmup
    if cfg.kind == "cosine":
        start = warmup if cfg.cosine_span == "after_warmup" else 0
        progress = min(1.0, (step - start) / max(1, total - start))
        return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.kind == "step":
        epoch = step / steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch))
