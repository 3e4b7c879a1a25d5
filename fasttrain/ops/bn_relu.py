"""Fused BatchNorm + ReLU: `relu(batch_norm(x, ...))` in one operator, with nn.BatchNorm2d's
semantics, and the `BatchNormReLU2d` module that uses it.

Three dispatcher ops (schemas in csrc/fasttrain.cpp; CPU and CUDA kernels share csrc/bn_relu.h):

- `fasttrain::bn_relu_forward(x, weight, bias, running_mean, running_var, training, eps)
  -> (y, mean, var)`: training normalises with the batch mean and biased variance (fp32
  statistics, Welford), eval with the running ones; returns them (fp32, fp64 for fp64 x).
- `fasttrain::bn_relu_backward(grad_y, x, weight, bias, mean, var, training, eps)
  -> (grad_x, grad_weight, grad_bias)`.
- `fasttrain::bn_update_running_stats(running_mean!, running_var!, mean, var, momentum, count)`:
  the running-statistics update, in place (unbiased variance), kept apart so that the forward
  stays functional, which `register_autograd` requires.

What backward keeps: x (the BatchNorm input) and the per-channel fp32 mean and var, nothing
else; the ReLU mask and the normalised input are recomputed from x. The output y is not saved
(the following convolution saves it anyway). Recomputing from y instead of x (inplace-ABN) is
impossible with ReLU: where y was clipped to 0, x-hat is lost, and the training-mode grad_x needs
it at every position (grad_x = scale * (gy - mean(gy) - x_hat * mean(gy * x_hat))).

Every native op has a pure-PyTorch twin here (`*_reference`), and `bn_relu` falls back to
`bn_relu_reference` (plain `F.batch_norm` + `F.relu`) when the kernels are missing for the
input's device (one warning); `BatchNormReLU2d` does so under TorchScript too.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ext

__all__ = ["BatchNormReLU2d", "bn_relu", "bn_relu_reference", "bn_relu_forward_reference",
           "bn_relu_backward_reference", "bn_update_running_stats_reference"]


def _kernel_layout(x: Tensor) -> torch.memory_format:
    """The layout the kernels read x in and write y/grad_x in (csrc/checks.h, bn_geometry)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- pure-PyTorch twins of the native ops (same contracts, used by tests and as documentation) --

def _coef(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
          eps: float, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    invstd = 1.0 / torch.sqrt(var.to(acc) + eps)
    scale = invstd * weight.to(acc) if weight is not None else invstd
    shift = bias.to(acc) if bias is not None else torch.zeros_like(invstd)
    return invstd[:, None, None], scale[:, None, None], shift[:, None, None]  # (C, 1, 1)


def bn_relu_forward_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                              running_mean: Optional[Tensor], running_var: Optional[Tensor],
                              training: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Twin of `fasttrain::bn_relu_forward`: (y, mean, var) with var the biased variance."""
    acc = _acc_dtype(x.dtype)
    xa = x.to(acc)
    if training:
        var, mean = torch.var_mean(xa, dim=(0, 2, 3), correction=0)
    else:
        mean, var = running_mean.to(acc).clone(), running_var.to(acc).clone()
    _, scale, shift = _coef(mean, var, weight, bias, eps, acc)
    y = torch.relu((xa - mean[:, None, None]) * scale + shift).to(x.dtype)
    return y.contiguous(memory_format=_kernel_layout(x)), mean, var


def bn_relu_backward_reference(grad_out: Tensor, x: Tensor, weight: Optional[Tensor],
                               bias: Optional[Tensor], mean: Tensor, var: Tensor, training: bool,
                               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Twin of `fasttrain::bn_relu_backward`: (grad_x, grad_weight, grad_bias)."""
    acc = _acc_dtype(x.dtype)
    xa, g = x.to(acc), grad_out.to(acc)
    invstd, scale, shift = _coef(mean, var, weight, bias, eps, acc)
    centred = xa - mean.to(acc)[:, None, None]
    gy = torch.where(centred * scale + shift <= 0, torch.zeros_like(g), g)  # NaN passes, as aten
    xhat = centred * invstd
    sum_gy, sum_gy_xhat = gy.sum((0, 2, 3)), (gy * xhat).sum((0, 2, 3))
    if training:
        count = x.numel() // x.shape[1]
        mean_gy = (sum_gy / count)[:, None, None]
        mean_gy_xhat = (sum_gy_xhat / count)[:, None, None]
        gx = scale * (gy - mean_gy - xhat * mean_gy_xhat)
    else:
        gx = scale * gy
    gx = gx.to(x.dtype).contiguous(memory_format=_kernel_layout(x))
    return (gx, sum_gy_xhat.to(weight.dtype if weight is not None else acc),
            sum_gy.to(bias.dtype if bias is not None else acc))


def bn_update_running_stats_reference(running_mean: Tensor, running_var: Tensor, mean: Tensor,
                                      var: Tensor, momentum: float, count: int) -> None:
    """Twin of `fasttrain::bn_update_running_stats`: nn.BatchNorm2d's update, in place."""
    if count == 0:
        return
    unbias = count / (count - 1) if count > 1 else float("inf")
    acc = _acc_dtype(running_mean.dtype)
    with torch.no_grad():
        running_mean.copy_(momentum * mean.to(acc) + (1 - momentum) * running_mean.to(acc))
        running_var.copy_(momentum * var.to(acc) * unbias + (1 - momentum) * running_var.to(acc))


def bn_relu_reference(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                      training: bool = False, momentum: float = 0.1,
                      eps: float = 1e-5) -> Tensor:
    """The semantics `bn_relu` implements, in plain PyTorch: relu(F.batch_norm(...))."""
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))


