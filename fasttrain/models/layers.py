"""Norm/activation building blocks that the ResNets take as injected factories.

`BatchNormReLU2d` is `nn.BatchNorm2d` followed by ReLU in one module (timm's `BatchNormAct2d`
pattern): it has exactly BatchNorm2d's parameters, buffers and state-dict keys, so a block whose
`bn1` is a BatchNormReLU2d loads a torchvision state dict unchanged. The fused CUDA/CPU kernel
replaces only its `forward`, never the model code.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.bn_relu import BatchNormArguments
from ..ops.bn_relu import BatchNormReLU2d as FusedBatchNormReLU2d

NormLayer = Callable[[int], nn.Module]


class BatchNormReLU2d(BatchNormArguments, nn.BatchNorm2d):
    """`relu(batch_norm(x))` with nn.BatchNorm2d's state and running-stat semantics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript cannot compile super().forward
            running_mean, running_var, training, momentum = self._batch_norm_arguments(x)
            return F.relu(F.batch_norm(x, running_mean, running_var, self.weight, self.bias,
                                       training, momentum, self.eps), inplace=True)
        return F.relu(super().forward(x), inplace=True)


NORM_ACT_LAYERS: dict[str, NormLayer] = {"native": BatchNormReLU2d, "fused": FusedBatchNormReLU2d}
"""`model.norm_act` choices → factory of a norm+ReLU layer for `num_features` channels."""


class SyncBatchNormReLU2d(nn.SyncBatchNorm):
    """`relu(sync_batch_norm(x))`: BatchNormReLU2d with statistics over all ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x), inplace=True)


def convert_sync_batchnorm(module: nn.Module,
                           process_group: Optional[torch.distributed.ProcessGroup] = None
                           ) -> nn.Module:
    """`nn.SyncBatchNorm.convert_sync_batchnorm` that keeps the ReLU of norm+ReLU layers.

    torch's conversion turns every BatchNorm subclass into a plain SyncBatchNorm, so a
    BatchNormReLU2d (native or fused) silently lost its ReLU. Here those become
    SyncBatchNormReLU2d and other BatchNorms torch's SyncBatchNorm, sharing the parameters and
    buffers (state-dict keys unchanged). Modules are replaced in place; returns the root.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        out = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
        if isinstance(module, (BatchNormReLU2d, FusedBatchNormReLU2d)):
            out.__class__ = SyncBatchNormReLU2d  # a subclass adding no state: only forward
        return out
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
