"""Norm/activation building blocks that the ResNets take as injected factories.

`BatchNormReLU2d` is `nn.BatchNorm2d` followed by ReLU in one module (timm's `BatchNormAct2d`
pattern): it has exactly BatchNorm2d's parameters, buffers and state-dict keys, so a block whose
`bn1` is a BatchNormReLU2d loads a torchvision state dict unchanged. The fused CUDA/CPU kernel
replaces only its `forward`, never the model code.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.bn_relu import BatchNormReLU2d as FusedBatchNormReLU2d

NormLayer = Callable[[int], nn.Module]


class BatchNormReLU2d(nn.BatchNorm2d):
    """`relu(batch_norm(x))` with nn.BatchNorm2d's state and running-stat semantics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x), inplace=True)


NORM_ACT_LAYERS: dict[str, NormLayer] = {"native": BatchNormReLU2d, "fused": FusedBatchNormReLU2d}
"""`model.norm_act` choices → factory of a norm+ReLU layer for `num_features` channels."""
