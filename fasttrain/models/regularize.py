"""Training-time architecture options that keep the state dict unchanged: stochastic depth
(DropPath) and BlurPool before strided convolutions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) on a residual branch: in training, zero the branch of
    each sample with probability `p` and scale survivors by 1/(1-p), so the expectation is kept;
    the identity in eval."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BlurPoolConv2d(nn.Conv2d):
    """A strided Conv2d that first low-passes its input with a 3x3 binomial filter
    ([1,2,1] x [1,2,1] / 16, depthwise, stride 1), as ffcv-imagenet's `BlurPoolConv2d` (after
    Zhang 2019). A subclass rather than a wrapper, so the state dict keys stay the conv's own."""

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        # Built from the input (not torch.tensor): a traced or scripted copy then follows the
        # input's dtype and device instead of baking in a CPU float32 constant.
        ones = x.new_ones(3)
        k = ones + F.pad(ones[1:2], (1, 1))  # [1, 2, 1]
        kernel = (k[:, None] * k[None, :] / 16.0).expand(channels, 1, 3, 3)
        return F.conv2d(x, kernel, padding=1, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # _conv_forward rather than super().forward(): TorchScript cannot script super() calls.
        return self._conv_forward(self._blur(x), self.weight, self.bias)


def apply_blurpool(model: nn.Module, min_channels: int = 16) -> nn.Module:
    """Turn every Conv2d with stride > 1 and >= `min_channels` inputs into a BlurPoolConv2d
    (in place; parameters untouched). Returns `model`."""
    for module in model.modules():
        if (type(module) is nn.Conv2d and max(module.stride) > 1
                and module.in_channels >= min_channels):
            module.__class__ = BlurPoolConv2d
    return model
