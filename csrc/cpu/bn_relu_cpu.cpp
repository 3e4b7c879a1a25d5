// CPU kernels of the fused BatchNorm+ReLU: plain loops over the shared per-element math of
// bn_relu.h, parallelised with at::parallel_for.
//
// Reductions split each channel's N*H*W elements into fixed-size chunks, reduce every chunk
// independently (in parallel) and merge the chunks in order, so results are bit-identical for
// any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "bn_relu.h"
#include "checks.h"

namespace fasttrain {
namespace {

using at::Tensor;

constexpr int64_t kRowsPerChunk = 512;      // NHWC: rows (positions) per partial reduction
constexpr int64_t kElemsPerChunk = 16384;   // NCHW: elements of one channel per partial

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Per-channel coefficient inputs as contiguous accumulation-type tensors (or undefined).
struct Params {
  Tensor weight, bias;
};

Params acc_params(const OptTensor& weight, const OptTensor& bias, at::ScalarType acc) {
  Params p;
  if (has(weight)) p.weight = weight->to(acc).contiguous();
  if (has(bias)) p.bias = bias->to(acc).contiguous();
  return p;
}

template <typename A>
const A* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

// ---- statistics: per-channel mean and biased variance (Welford within chunks, Chan across) ----
// A chunk is a range of rows for NHWC, and for NCHW a range of one channel's N*H*W elements,
// which may span several (n, c) planes.

template <typename T, typename A>
void stats_nhwc(const T* x, int64_t M, int64_t C, A* mean_out, A* var_out) {
  const int64_t chunks = ceil_div(M, kRowsPerChunk);
  std::vector<A> part_mean(chunks * C, A(0)), part_m2(chunks * C, A(0)), shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = A(x[c]);  // row 0 (see welford_add)
  at::parallel_for(0, chunks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      A* mean = &part_mean[b * C];
      A* m2 = &part_m2[b * C];
      const int64_t r0 = b * kRowsPerChunk, r1 = std::min(M, r0 + kRowsPerChunk);
      for (int64_t r = r0; r < r1; ++r) {
        const A inv_n = A(1) / A(r - r0 + 1);
        const T* row = x + r * C;
        for (int64_t c = 0; c < C; ++c) welford_add(mean[c], m2[c], A(row[c]) - shift[c], inv_n);
      }
    }
  });
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      A mean = 0, m2 = 0, n = 0;
      for (int64_t b = 0; b < chunks; ++b) {
        const A nb = A(std::min(M, (b + 1) * kRowsPerChunk) - b * kRowsPerChunk);
        welford_combine(mean, m2, n, part_mean[b * C + c], part_m2[b * C + c], nb);
        n += nb;
      }
      mean_out[c] = shift[c] + mean;
      var_out[c] = m2 / n;
    }
  });
}

template <typename T, typename A>
void stats_nchw(const T* x, int64_t N, int64_t C, int64_t HW, A* mean_out, A* var_out) {
  const int64_t L = N * HW;
  const int64_t chunks = ceil_div(L, kElemsPerChunk);
  std::vector<A> part_mean(C * chunks, A(0)), part_m2(C * chunks, A(0)), shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = A(x[c * HW]);  // x[0, c, 0, 0] (see welford_add)
  at::parallel_for(0, C * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t / chunks, b = t % chunks;
      const int64_t j0 = b * kElemsPerChunk, j1 = std::min(L, j0 + kElemsPerChunk);
      A mean = 0, m2 = 0, n = 0;
      for (int64_t j = j0; j < j1;) {  // one (n, c) plane segment at a time
        const int64_t n_idx = j / HW, hw = j % HW, len = std::min(HW - hw, j1 - j);
        const T* p = x + (n_idx * C + c) * HW + hw;
        for (int64_t i = 0; i < len; ++i) {
          n += A(1);
          welford_add(mean, m2, A(p[i]) - shift[c], A(1) / n);
        }
        j += len;
      }
      part_mean[t] = mean;
      part_m2[t] = m2;
    }
  });
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      A mean = 0, m2 = 0, n = 0;
      for (int64_t b = 0; b < chunks; ++b) {
        const A nb = A(std::min(L, (b + 1) * kElemsPerChunk) - b * kElemsPerChunk);
        welford_combine(mean, m2, n, part_mean[c * chunks + b], part_m2[c * chunks + b], nb);
        n += nb;
      }
      mean_out[c] = shift[c] + mean;
      var_out[c] = m2 / n;
    }
  });
}

