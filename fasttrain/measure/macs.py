"""Parameter and MAC counts with fvcore.

`conv_fc` counts the multiply-accumulates of convolutions and fully-connected layers: what the
pruning literature calls "FLOPs" and what `../shared/reference/thinresnet_counts.csv` lists.
`total` is fvcore's full count, which adds BatchNorm and pooling.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

CONV_FC_OPS = ("conv", "linear", "addmm", "matmul", "bmm", "einsum")


@dataclass(frozen=True)
class MacCount:
    conv_fc: int
    total: int
    by_operator: dict[str, int]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, resolution: int, in_chans: int = 3) -> MacCount:
    """MACs of one image at `resolution` x `resolution` (model traced in eval mode on a copy)."""
    with warnings.catch_warnings():
        # fvcore scripts a loss function at import; torch deprecates jit.script. Not ours to fix.
        # any category: a FutureWarning on torch 2.14, a DeprecationWarning on 2.11
        warnings.filterwarnings("ignore", message=".*torch.jit.script")
        from fvcore.nn import FlopCountAnalysis
        from fvcore.nn.jit_handles import batchnorm_flop_jit

    model = copy.deepcopy(model).eval().float()
    # a module without parameters (a pooling layer alone) was a bare StopIteration
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    x = torch.zeros(1, in_chans, resolution, resolution, device=device)
    # The fused norm+ReLU op takes aten::batch_norm's leading arguments (input, weight, bias,
    # running_mean, running_var, training): counted as the BatchNorm it is, `total` does not
    # depend on model.norm_act (fvcore counted an op it does not know as 0).
    analysis = FlopCountAnalysis(model, x).set_op_handle("fasttrain::bn_relu_forward",
                                                         batchnorm_flop_jit)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with torch.no_grad():
        ops = dict(analysis.by_operator())
    return MacCount(sum(v for k, v in ops.items() if k in CONV_FC_OPS), sum(ops.values()), ops)
