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
    Lamb does internally with max_grad_norm=1.0. One difference: t counts the steps of each
    parameter, as torch's Adam does, where timm counts the group's; the two differ only for a
    parameter left without a gradient on some steps (its moments' bias correction then follows
    its own updates), which no network here has.
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
            # Multi-tensor (foreach) ops over the parameters that share a step count, device
            # and dtype: a few launches per group instead of ~13-19 per parameter.
            batches: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0  # a Python int: no device sync per parameter
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                batches.setdefault((state["step"], p.device, p.dtype), []).append(p)
            for (t, _, _), params in batches.items():
                grads = [p.grad.float() for p in params]
                exp_avg = [self.state[p]["exp_avg"] for p in params]
                exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
                torch._foreach_mul_(exp_avg, beta1)
                torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
                torch._foreach_mul_(exp_avg_sq, beta2)
                torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
                denom = torch._foreach_div(exp_avg_sq, 1 - beta2 ** t)
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, group["eps"])
                update = torch._foreach_div(exp_avg, 1 - beta1 ** t)
                torch._foreach_div_(update, denom)
                if group["weight_decay"] != 0:
                    weights = [p.float() for p in params]
                    torch._foreach_add_(update, weights, alpha=group["weight_decay"])
                    w_norm = torch.stack(torch._foreach_norm(weights))
                    u_norm = torch.stack(torch._foreach_norm(update))
                    one = torch.ones_like(w_norm)
                    trust = torch.where(w_norm > 0,
                                        torch.where(u_norm > 0, w_norm / u_norm, one), one)
                    torch._foreach_mul_(update, list(trust.unbind(0)))
                torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(update, params)],
                                    alpha=-group["lr"])
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