# ---- registrations: fake kernels (torch.compile, opcheck) and the autograd formula -------------

if _ext.HAS_EXT:

    @torch.library.register_fake("fasttrain::bn_relu_forward")
    def _forward_fake(x, weight, bias, running_mean, running_var, training, eps):
        acc = _acc_dtype(x.dtype)
        y = torch.empty_like(x.contiguous(memory_format=_kernel_layout(x)))
        return y, x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)

    @torch.library.register_fake("fasttrain::bn_relu_backward")
    def _backward_fake(grad_out, x, weight, bias, mean, var, training, eps):
        acc = _acc_dtype(x.dtype)
        gx = torch.empty_like(x.contiguous(memory_format=_kernel_layout(x)))
        gw = x.new_empty((x.shape[1],), dtype=weight.dtype if weight is not None else acc)
        gb = x.new_empty((x.shape[1],), dtype=bias.dtype if bias is not None else acc)
        return gx, gw, gb

    @torch.library.register_fake("fasttrain::bn_update_running_stats")
    def _update_fake(running_mean, running_var, mean, var, momentum, count):
        return None

    def _setup_context(ctx, inputs, output):
        x, weight, bias, running_mean, _running_var, training, eps = inputs
        _y, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        # x, not y: see the module docstring (ReLU is not invertible where it clips).
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.training, ctx.eps = training, eps
        # eval: the dtype F.batch_norm met (fp32 buffers with bf16/fp16 x under autocast)
        ctx.stats_dtype = running_mean.dtype if running_mean is not None else x.dtype

    def _backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, bias, mean, var = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the native backward has no derivative
            inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
            with torch.enable_grad():
                stats = (None, None) if ctx.training else \
                    (mean.to(ctx.stats_dtype), var.to(ctx.stats_dtype))
                y = F.relu(F.batch_norm(x, *stats, weight, bias,
                                        ctx.training, 0.0, ctx.eps))
                grads = iter(torch.autograd.grad(y, inputs, grad_y, create_graph=True,
                                                 allow_unused=True))
            out = [next(grads) if t is not None and t.requires_grad else None
                   for t in (x, weight, bias)]
            return (*out, None, None, None, None)
        gx, gw, gb = torch.ops.fasttrain.bn_relu_backward(grad_y, x, weight, bias, mean, var,
                                                          ctx.training, ctx.eps)
        return (gx, gw if weight is not None else None, gb if bias is not None else None,
                None, None, None, None)

    torch.library.register_autograd("fasttrain::bn_relu_forward", _backward,
                                    setup_context=_setup_context)


# ---- public op ---------------------------------------------------------------------------------

_warned: set[str] = set()


def _warn_fallback(device: torch.device) -> None:
    reason = _ext.unavailable_reason(device)
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"fasttrain: fused BatchNorm+ReLU kernels unavailable ({reason}); using the "
                  f"PyTorch reference (same results, unfused)", RuntimeWarning, stacklevel=3)


_REDUCED = (torch.float16, torch.bfloat16)


def _check_dtypes(x: Tensor, **params: Optional[Tensor]) -> None:
    """F.batch_norm's dtype rule (CPU and CUDA): every parameter and running statistic has x's
    dtype, or all are fp32 with fp16/bf16 x (autocast). The kernels would accept any mix, but a
    module cast to bf16 fed fp32 (or an fp64 one fed fp32) is a mistake nn.BatchNorm2d reports."""
    given = {name: t.dtype for name, t in params.items() if t is not None}
    if all(d == x.dtype for d in given.values()):
        return
    if x.dtype in _REDUCED and all(d == torch.float32 for d in given.values()):
        return
    shown = ", ".join(f"{name} {str(d).removeprefix('torch.')}" for name, d in given.items())
    raise RuntimeError(f"bn_relu: mixed dtypes: x is {str(x.dtype).removeprefix('torch.')}, "
                       f"{shown}; parameters and running statistics must have x's dtype, or "
                       f"all be float32 with float16/bfloat16 x (as F.batch_norm requires)")


