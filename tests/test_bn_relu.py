"""The fused BatchNorm+ReLU op (fasttrain.ops.bn_relu) against a float64 reference.

Reference: aten's batch_norm + relu in float64 with autograd, on the same (already rounded)
input values, so the only differences are the op's fp32 arithmetic and its final rounding to the
input dtype. Stated tolerances per dtype (`TOL`): outputs and grad_x are rounded to the dtype,
the per-channel results (running stats, grad_weight, grad_bias) are fp32 sums whatever the dtype.

The ReLU boundary: an element whose pre-activation is within rounding of 0 may fall on either
side. The tests zero grad_out there (`_grad_out`), so a flip changes no gradient; y differs by at
most that pre-activation, inside the tolerance.

CPU tests run everywhere; `cuda`-marked twins run on a GPU host.
"""
from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fasttrain.ops import _ext
import fasttrain.ops.bn_relu  # noqa: F401  (the module; `ops.bn_relu` is its function)

ops = sys.modules["fasttrain.ops.bn_relu"]

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"fasttrain library not loaded: "
                                f"{_ext.LOAD_ERRORS}")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (dtype-rounded outputs: y, grad_x; fp32 per-channel results: stats, grad_weight, grad_bias)
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 5e-5), torch.float16: (2e-3, 5e-5),
       torch.float64: (1e-12, 1e-12)}
EPS = 1e-5
MOMENTUM = 0.1

# Shapes (N, C, H, W): C in {1, 3, 64, 67, 2048}, N*H*W in {1, 7, 50176} (2048 channels only with
# small N*H*W, to keep the file's runtime down) plus 2x7x7 = 98.
SMALL = [(1, 1, 1, 1), (1, 1, 7, 1), (1, 3, 1, 1), (7, 3, 1, 1), (1, 64, 1, 1), (1, 64, 1, 7),
         (1, 67, 7, 1), (1, 67, 1, 1), (1, 2048, 1, 1), (7, 2048, 1, 1), (2, 2048, 7, 7)]
LARGE = [(4, 1, 112, 112), (1, 3, 224, 224), (4, 64, 112, 112), (1, 67, 224, 224)]


def _case_ids(shape, layout, dtype, training):
    return f"{'x'.join(map(str, shape))}-{layout}-{dtype}-{'train' if training else 'eval'}"


CASES = ([(s, lay, dt, tr) for s in SMALL for lay in ("nchw", "nhwc") for dt in DTYPES
          for tr in (True, False)]
         + [(s, lay, dt, True) for s in LARGE for lay in ("nchw", "nhwc") for dt in DTYPES]
         + [(s, "nhwc", "bf16", False) for s in LARGE])


def _make_inputs(shape, layout, dtype, device, offset=0.0, seed=0):
    """x (dtype, layout), fp32 weight/bias/running stats: the autocast situation."""
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    x = (torch.randn(shape, generator=g) * (0.5 + torch.rand(C, 1, 1, generator=g)) + offset
         + torch.randn(C, 1, 1, generator=g))
    x = x.to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = 0.5 + torch.rand(C, generator=g)
    weight[::5] *= -1  # negative scales exist in trained nets
    bias = torch.randn(C, generator=g) * 0.5
    running_mean = torch.randn(C, generator=g) + offset
    running_var = 0.5 + torch.rand(C, generator=g)
    t = [x, weight, bias, running_mean, running_var]
    return [v.to(device) for v in t]


def _pre_activation64(x, weight, bias, mean, var):
    """(x - mean) * weight / sqrt(var + eps) + bias in float64."""
    sh = (1, -1, 1, 1)
    scale = weight.double() / torch.sqrt(var.double() + EPS)
    return (x.double() - mean.double().view(sh)) * scale.view(sh) + bias.double().view(sh)


