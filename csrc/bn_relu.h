// Per-element math of the fused BatchNorm+ReLU, shared by the CPU and the CUDA kernels.
//
// g++ compiles these functions into the CPU kernels and nvcc into the GPU kernels, so the CPU
// tests exercise the arithmetic the GPU runs. Everything here is computed in the accumulation
// type A (fp32 for fp32/bf16/fp16 inputs, fp64 for fp64); callers convert loads and stores.
//
// Contract (nn.BatchNorm2d followed by nn.ReLU, per channel c over the N*H*W positions):
//   invstd = 1 / sqrt(var + eps)            var: biased batch variance (training) or running_var
//   scale  = weight * invstd                 (weight = 1 without affine)
//   y      = relu((x - mean) * scale + bias)
// Backward, with gy = grad_y masked by the ReLU (y > 0, or y NaN as aten's threshold_backward):
//   grad_bias   = sum(gy)
//   grad_weight = sum(gy * xhat),            xhat = (x - mean) * invstd
//   grad_x      = scale * (gy - mean(gy) - xhat * mean(gy * xhat))   (training)
//   grad_x      = scale * gy                                          (eval: stats are constants)
#pragma once

#include <math.h>

#ifdef __CUDACC__
#define FT_HD __host__ __device__ __forceinline__
#else
#define FT_HD inline
#endif

namespace fasttrain {

// Accumulation type of an input element type: fp32 everywhere except fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

FT_HD float ft_sqrt(float v) { return sqrtf(v); }
FT_HD double ft_sqrt(double v) { return sqrt(v); }

// 1 / sqrt(var + eps): written out (not rsqrt) so CPU and GPU round the same way.
template <typename A>
FT_HD A bn_invstd(A var, A eps) {
  return A(1) / ft_sqrt(var + eps);
}

// Welford update of one channel's (mean, m2) with x; inv_n = 1 / (count including x). The count
// is the caller's: in a vectorised loop all lanes share it, so one reciprocal serves them all.
// Callers accumulate x - shift, shift being one element of the channel: the accumulated values are
// then of the order of the spread, not of the mean, and a large mean offset costs no precision in
// the running mean (mean = shift + accumulated mean, rounded once).
template <typename A>
FT_HD void welford_add(A& mean, A& m2, A x, A inv_n) {
  const A d = x - mean;
  mean += d * inv_n;
  m2 += d * (x - mean);
}

// Chan et al.'s merge of a partial (mean_b, m2_b) over n_b elements into (mean, m2) over n_a;
// the caller sets its count to n_a + n_b afterwards (lanes that share a count merge once each).
template <typename A>
FT_HD void welford_combine(A& mean, A& m2, A n_a, A mean_b, A m2_b, A n_b) {
  if (n_b == A(0)) return;
  if (n_a == A(0)) {  // not via the formula: d * d may overflow, and inf * n_a is then NaN
    mean = mean_b;
    m2 = m2_b;
    return;
  }
  const A f = n_b / (n_a + n_b);
  const A d = mean_b - mean;
  mean += d * f;
  m2 += m2_b + d * d * n_a * f;
}

// Per-channel constants of the forward and backward: invstd and scale = weight * invstd.
template <typename A>
struct ChannelCoef {
  A mean, invstd, scale, bias;
};

template <typename A>
FT_HD ChannelCoef<A> bn_channel_coef(A mean, A var, const A* weight, const A* bias, int c,
                                     A eps) {
  ChannelCoef<A> k;
  k.mean = mean;
  k.invstd = bn_invstd(var, eps);
  k.scale = weight ? weight[c] * k.invstd : k.invstd;
  k.bias = bias ? bias[c] : A(0);
  return k;
}

// The BatchNorm output before the ReLU. (x - mean) first: with a large mean offset x - mean is
// exact while x * scale + (bias - mean * scale) cancels catastrophically.
template <typename A>
FT_HD A bn_affine(A x, const ChannelCoef<A>& k) {
  return (x - k.mean) * k.scale + k.bias;
}

// Forward: relu of the normalised value; NaN propagates like torch.relu.
template <typename A>
FT_HD A bn_relu_forward(A x, const ChannelCoef<A>& k) {
  const A y = bn_affine(x, k);
  return y <= A(0) ? A(0) : y;
}

// The gradient that reaches the BatchNorm output through the ReLU. The mask is recomputed from
// x with the forward's own expression, so it is the mask of the output the forward returned.
template <typename A>
FT_HD A relu_grad(A grad_y, A x, const ChannelCoef<A>& k) {
  return bn_affine(x, k) <= A(0) ? A(0) : grad_y;
}

template <typename A>
FT_HD A bn_xhat(A x, const ChannelCoef<A>& k) {
  return (x - k.mean) * k.invstd;
}

// grad_x in training mode: mean_gy = sum(gy) / count, mean_gy_xhat = sum(gy * xhat) / count.
template <typename A>
FT_HD A bn_grad_x_train(A gy, A xhat, const ChannelCoef<A>& k, A mean_gy, A mean_gy_xhat) {
  return k.scale * (gy - mean_gy - xhat * mean_gy_xhat);
}

// grad_x in eval mode: the statistics are constants.
template <typename A>
FT_HD A bn_grad_x_eval(A gy, const ChannelCoef<A>& k) {
  return k.scale * gy;
}

// Running statistics as nn.BatchNorm2d updates them: an exponential average with weight
// `momentum` of the batch mean and of the *unbiased* batch variance (unbias = n / (n - 1)).
template <typename A>
FT_HD void bn_running_update(A& running_mean, A& running_var, A mean, A var, A momentum,
                             A unbias) {
  running_mean = momentum * mean + (A(1) - momentum) * running_mean;
  running_var = momentum * var * unbias + (A(1) - momentum) * running_var;
}

}  // namespace fasttrain