def bn_relu(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
            weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
            training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """`relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))`,
    fused.

    Same contract as F.batch_norm followed by ReLU: `training=True` normalises with the batch
    statistics and, when running stats are given, updates them in place with `momentum` (unbiased
    variance); `training=False` normalises with the running statistics, which are then required.

    Args:
        x: (N, C, H, W), float32/float16/bfloat16/float64, NCHW or channels_last (y keeps it).
        running_mean, running_var: (C,) buffers or None (training only).
        weight, bias: (C,) affine parameters or None; may differ in dtype from x (fp32 params
            under autocast); statistics and arithmetic are fp32 (fp64 for fp64 x).
        training, momentum, eps: as F.batch_norm.

    Returns:
        y with x's shape, dtype and layout; differentiable in x, weight and bias.

    Raises:
        ValueError: training with one value per channel or eps <= 0, eval with eps < 0 (as
            F.batch_norm), or only one of the running statistics given.
        RuntimeError: parameters or running statistics neither of x's dtype nor all fp32 with
            fp16/bf16 x (F.batch_norm's "mixed dtype" rule).
    """
    _check_dtypes(x, weight=weight, bias=bias, running_mean=running_mean,
                  running_var=running_var)
    if not _ext.supports(x.device):
        if not torch.compiler.is_compiling():
            _warn_fallback(x.device)
        return bn_relu_reference(x, running_mean, running_var, weight, bias, training, momentum,
                                 eps)
    if (running_mean is None) != (running_var is None):
        raise ValueError("bn_relu: give both running_mean and running_var, or neither")
    # F.batch_norm's own checks (a zero eps divides by a zero batch variance: NaN, silently)
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if not training:
        return torch.ops.fasttrain.bn_relu_forward(x, weight, bias, running_mean, running_var,
                                                   False, eps)[0]
    count = x.shape[0] * x.shape[2] * x.shape[3] if x.dim() == 4 else 0  # else the op raises
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{x.size()}")
    y, mean, var = torch.ops.fasttrain.bn_relu_forward(x, weight, bias, None, None, True, eps)
    if running_mean is not None:
        if torch.compiler.is_compiling():
            # A symbolic count (dynamic shapes) must stay symbolic: inductor passes the int
            # argument of the custom op as the compile-time hint, baking in one batch's count.
            bn_update_running_stats_reference(running_mean, running_var, mean, var, momentum,
                                              count)
        else:
            torch.ops.fasttrain.bn_update_running_stats(running_mean, running_var, mean, var,
                                                        momentum, count)
    return y


class BatchNormArguments:
    """nn.BatchNorm2d.forward's argument handling (torch 2.11-2.14) as a method that TorchScript
    can compile, for BatchNorm2d subclasses whose forward does not call super().forward (which
    TorchScript cannot compile)."""

    def _batch_norm_arguments(self, input: Tensor
                              ) -> tuple[Optional[Tensor], Optional[Tensor], bool, float]:
        """(running_mean, running_var, training, momentum) for F.batch_norm, after the input
        check and the `num_batches_tracked` update that nn.BatchNorm2d.forward makes."""
        self._check_input_dim(input)
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        return running_mean, running_var, bn_training, exponential_average_factor


class BatchNormReLU2d(BatchNormArguments, nn.BatchNorm2d):
    """`nn.BatchNorm2d` + ReLU computed by the fused `bn_relu` op.

    A subclass of nn.BatchNorm2d with nothing added: same constructor, parameters, buffers and
    state-dict keys, and the same running-statistics semantics (momentum, momentum=None
    cumulative average, unbiased running variance, `num_batches_tracked`), so checkpoints move
    freely between this module, fasttrain.models.layers.BatchNormReLU2d and nn.BatchNorm2d.
    Under TorchScript it computes `relu(F.batch_norm(...))` instead of the fused op.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not _ext.HAS_EXT:
            _warn_fallback(torch.device("cpu"))

    def forward(self, input: Tensor) -> Tensor:
        running_mean, running_var, bn_training, exponential_average_factor = \
            self._batch_norm_arguments(input)
        if torch.jit.is_scripting():
            return F.relu(F.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                       bn_training, exponential_average_factor, self.eps))
        return self._fused(input, running_mean, running_var, bn_training,
                           exponential_average_factor)

    @torch.jit.unused
    def _fused(self, x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               training: bool, momentum: float) -> Tensor:
        return bn_relu(x, running_mean, running_var, self.weight, self.bias, training, momentum,
                       self.eps)