def _grad_out(x, weight, bias, running_mean, running_var, training, dtype, seed=1, margin=1e-3):
    """A random grad_out, zero where the pre-activation is within `margin` of the ReLU kink."""
    if training:
        var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    else:
        mean, var = running_mean, running_var
    z = _pre_activation64(x, weight, bias, mean, var)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device, dtype)
    g = torch.where(z.abs() < margin, torch.zeros_like(g), g)
    return g.contiguous(memory_format=torch.channels_last) if not x.is_contiguous() else g


def _reference(x, weight, bias, running_mean, running_var, training, grad_out, momentum=MOMENTUM):
    """float64 aten batch_norm + relu.

    Returns: (y, grad_x, grad_weight, grad_bias, running_mean, running_var)."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    rm64, rv64 = running_mean.double().clone(), running_var.double().clone()
    # torch.batch_norm, not F.batch_norm: aten accepts one value per channel (the op does too).
    y = torch.relu(torch.batch_norm(x64, w64, b64, rm64, rv64, training, momentum, EPS, False))
    y.backward(grad_out.double())
    return y.detach(), x64.grad, w64.grad, b64.grad, rm64, rv64


def _fused(x, weight, bias, running_mean, running_var, training, grad_out, momentum=MOMENTUM):
    """The native ops as bn_relu calls them (without its one-value-per-channel refusal)."""
    x = x.detach().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    running_mean, running_var = running_mean.clone(), running_var.clone()
    if training:
        y, mean, var = torch.ops.fasttrain.bn_relu_forward(x, weight, bias, None, None, True, EPS)
        torch.ops.fasttrain.bn_update_running_stats(running_mean, running_var, mean, var, momentum,
                                                    x.numel() // x.shape[1])
    else:
        y, _, _ = torch.ops.fasttrain.bn_relu_forward(x, weight, bias, running_mean, running_var,
                                                      False, EPS)
    y.backward(grad_out)
    return y.detach(), x.grad, weight.grad, bias.grad, running_mean, running_var


def _close(actual, expected, tol, what):
    """|actual - expected| <= tol * (|expected| + max|expected|) elementwise, NaN == NaN.

    (torch.testing.assert_close does the same, several times slower on the 3M-element cases.)"""
    # fp32 arithmetic resolves every tolerance used here but the fp64 ones.
    dtype = torch.float64 if tol < 1e-6 else torch.float32
    actual, expected = actual.detach().cpu().to(dtype), expected.detach().cpu().to(dtype)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if not expected.numel():
        return
    scale = max(expected.abs().nan_to_num().max().item(), 1.0)
    err = (actual - expected).abs()
    bad = ~(err <= tol * (expected.abs() + scale)) & ~(actual.isnan() & expected.isnan())
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements differ by more "
                             f"than {tol} x (|expected| + {scale:.3g}); first at flat index {i}: "
                             f"{actual.flatten()[i].item()!r} vs {expected.flatten()[i].item()!r}")


def _check_against_reference(shape, layout, dtype, training, device, offset=0.0, margin=1e-3,
                             tol=None):
    x, w, b, rm, rv = _make_inputs(shape, layout, dtype, device, offset=offset)
    g = _grad_out(x, w, b, rm, rv, training, dtype, margin=margin)
    ref = _reference(x, w, b, rm, rv, training, g)
    out = _fused(x, w, b, rm, rv, training, g)
    tol_x, tol_c = tol or TOL[dtype]
    assert out[0].dtype == dtype and out[0].shape == x.shape
    if layout == "nhwc":
        assert out[0].is_contiguous(memory_format=torch.channels_last)
        assert out[1].is_contiguous(memory_format=torch.channels_last)
    for i, name in enumerate(["y", "grad_x", "grad_weight", "grad_bias", "running_mean",
                              "running_var"]):
        _close(out[i], ref[i], tol_x if i < 2 else tol_c, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout,dtype,training", CASES,
                         ids=[_case_ids(*c) for c in CASES])
def test_op_matches_float64_reference(device, shape, layout, dtype, training):
    _check_against_reference(shape, layout, DTYPES[dtype], training, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e4), (torch.float16, 300.0)])
def test_statistics_are_stable_with_a_large_mean_offset(device, layout, dtype, offset):
    """E[x^2] - E[x]^2 in fp32 loses every digit of a unit variance at a 1e4 offset (and aten's
    channels_last CPU kernel loses most of them); shifted Welford keeps the mean to within the
    rounding of the mean itself and the variance to ~1e-6.

    Tolerances: the fp32 mean carries half an ulp of the offset (5e-4 at 1e4), which shifts
    x_hat by up to 5e-4 / std: y, grad_x and grad_weight (+= shift * grad_bias) get 1e-3, the
    ReLU margin grows to 2e-2."""
    shape = (2, 3, 112, 112)
    x, w, b, rm, rv = _make_inputs(shape, layout, dtype, device, offset=offset)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    _, mean, var = torch.ops.fasttrain.bn_relu_forward(x, w, b, None, None, True, EPS)
    ulp = torch.finfo(torch.float32).eps * offset
    assert (mean.double() - mean64).abs().max().item() <= ulp
    assert ((var.double() - var64) / var64).abs().max().item() <= 1e-5
    _check_against_reference(shape, layout, dtype, True, device, offset=offset, margin=2e-2,
                             tol=(max(TOL[dtype][0], 1e-3), 1e-3))


@pytest.mark.parametrize("device", DEVICES)
def test_twins_match_the_native_ops(device):
    """Each pure-PyTorch *_reference twin computes what its native op computes."""
    for layout, training, dtype in [("nchw", True, torch.float32), ("nhwc", False, torch.float32),
                                    ("nhwc", True, torch.bfloat16)]:
        x, w, b, rm, rv = _make_inputs((3, 5, 6, 7), layout, dtype, device)
        g = _grad_out(x, w, b, rm, rv, training, dtype)
        args = (x, w, b, None if training else rm, None if training else rv, training, EPS)
        native = torch.ops.fasttrain.bn_relu_forward(*args)
        twin = ops.bn_relu_forward_reference(*args)
        tol = TOL[dtype]
        for a, e, t in zip(native, twin, tol[:1] + tol[1:] * 2):
            _close(a, e, t, f"forward {layout} {training} {dtype}")
        assert native[0].stride() == twin[0].stride()
        bargs = (g, x, w, b, native[1], native[2], training, EPS)
        for a, e, t in zip(torch.ops.fasttrain.bn_relu_backward(*bargs),
                           ops.bn_relu_backward_reference(*bargs), tol[:1] + tol[1:] * 2):
            _close(a, e, t, f"backward {layout} {training} {dtype}")
        rm2, rv2 = rm.clone(), rv.clone()
        torch.ops.fasttrain.bn_update_running_stats(rm, rv, native[1], native[2], 0.3, 210)
        ops.bn_update_running_stats_reference(rm2, rv2, native[1], native[2], 0.3, 210)
        _close(rm, rm2, 1e-6, "running_mean")
        _close(rv, rv2, 1e-6, "running_var")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck_float64(device, layout, training):
    """First and second derivatives (gradient penalties, Hessian-vector products) as
    nn.BatchNorm2d's: the native backward has no derivative of its own, so create_graph=True
    recomputes (before, the second derivative was silently zero)."""
    # H != W keeps the layouts apart; 36 elements: gradgradcheck's Jacobians grow as its square
    x, w, b, rm, rv = _make_inputs((2, 3, 2, 3), layout, torch.float64, device)
    rm, rv = rm.double(), rv.double()
    x, w, b = (t.double().detach().requires_grad_() for t in (x, w, b))

    def f(x, w, b):
        if training:
            return torch.ops.fasttrain.bn_relu_forward(x, w, b, None, None, True, EPS)[0]
        return torch.ops.fasttrain.bn_relu_forward(x, w, b, rm, rv, False, EPS)[0]

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered")
        assert torch.autograd.gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schema, fake kernels, autograd registration and AOT dispatch (torch.library.opcheck)."""
    x, w, b, rm, rv = _make_inputs((2, 5, 3, 4), "nhwc", torch.float32, device)
    xb = x.to(torch.bfloat16).contiguous()
    fwd = torch.ops.fasttrain.bn_relu_forward.default
    req = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    torch.library.opcheck(fwd, (req(x), req(w), req(b), None, None, True, EPS))
    torch.library.opcheck(fwd, (req(xb), None, None, rm, rv, False, EPS))
    y, mean, var = fwd(x, w, b, None, None, True, EPS)
    torch.library.opcheck(torch.ops.fasttrain.bn_relu_backward.default,
                          (torch.randn_like(y), x, w, b, mean, var, True, EPS))
    torch.library.opcheck(torch.ops.fasttrain.bn_update_running_stats.default,
                          (rm.clone(), rv.clone(), mean, var, 0.1, 24))