// Per-channel constants as a struct of arrays, so that loops over channels vectorise.
template <typename A>
struct Coefs {
  std::vector<A> mean, invstd, scale, bias;
  ChannelCoef<A> operator[](int64_t c) const { return {mean[c], invstd[c], scale[c], bias[c]}; }
};

template <typename A>
Coefs<A> channel_coefs(const A* mean, const A* var, const A* weight, const A* bias, int64_t C,
                       double eps) {
  Coefs<A> k{std::vector<A>(C), std::vector<A>(C), std::vector<A>(C), std::vector<A>(C)};
  for (int64_t c = 0; c < C; ++c) {
    const ChannelCoef<A> kc =
        bn_channel_coef(mean[c], var[c], weight, bias, static_cast<int>(c), A(eps));
    k.mean[c] = kc.mean;
    k.invstd[c] = kc.invstd;
    k.scale[c] = kc.scale;
    k.bias[c] = kc.bias;
  }
  return k;
}

// ---- forward -------------------------------------------------------------------------------

template <typename T, typename A>
void forward_elementwise(const T* x, T* y, const Geometry& g, const Coefs<A>& k) {
  if (g.nhwc) {
    const int64_t grain = std::max<int64_t>(1, 32768 / g.C);
    at::parallel_for(0, g.M, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * g.C;
        T* yr = y + r * g.C;
        for (int64_t c = 0; c < g.C; ++c) yr[c] = T(bn_relu_forward(A(xr[c]), k[c]));
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 32768 / g.HW);
    at::parallel_for(0, g.N * g.C, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const ChannelCoef<A> kc = k[p % g.C];
        for (int64_t i = p * g.HW; i < (p + 1) * g.HW; ++i) y[i] = T(bn_relu_forward(A(x[i]), kc));
      }
    });
  }
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_forward_cpu(const Tensor& x_in, const OptTensor& weight,
                                                       const OptTensor& bias,
                                                       const OptTensor& running_mean,
                                                       const OptTensor& running_var,
                                                       bool training, double eps) {
  check_forward("bn_relu_forward", x_in, weight, bias, running_mean, running_var, training,
                c10::DeviceType::CPU);
  const Geometry g = bn_geometry(x_in);
  const Tensor x = x_in.contiguous(g.format);
  Tensor y = at::empty_like(x);
  const auto acc = acc_dtype(x.scalar_type());
  Tensor mean, var;
  if (training) {
    mean = at::zeros({g.C}, x.options().dtype(acc));
    var = at::zeros({g.C}, x.options().dtype(acc));
  } else {
    mean = running_mean->to(acc, /*non_blocking=*/false, /*copy=*/true);
    var = running_var->to(acc, /*non_blocking=*/false, /*copy=*/true);
  }
  if (x.numel() == 0) return {y, mean, var};
  const Params p = acc_params(weight, bias, acc);
  FT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "bn_relu_forward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (training) {
      if (g.nhwc)
        stats_nhwc<scalar_t, A>(xp, g.M, g.C, mean.data_ptr<A>(), var.data_ptr<A>());
      else
        stats_nchw<scalar_t, A>(xp, g.N, g.C, g.HW, mean.data_ptr<A>(), var.data_ptr<A>());
    }
    const auto k = channel_coefs<A>(mean.const_data_ptr<A>(), var.const_data_ptr<A>(),
                                    ptr_or_null<A>(p.weight), ptr_or_null<A>(p.bias), g.C, eps);
    forward_elementwise<scalar_t, A>(xp, y.data_ptr<scalar_t>(), g, k);
  });
  return {y, mean, var};
}

// ---- backward ------------------------------------------------------------------------------

