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


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019) as timm's `Lamb` computes it, written out because torch has none.

    Per parameter p with gradient g, at step t:
        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)  +  weight_decay * p
        r = ||p|| / ||u||  (1 when either norm is 0; only where weight_decay != 0)
        p = p - lr * r * u
    Global gradient-norm clipping is done by the training loop (optim.max_grad_norm), as timm's
    Lamb does internally with max_grad_norm=1.0.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0  # a Python int: no device sync per parameter
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                update = (exp_avg / (1 - beta1 ** t)).div_(denom)
                if group["weight_decay"] != 0:
                    update.add_(p.float(), alpha=group["weight_decay"])
                    w_norm, u_norm = p.float().norm(), update.norm()
                    one = torch.ones_like(w_norm)
                    trust = torch.where(w_norm > 0,
                                        torch.where(u_norm > 0, w_norm / u_norm, one), one)
                    update.mul_(trust)
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


def effective_lr(cfg: OptimConfig, global_batch: int) -> float:
    """`cfg.lr`, linearly rescaled to `global_batch` when `lr_reference_batch` is set."""
    if cfg.lr_reference_batch:
        return cfg.lr * global_batch / cfg.lr_reference_batch
    return cfg.lr


def build_optimizer(cfg: OptimConfig, model: nn.Module, device: torch.device,
                    global_batch: int) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    lr = effective_lr(cfg, global_batch)
    if cfg.name == "lamb":
        return Lamb(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    # The fused CUDA kernel updates all parameters in one launch; CPU keeps foreach.
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           fused=device.type == "cuda" or None)