@pytest.mark.parametrize("device", DEVICES)
def test_unaligned_and_strided_inputs(device):
    """A data pointer off the 16-byte grid (the CUDA kernels drop to narrower loads) and
    non-contiguous views (copied to the kernel layout first) give the reference results."""
    x0, w, b, rm, rv = _make_inputs((2, 16, 5, 6), "nhwc", torch.bfloat16, device)

    def off_grid(t):  # the same values, channels_last, data pointer one element off
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)[1:]
        return flat.view(2, 5, 6, 16).copy_(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    unaligned = off_grid(x0)
    assert unaligned.is_contiguous(memory_format=torch.channels_last)
    strided = torch.cat([x0, x0], dim=3)[..., ::2]
    for x, grad_layout in ((unaligned, None), (strided, None), (x0, off_grid)):
        for training in (True, False):
            g = _grad_out(x, w, b, rm, rv, training, x.dtype)
            g = grad_layout(g) if grad_layout else g  # an unaligned grad_out alone
            ref = _reference(x, w, b, rm, rv, training, g)
            out = _fused(x, w, b, rm, rv, training, g)
            for i in range(6):
                _close(out[i], ref[i], TOL[x.dtype][0 if i < 2 else 1], f"output {i}")


# The CUDA kernels load 8, 4, 2 or 1 16-bit values (4, 2, 1 fp32) at a time, by what divides
# the contiguous extent: the channels (channels_last) or the H*W plane (NCHW). One case per
# remainder modulo 8 of that extent.
VECTOR_CASES = ([((3, c, 3, 5), "nhwc") for c in (2, 4, 6, 10, 12, 20)]
                + [((3, 5, h, 2), "nchw") for h in (1, 2, 3, 5)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout", VECTOR_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_vector_width(device, shape, layout, dtype):
    for training in (True, False):
        _check_against_reference(shape, layout, DTYPES[dtype], training, device)


@pytest.mark.cuda
def test_kernels_run_on_the_callers_stream():
    """On a side stream whose input is still being written, a kernel launched on another
    stream would read it too early."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x0, w, b, rm, rv = _make_inputs((8, 64, 28, 28), "nhwc", torch.bfloat16, "cuda")
    g0 = _grad_out(x0, w, b, rm, rv, True, x0.dtype).cuda()
    expected = _fused(x0, w, b, rm, rv, True, g0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # keeps the side stream busy before x is written
        x, g = x0 * 1, g0 * 1
        got = _fused(x, w, b, rm, rv, True, g)
    torch.cuda.current_stream().wait_stream(side)
    for a, e, name in zip(got, expected, ["y", "grad_x", "grad_weight", "grad_bias",
                                           "running_mean", "running_var"]):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_a_spread_beyond_fp32_gives_aten_result_not_nan(device, layout):
    """Merging into an empty partial with a mean difference whose square overflows made
    inf * 0 = NaN statistics, where aten gives an infinite variance and zero output."""
    x = (torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 1e20).to(device)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    y, mean, var = torch.ops.fasttrain.bn_relu_forward(x, None, None, None, None, True, EPS)
    assert not mean.isnan().any() and not var.isnan().any() and not y.isnan().any()
    torch.testing.assert_close(y, F.relu(F.batch_norm(x, None, None, training=True, eps=EPS)))


def test_input_checks_name_the_tensor_and_value():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="x must be 4-D .* got 3-D"):
        torch.ops.fasttrain.bn_relu_forward(x[0], None, None, None, None, True, EPS)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(3,\) .* got \[4\]"):
        torch.ops.fasttrain.bn_relu_forward(x, torch.ones(4), None, None, None, True, EPS)
    with pytest.raises(RuntimeError, match="running_mean and running_var are required"):
        torch.ops.fasttrain.bn_relu_forward(x, None, None, None, None, False, EPS)
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16"):
        torch.ops.fasttrain.bn_relu_forward(x.int(), None, None, None, None, True, EPS)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ops.bn_relu(torch.randn(1, 3, 1, 1), None, None, training=True)
    # eps as F.batch_norm checks it (zero in training divides a constant channel by zero)
    x = torch.ones(2, 3, 2, 2)
    with pytest.raises(ValueError, match="eps must be positive during training, but got 0.0"):
        ops.BatchNormReLU2d(3, eps=0.0).train()(x)
    with pytest.raises(ValueError, match="eps must be non-negative, but got -1e-05"):
        ops.BatchNormReLU2d(3, eps=-1e-5).eval()(x)
    for eps, training in ((0.0, True), (-1e-5, False)):  # the reference refuses the same
        with pytest.raises(ValueError):
            F.batch_norm(x, torch.zeros(3), torch.ones(3), training=training, eps=eps)


@pytest.mark.parametrize("module_dtype,x_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
    (torch.float64, torch.float32), (torch.float32, torch.float64)])
@pytest.mark.parametrize("training", [True, False])
def test_mixed_dtypes_refused_as_batch_norm_refuses_them(module_dtype, x_dtype, training):
    x = torch.randn(2, 3, 4, 4, dtype=x_dtype)
    with pytest.raises(RuntimeError, match="mixed dtype"):  # the rule the op copies
        nn.BatchNorm2d(3).to(module_dtype).train(training)(x)
    fused = ops.BatchNormReLU2d(3).to(module_dtype).train(training)
    with pytest.raises(RuntimeError, match=f"mixed dtypes: x is {str(x_dtype)[6:]}, weight "
                                           f"{str(module_dtype)[6:]}, bias"):
        fused(x)
    assert int(fused.num_batches_tracked) == int(training)  # as nn.BatchNorm2d counts it
    torch.testing.assert_close(fused.running_mean, torch.zeros(3, dtype=module_dtype))


def test_mixed_dtypes_accepted_where_batch_norm_accepts_them():
    x = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    bn = nn.BatchNorm2d(3)  # fp32 parameters and statistics, bf16 x: autocast's case
    fused = ops.BatchNormReLU2d(3)
    torch.testing.assert_close(fused(x), F.relu(bn(x)))
    half = ops.BatchNormReLU2d(3).to(torch.bfloat16)  # a module cast to x's dtype
    assert half(x).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="running_mean float32"):  # bf16 affine, fp32 stats
        ops.bn_relu(x, torch.zeros(3), torch.ones(3), torch.ones(3, dtype=torch.bfloat16),
                    None, training=True)
    with pytest.raises(RuntimeError):  # "expected scalar type BFloat16 but found Float"
        F.batch_norm(x, torch.zeros(3), torch.ones(3), torch.ones(3, dtype=torch.bfloat16),
                     None, training=True)


def test_empty_batch_leaves_running_stats_unchanged():
    bn, fused = nn.BatchNorm2d(3), ops.BatchNormReLU2d(3)
    x = torch.randn(0, 3, 4, 4)
    assert fused(x).shape == x.shape
    bn(x)
    torch.testing.assert_close(fused.running_mean, bn.running_mean)
    torch.testing.assert_close(fused.running_var, bn.running_var)


# ---- the module ------------------------------------------------------------------------------

def _native(*args, **kw):
    from fasttrain.models.layers import BatchNormReLU2d as NativeBatchNormReLU2d
    return NativeBatchNormReLU2d(*args, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False},
                                    {"track_running_stats": False}],
                         ids=["default", "cumulative", "no-affine", "no-running-stats"])
def test_module_matches_native_module(device, kwargs):
    """Three training steps then eval: outputs, gradients, running stats, num_batches_tracked."""
    torch.manual_seed(0)
    native, fused = _native(6, **kwargs).to(device), ops.BatchNormReLU2d(6, **kwargs).to(device)
    if native.affine:
        with torch.no_grad():
            native.weight.uniform_(0.5, 1.5)
            native.bias.uniform_(-0.5, 0.5)
    fused.load_state_dict(native.state_dict())
    for step in range(3):
        x = (torch.randn(4, 6, 5, 5, device=device) * 2 + step).contiguous(
            memory_format=torch.channels_last)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [m(xi) for m, xi in zip((native, fused), xs)]
        g = torch.randn_like(ys[0])
        for y in ys:
            y.backward(g)
        torch.testing.assert_close(ys[1], ys[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(native.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, a), (_, b) in zip(native.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    native.eval(), fused.eval()
    x = torch.randn(2, 6, 3, 3, device=device)
    torch.testing.assert_close(fused(x), native(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_module_under_autocast_and_in_bf16(device):
    """bf16 activations with fp32 parameters (autocast), and a module cast to bf16 entirely."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6, device=device).to(torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        native = _native(8).to(device, dtype)
        fused = ops.BatchNormReLU2d(8).to(device, dtype)
        y_n, y_f = native(x), fused(x)
        assert y_f.dtype == torch.bfloat16
        torch.testing.assert_close(y_f.float(), y_n.float(), rtol=2e-2, atol=2e-2)
        assert fused.running_var.dtype == dtype
        torch.testing.assert_close(fused.running_var.float(), native.running_var.float(),
                                   rtol=1e-2, atol=1e-3)


def test_state_dicts_interchange():
    from fasttrain.models import create_model
    from fasttrain.models.layers import NORM_ACT_LAYERS

    torch.manual_seed(0)
    native = create_model("cifar_resnet20", width=0.25, norm_act_layer=NORM_ACT_LAYERS["native"])
    fused = create_model("cifar_resnet20", width=0.25, norm_act_layer=NORM_ACT_LAYERS["fused"])
    assert isinstance(fused.bn1, ops.BatchNormReLU2d) and isinstance(fused.bn1, nn.BatchNorm2d)
    assert native.state_dict().keys() == fused.state_dict().keys()
    fused.load_state_dict(native.state_dict())  # strict
    native.load_state_dict(fused.state_dict())
    plain = nn.BatchNorm2d(4)
    plain.load_state_dict(fused.bn1.state_dict())
    native.eval(), fused.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fused(x), native(x), rtol=1e-5, atol=1e-5)


def test_torchscript_routes_to_the_reference():
    m = ops.BatchNormReLU2d(4)
    scripted = torch.jit.script(m)
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(scripted(x), m(x))  # train mode: both update running stats
    assert m.num_batches_tracked.item() == 2


def test_fallback_warns_once_and_matches(monkeypatch):
    monkeypatch.setattr(_ext, "supports", lambda device: False)
    monkeypatch.setattr(ops, "_warned", set())
    x = torch.randn(3, 4, 5, 5)
    rm, rv = torch.zeros(4), torch.ones(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ops.bn_relu(x, rm, rv, training=True)
        ops.bn_relu(x, rm, rv, training=True)
    assert len([w for w in caught if "fasttrain" in str(w.message)]) == 1
    torch.testing.assert_close(y, torch.relu(F.batch_norm(x, torch.zeros(4), torch.ones(4),
                                                          training=True)))


# ---- in a model, compiled ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_with_dynamic_shapes_updates_running_stats_per_batch(device):
    """Under dynamic shapes the element count of the unbiased running variance stays symbolic
    (an int op argument baked in the first batch's count); torch.export with a dynamic batch
    works in training mode as with nn.BatchNorm2d."""
    torch._dynamo.reset()
    fused, native = ops.BatchNormReLU2d(3, momentum=1.0), nn.BatchNorm2d(3, momentum=1.0)
    fused, native = fused.to(device), native.to(device)
    step = torch.compile(fused, fullgraph=True, dynamic=True)
    for n in (2, 3, 5):
        x = torch.randn(n, 3, 4, 4, device=device)
        step(x)
        native(x)
        torch.testing.assert_close(fused.running_var, native.running_var, msg=f"batch {n}")
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(fused, (torch.randn(2, 3, 4, 4, device=device),),
                                   dynamic_shapes=({0: batch},))
    x = torch.randn(5, 3, 4, 4, device=device)
    torch.testing.assert_close(exported.module()(x), F.relu(native(x)))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_fused_thin_resnet_trains_like_native(device, monkeypatch):
    """A ThinResNet with norm_act=fused under torch.compile(fullgraph=True): no graph break,
    and three SGD steps follow the eager native model's losses and weights."""
    from fasttrain.models import CifarResNet
    from fasttrain.models.layers import NORM_ACT_LAYERS

    torch._dynamo.reset()
    if device == "cuda":
        # cuDNN convolutions default to TF32 (10-bit mantissa), and the compiled and eager models
        # may pick different algorithms: three SGD steps then drift apart by far more than the
        # norm+ReLU implementations differ. Full fp32 makes the comparison about the op alone.
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    losses, models = {}, {}
    data = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 16, 16, generator=data),
                torch.randint(0, 10, (16,), generator=data)) for _ in range(3)]
    for norm_act in ("native", "fused"):
        torch.manual_seed(0)
        model = CifarResNet(8, width=0.5, zero_init_residual=False,
                            norm_act_layer=NORM_ACT_LAYERS[norm_act]).to(device)
        model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        step_model = torch.compile(model, fullgraph=True) if norm_act == "fused" else model
        losses[norm_act] = []
        for x, y in batches:
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(step_model(x), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[norm_act].append(loss.item())
        models[norm_act] = model
    assert all(math.isfinite(v) for v in losses["fused"])
    assert losses["fused"] == pytest.approx(losses["native"], rel=1e-3, abs=1e-4)
    native_state, fused_state = models["native"].state_dict(), models["fused"].state_dict()
    for k in native_state:
        torch.testing.assert_close(fused_state[k], native_state[k], rtol=1e-3, atol=1e-4,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_double_backward_of_autocast_dtypes(device, training):
    """bf16 x with fp32 weight, bias and running stats (autocast): aten accepts the mix, and
    the recompute must hand F.batch_norm the statistics in the dtype the forward got."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, generator=g).to(device, torch.bfloat16)
    w0, b0 = torch.randn(3, generator=g).to(device), torch.randn(3, generator=g).to(device)
    gy = torch.randn(2, 3, 4, 4, generator=g).to(device, torch.bfloat16)
    results = []
    for fused in (True, False):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        f = ops.bn_relu if fused else (lambda *a: F.relu(F.batch_norm(*a)))
        y = f(x, rm, rv, w, b, training, 0.1, EPS)
        first = torch.autograd.grad(y, (x, w, b), gy, create_graph=True)
        results.append(torch.autograd.grad(sum(t.float().square().sum() for t in first),
                                           (x, w, b)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