// Per-channel sums of gy = relu_grad(grad_y) and gy * xhat, chunked like the statistics; the
// chunk partials are merged in order in double.
template <typename T, typename A>
void grad_sums(const T* gr, const T* x, const Geometry& g, const Coefs<A>& k,
               std::vector<double>& sum_gy, std::vector<double>& sum_gy_xhat) {
  const int64_t C = g.C;
  if (g.nhwc) {
    const int64_t chunks = ceil_div(g.M, kRowsPerChunk);
    std::vector<A> p_gy(chunks * C, A(0)), p_gyx(chunks * C, A(0));
    at::parallel_for(0, chunks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        A* s_gy = &p_gy[b * C];
        A* s_gyx = &p_gyx[b * C];
        const int64_t r0 = b * kRowsPerChunk, r1 = std::min(g.M, r0 + kRowsPerChunk);
        for (int64_t r = r0; r < r1; ++r) {
          const T* xr = x + r * C;
          const T* gr_r = gr + r * C;
          for (int64_t c = 0; c < C; ++c) {
            const A xv = A(xr[c]);
            const A gy = relu_grad(A(gr_r[c]), xv, k[c]);
            s_gy[c] += gy;
            s_gyx[c] += gy * bn_xhat(xv, k[c]);
          }
        }
      }
    });
    for (int64_t b = 0; b < chunks; ++b)
      for (int64_t c = 0; c < C; ++c) {
        sum_gy[c] += p_gy[b * C + c];
        sum_gy_xhat[c] += p_gyx[b * C + c];
      }
  } else {
    const int64_t L = g.N * g.HW;
    const int64_t chunks = ceil_div(L, kElemsPerChunk);
    std::vector<A> p_gy(C * chunks, A(0)), p_gyx(C * chunks, A(0));
    at::parallel_for(0, C * chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c = t / chunks, b = t % chunks;
        const int64_t j0 = b * kElemsPerChunk, j1 = std::min(L, j0 + kElemsPerChunk);
        A s_gy = 0, s_gyx = 0;
        const ChannelCoef<A> kc = k[c];
        for (int64_t j = j0; j < j1;) {
          const int64_t n_idx = j / g.HW, hw = j % g.HW, len = std::min(g.HW - hw, j1 - j);
          const int64_t base = (n_idx * C + c) * g.HW + hw;
          for (int64_t i = 0; i < len; ++i) {
            const A xv = A(x[base + i]);
            const A gy = relu_grad(A(gr[base + i]), xv, kc);
            s_gy += gy;
            s_gyx += gy * bn_xhat(xv, kc);
          }
          j += len;
        }
        p_gy[t] = s_gy;
        p_gyx[t] = s_gyx;
      }
    });
    for (int64_t c = 0; c < C; ++c)
      for (int64_t b = 0; b < chunks; ++b) {
        sum_gy[c] += p_gy[c * chunks + b];
        sum_gy_xhat[c] += p_gyx[c * chunks + b];
      }
  }
}

