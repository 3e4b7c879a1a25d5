"""Optimizer with weight-decay groups chosen by tensor rank, never by parameter name."""
from __future__ import annotations

import torch
from torch import nn

from ..config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool
                 ) -> list[dict]:
    """Two groups: >=2-D tensors (conv/linear weights) with decay, 1-D (norm weights, biases)
    without unless `decay_norm_and_bias`."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 or decay_norm_and_bias else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: OptimConfig, model: nn.Module, device: torch.device
                    ) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    # The fused CUDA kernel updates all parameters in one launch; CPU keeps foreach.
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           fused=device.type == "cuda" or None)