template <typename T, typename A>
void grad_x_elementwise(const T* gr, const T* x, T* dx, const Geometry& g, const Coefs<A>& k,
                        const std::vector<A>& mean_gy, const std::vector<A>& mean_gy_xhat,
                        bool training) {
  // grad_x of elements [i0, i1) of channel c (NHWC: c varies with i; NCHW: fixed per plane).
  auto row = [&](int64_t i0, int64_t n, int64_t stride_c, int64_t c0) {
    const T* xr = x + i0;
    const T* gr_r = gr + i0;
    T* dr = dx + i0;
    if (training) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c = c0 + i * stride_c;
        const A xv = A(xr[i]);
        const A gy = relu_grad(A(gr_r[i]), xv, k[c]);
        dr[i] = T(bn_grad_x_train(gy, bn_xhat(xv, k[c]), k[c], mean_gy[c], mean_gy_xhat[c]));
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c = c0 + i * stride_c;
        const A xv = A(xr[i]);
        dr[i] = T(bn_grad_x_eval(relu_grad(A(gr_r[i]), xv, k[c]), k[c]));
      }
    }
  };
  if (g.nhwc) {
    const int64_t grain = std::max<int64_t>(1, 32768 / g.C);
    at::parallel_for(0, g.M, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row(r * g.C, g.C, 1, 0);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 32768 / g.HW);
    at::parallel_for(0, g.N * g.C, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) row(p * g.HW, g.HW, 0, p % g.C);
    });
  }
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_backward_cpu(const Tensor& grad_in, const Tensor& x_in,
                                                        const OptTensor& weight,
                                                        const OptTensor& bias, const Tensor& mean,
                                                        const Tensor& var, bool training,
                                                        double eps) {
  check_backward("bn_relu_backward", grad_in, x_in, weight, bias, mean, var, c10::DeviceType::CPU);
  const Geometry g = bn_geometry(x_in);
  const Tensor x = x_in.contiguous(g.format);
  const Tensor gr = grad_in.contiguous(g.format);
  Tensor dx = at::empty_like(x);
  const auto acc = acc_dtype(x.scalar_type());
  const auto wdtype = has(weight) ? weight->scalar_type() : acc;
  const auto bdtype = has(bias) ? bias->scalar_type() : acc;
  Tensor grad_weight = at::zeros({g.C}, x.options().dtype(acc));
  Tensor grad_bias = at::zeros({g.C}, x.options().dtype(acc));
  if (x.numel() > 0) {
    const Params p = acc_params(weight, bias, acc);
    const Tensor mean_a = mean.to(acc).contiguous(), var_a = var.to(acc).contiguous();
    FT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "bn_relu_backward_cpu", [&] {
      using A = acc_t<scalar_t>;
      const auto k = channel_coefs<A>(mean_a.const_data_ptr<A>(), var_a.const_data_ptr<A>(),
                                      ptr_or_null<A>(p.weight), ptr_or_null<A>(p.bias), g.C, eps);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gp = gr.const_data_ptr<scalar_t>();
      std::vector<double> sum_gy(g.C, 0.0), sum_gy_xhat(g.C, 0.0);
      grad_sums<scalar_t, A>(gp, xp, g, k, sum_gy, sum_gy_xhat);
      std::vector<A> mean_gy(g.C), mean_gy_xhat(g.C);
      A* gw = grad_weight.data_ptr<A>();
      A* gb = grad_bias.data_ptr<A>();
      for (int64_t c = 0; c < g.C; ++c) {
        gw[c] = A(sum_gy_xhat[c]);
        gb[c] = A(sum_gy[c]);
        mean_gy[c] = A(sum_gy[c] / double(g.M));
        mean_gy_xhat[c] = A(sum_gy_xhat[c] / double(g.M));
      }
      grad_x_elementwise<scalar_t, A>(gp, xp, dx.data_ptr<scalar_t>(), g, k, mean_gy,
                                      mean_gy_xhat, training);
    });
  }
  return {dx, grad_weight.to(wdtype), grad_bias.to(bdtype)};
}

// ---- running statistics ----------------------------------------------------------------------

void bn_update_running_stats_cpu(const Tensor& running_mean, const Tensor& running_var,
                                 const Tensor& mean, const Tensor& var, double momentum,
                                 int64_t count) {
  check_update("bn_update_running_stats", running_mean, running_var, mean, var, count,
               c10::DeviceType::CPU);
  if (count == 0) return;  // an empty batch carries no statistics (as aten's batch_norm)
  const int64_t C = running_mean.numel();
  FT_DISPATCH_FLOAT_TYPES(running_mean.scalar_type(), "bn_update_running_stats_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    const Tensor mean_a = mean.to(acc).contiguous(), var_a = var.to(acc).contiguous();
    const A* mp = mean_a.const_data_ptr<A>();
    const A* vp = var_a.const_data_ptr<A>();
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    const A unbias = A(double(count) / double(count - 1));  // count 1: inf, var 0 -> NaN like aten
    for (int64_t c = 0; c < C; ++c) {
      A m = A(rm[c]), v = A(rv[c]);
      bn_running_update(m, v, mp[c], vp[c], A(momentum), unbias);
      rm[c] = scalar_t(m);
      rv[c] = scalar_t(v);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("bn_relu_forward", &bn_relu_forward_cpu);
  m.impl("bn_relu_backward", &bn_relu_backward_cpu);
  m.impl("bn_update_running_stats", &bn_update_running_stats_cpu);
}

}  // namespace fasttrain
