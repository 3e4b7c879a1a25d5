// CUDA kernels of the fused BatchNorm+ReLU over the shared per-element math of bn_relu.h.
//
// Training forward: a per-channel Welford reduction over N*H*W writes one partial per block row
// (stats_*_kernel), a small kernel merges the partials in a fixed order (stats_finalize_kernel),
// and one elementwise pass writes y (forward_*_kernel). Eval forward is that last pass alone.
// Backward: per-channel sums of the masked gradient (grad_sums_*_kernel, grad_finalize_kernel),
// then one elementwise pass for grad_x (grad_x_*_kernel). Partials are merged in a fixed order:
// results do not depend on scheduling.
//
// NHWC (channels_last) is the main path: blocks are (channel vectors) x (rows); every thread owns
// V adjacent channels loaded with one 16-byte access (V = 8 for 16-bit types, 4 for fp32) and
// walks rows, so a warp reads contiguous memory. When C (or the alignment) does not allow 16-byte
// vectors, a narrower V is used, down to single elements: any C is correct.
// NCHW walks each channel's N planes of H*W, vectorised over H*W when it divides.
//
// Only c10/cuda headers are included: ATen/cuda/CUDAContext.h pulls in cusparse.h, which the
// toolkit nvcc ships with does not carry on every machine.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "bn_relu.h"
#include "checks.h"

namespace fasttrain {
namespace {

using at::Tensor;

constexpr int kThreads = 256;  // threads per block of every reduction and elementwise kernel
constexpr int kUnroll = 4;     // rows in flight per thread: independent loads hide latency
constexpr int kFinalX = 32, kFinalY = 8;  // finalize blocks: 32 channels x 8 partial lanes
constexpr int kFinalPrefetch = 8;          // partials each lane loads before merging them

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

template <typename T, int V, typename A>
__device__ __forceinline__ void load_coefs(ChannelCoef<A> (&k)[V], int c0, const A* mean,
                                           const A* var, const A* weight, const A* bias, A eps) {
#pragma unroll
  for (int i = 0; i < V; ++i)
    k[i] = bn_channel_coef(mean[c0 + i], var[c0 + i], weight, bias, c0 + i, eps);
}

// ---- statistics -------------------------------------------------------------------------------
// part layout: [3 * parts + 1][C] = (mean, m2, count) of each partial, then the channel's shift
// (its first element, see welford_add): partials accumulate x - shift.

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
    stats_nhwc_kernel(const T* __restrict__ x, int64_t M, int C, A* __restrict__ part, int parts) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int cv = blockIdx.x * bx + tx;
  A mean[V], m2[V];
#pragma unroll
  for (int i = 0; i < V; ++i) mean[i] = m2[i] = A(0);
  A n = 0;
  if (cv < C / V) {
    const T* base = x + int64_t(cv) * V;
    const Vec<T, V> first = load_vec<T, V>(base);  // row 0: the shift
    A shift[V];
#pragma unroll
    for (int i = 0; i < V; ++i) shift[i] = A(first.v[i]);
    if (blockIdx.y == 0 && ty == 0) {
#pragma unroll
      for (int i = 0; i < V; ++i) part[3 * int64_t(parts) * C + cv * V + i] = shift[i];
    }
    const int64_t step = int64_t(gridDim.y) * by;
    int64_t r = int64_t(blockIdx.y) * by + ty;
    for (; r + (kUnroll - 1) * step < M; r += kUnroll * step) {
      Vec<T, V> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load_vec<T, V>(base + (r + u * step) * C);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        n += A(1);
        const A inv = A(1) / n;
#pragma unroll
        for (int i = 0; i < V; ++i) welford_add(mean[i], m2[i], A(v[u].v[i]) - shift[i], inv);
      }
    }
    for (; r < M; r += step) {
      const Vec<T, V> v = load_vec<T, V>(base + r * C);
      n += A(1);
      const A inv = A(1) / n;
#pragma unroll
      for (int i = 0; i < V; ++i) welford_add(mean[i], m2[i], A(v.v[i]) - shift[i], inv);
    }
  }
  // Tree over the block's rows (by is a power of two).
  __shared__ A s_mean[kThreads * V], s_m2[kThreads * V], s_n[kThreads];
  const int tid = ty * bx + tx;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    s_mean[tid * V + i] = mean[i];
    s_m2[tid * V + i] = m2[i];
  }
  s_n[tid] = n;
  __syncthreads();
  for (int s = by / 2; s > 0; s >>= 1) {
    if (ty < s) {
      const int o = (ty + s) * bx + tx;
      const A nb = s_n[o];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        welford_combine(mean[i], m2[i], n, s_mean[o * V + i], s_m2[o * V + i], nb);
        s_mean[tid * V + i] = mean[i];
        s_m2[tid * V + i] = m2[i];
      }
      n += nb;
      s_n[tid] = n;
    }
    __syncthreads();
  }
  if (ty == 0 && cv < C / V) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int64_t idx = int64_t(blockIdx.y) * C + cv * V + i;
      part[idx] = mean[i];
      part[int64_t(parts) * C + idx] = m2[i];
      part[2 * int64_t(parts) * C + idx] = n;
    }
  }
}

// Block-wide Welford merge over kThreads threads; thread 0 ends with the block's total.
template <typename A>
__device__ __forceinline__ void block_welford(A& mean, A& m2, A& n) {
  __shared__ A s_mean[kThreads], s_m2[kThreads], s_n[kThreads];
  const int tid = threadIdx.x;
  s_mean[tid] = mean;
  s_m2[tid] = m2;
  s_n[tid] = n;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      const A nb = s_n[tid + s];
      welford_combine(mean, m2, n, s_mean[tid + s], s_m2[tid + s], nb);
      n += nb;
      s_mean[tid] = mean;
      s_m2[tid] = m2;
      s_n[tid] = n;
    }
    __syncthreads();
  }
}

// grid (C, parts): block (c, p) reduces a strided share of channel c's N*H*W elements.
template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
    stats_nchw_kernel(const T* __restrict__ x, int64_t N, int C, int64_t HW, A* __restrict__ part,
                      int parts) {
  const int c = blockIdx.x;
  const int64_t HWV = HW / V, L = N * HWV;
  const A shift = A(x[int64_t(c) * HW]);  // x[0, c, 0, 0]
  if (blockIdx.y == 0 && threadIdx.x == 0) part[3 * int64_t(parts) * C + c] = shift;
  A mean[V], m2[V];
#pragma unroll
  for (int i = 0; i < V; ++i) mean[i] = m2[i] = A(0);
  A n = 0;
  const int64_t step = int64_t(gridDim.y) * kThreads;
  for (int64_t j = int64_t(blockIdx.y) * kThreads + threadIdx.x; j < L; j += step) {
    const int64_t ni = j / HWV, hv = j - ni * HWV;
    const Vec<T, V> v = load_vec<T, V>(x + (ni * C + c) * HW + hv * V);
    n += A(1);
    const A inv = A(1) / n;
#pragma unroll
    for (int i = 0; i < V; ++i) welford_add(mean[i], m2[i], A(v.v[i]) - shift, inv);
  }
  // The lanes all counted n elements: fold them into lane 0.
  A tm = mean[0], tm2 = m2[0], tn = n;
#pragma unroll
  for (int i = 1; i < V; ++i) {
    welford_combine(tm, tm2, tn, mean[i], m2[i], n);
    tn += n;
  }
  block_welford(tm, tm2, tn);
  if (threadIdx.x == 0) {
    const int64_t idx = int64_t(blockIdx.y) * C + c;
    part[idx] = tm;
    part[int64_t(parts) * C + idx] = tm2;
    part[2 * int64_t(parts) * C + idx] = tn;
  }
}

// Merges the partials of each channel in a fixed order into (mean, biased var).
template <typename A>
__global__ void __launch_bounds__(kFinalX* kFinalY)
    stats_finalize_kernel(const A* __restrict__ part, int parts, int C, A* __restrict__ mean_out,
                          A* __restrict__ var_out) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kFinalX + tx;
  A mean = 0, m2 = 0, n = 0;
  if (c < C) {
    // The partials of kFinalPrefetch steps are loaded before any is merged: the merge (a
    // division) sits between the loads otherwise, and one lane walking up to ~66 partials then
    // waits a full memory round trip per partial (H200: 30-50 us per call, the plain sums of
    // grad_finalize_kernel 6-9 us). Same partials, same order, same result as one at a time;
    // a partial past the end has count 0, which welford_combine skips.
    for (int p0 = ty; p0 < parts; p0 += kFinalY * kFinalPrefetch) {
      A pm[kFinalPrefetch], pm2[kFinalPrefetch], pn[kFinalPrefetch];
#pragma unroll
      for (int j = 0; j < kFinalPrefetch; ++j) {
        const int p = p0 + j * kFinalY;
        const int64_t idx = int64_t(p < parts ? p : 0) * C + c;
        pm[j] = part[idx];
        pm2[j] = part[int64_t(parts) * C + idx];
        pn[j] = p < parts ? part[2 * int64_t(parts) * C + idx] : A(0);
      }
#pragma unroll
      for (int j = 0; j < kFinalPrefetch; ++j) {
        welford_combine(mean, m2, n, pm[j], pm2[j], pn[j]);
        n += pn[j];
      }
    }
  }
  __shared__ A s_mean[kFinalY][kFinalX], s_m2[kFinalY][kFinalX], s_n[kFinalY][kFinalX];
  s_mean[ty][tx] = mean;
  s_m2[ty][tx] = m2;
  s_n[ty][tx] = n;
  __syncthreads();
  for (int s = kFinalY / 2; s > 0; s >>= 1) {
    if (ty < s) {
      const A nb = s_n[ty + s][tx];
      welford_combine(mean, m2, n, s_mean[ty + s][tx], s_m2[ty + s][tx], nb);
      n += nb;
      s_mean[ty][tx] = mean;
      s_m2[ty][tx] = m2;
      s_n[ty][tx] = n;
    }
    __syncthreads();
  }
  if (ty == 0 && c < C) {
    mean_out[c] = part[3 * int64_t(parts) * C + c] + mean;
    var_out[c] = m2 / n;
  }
}

// ---- forward elementwise ------------------------------------------------------------------------
// save_mean/save_var (eval only): copies of the statistics used, returned by the op.

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
    forward_nhwc_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t M, int C,
                        const A* __restrict__ mean, const A* __restrict__ var,
                        const A* __restrict__ weight, const A* __restrict__ bias, A eps,
                        A* __restrict__ save_mean, A* __restrict__ save_var) {
  const int cv = blockIdx.x * blockDim.x + threadIdx.x;
  if (cv >= C / V) return;
  ChannelCoef<A> k[V];
  load_coefs<T, V>(k, cv * V, mean, var, weight, bias, eps);
  if (save_mean != nullptr && blockIdx.y == 0 && threadIdx.y == 0) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      save_mean[cv * V + i] = mean[cv * V + i];
      save_var[cv * V + i] = var[cv * V + i];
    }
  }
  const T* xb = x + int64_t(cv) * V;
  T* yb = y + int64_t(cv) * V;
  const int64_t step = int64_t(gridDim.y) * blockDim.y;
  int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y;
  for (; r + (kUnroll - 1) * step < M; r += kUnroll * step) {
    Vec<T, V> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = load_vec<T, V>(xb + (r + u * step) * C);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int i = 0; i < V; ++i) v[u].v[i] = T(bn_relu_forward(A(v[u].v[i]), k[i]));
      store_vec<T, V>(yb + (r + u * step) * C, v[u]);
    }
  }
  for (; r < M; r += step) {
    Vec<T, V> v = load_vec<T, V>(xb + r * C);
#pragma unroll
    for (int i = 0; i < V; ++i) v.v[i] = T(bn_relu_forward(A(v.v[i]), k[i]));
    store_vec<T, V>(yb + r * C, v);
  }
}

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
    forward_nchw_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t total_vec, int C,
                        int64_t HW, const A* __restrict__ mean, const A* __restrict__ var,
                        const A* __restrict__ weight, const A* __restrict__ bias, A eps,
                        A* __restrict__ save_mean, A* __restrict__ save_var) {
  if (save_mean != nullptr && blockIdx.x == 0) {
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      save_mean[c] = mean[c];
      save_var[c] = var[c];
    }
  }
  const int64_t HWV = HW / V;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < total_vec;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int c = int((j / HWV) % C);
    const ChannelCoef<A> k = bn_channel_coef(mean[c], var[c], weight, bias, c, eps);
    Vec<T, V> v = load_vec<T, V>(x + j * V);
#pragma unroll
    for (int i = 0; i < V; ++i) v.v[i] = T(bn_relu_forward(A(v.v[i]), k));
    store_vec<T, V>(y + j * V, v);
  }
}

// ---- backward ----------------------------------------------------------------------------------
// part layout: [2][parts][C] = (sum gy, sum gy * xhat) of each partial.

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
    grad_sums_nhwc_kernel(const T* __restrict__ g, const T* __restrict__ x, int64_t M, int C,
                          const A* __restrict__ mean, const A* __restrict__ var,
                          const A* __restrict__ weight, const A* __restrict__ bias, A eps,
                          A* __restrict__ part, int parts) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int cv = blockIdx.x * bx + tx;
  A s_gy[V], s_gyx[V];
#pragma unroll
  for (int i = 0; i < V; ++i) s_gy[i] = s_gyx[i] = A(0);
  if (cv < C / V) {
    ChannelCoef<A> k[V];
    load_coefs<T, V>(k, cv * V, mean, var, weight, bias, eps);
    const T* gb = g + int64_t(cv) * V;
    const T* xb = x + int64_t(cv) * V;
    const int64_t step = int64_t(gridDim.y) * by;
    int64_t r = int64_t(blockIdx.y) * by + ty;
    for (; r + (kUnroll - 1) * step < M; r += kUnroll * step) {
      Vec<T, V> gv[kUnroll], xv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        gv[u] = load_vec<T, V>(gb + (r + u * step) * C);
        xv[u] = load_vec<T, V>(xb + (r + u * step) * C);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const A xa = A(xv[u].v[i]);
          const A gy = relu_grad(A(gv[u].v[i]), xa, k[i]);
          s_gy[i] += gy;
          s_gyx[i] += gy * bn_xhat(xa, k[i]);
        }
    }
    for (; r < M; r += step) {
      const Vec<T, V> gv = load_vec<T, V>(gb + r * C), xv = load_vec<T, V>(xb + r * C);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A xa = A(xv.v[i]);
        const A gy = relu_grad(A(gv.v[i]), xa, k[i]);
        s_gy[i] += gy;
        s_gyx[i] += gy * bn_xhat(xa, k[i]);
      }
    }
  }
  __shared__ A sh_gy[kThreads * V], sh_gyx[kThreads * V];
  const int tid = ty * bx + tx;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    sh_gy[tid * V + i] = s_gy[i];
    sh_gyx[tid * V + i] = s_gyx[i];
  }
  __syncthreads();
  for (int s = by / 2; s > 0; s >>= 1) {
    if (ty < s) {
      const int o = (ty + s) * bx + tx;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        s_gy[i] += sh_gy[o * V + i];
        s_gyx[i] += sh_gyx[o * V + i];
        sh_gy[tid * V + i] = s_gy[i];
        sh_gyx[tid * V + i] = s_gyx[i];
      }
    }
    __syncthreads();
  }
  if (ty == 0 && cv < C / V) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int64_t idx = int64_t(blockIdx.y) * C + cv * V + i;
      part[idx] = s_gy[i];
      part[int64_t(parts) * C + idx] = s_gyx[i];
    }
  }
}

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
    grad_sums_nchw_kernel(const T* __restrict__ g, const T* __restrict__ x, int64_t N, int C,
                          int64_t HW, const A* __restrict__ mean, const A* __restrict__ var,
                          const A* __restrict__ weight, const A* __restrict__ bias, A eps,
                          A* __restrict__ part, int parts) {
  const int c = blockIdx.x;
  const ChannelCoef<A> k = bn_channel_coef(mean[c], var[c], weight, bias, c, eps);
  const int64_t HWV = HW / V, L = N * HWV;
  A s_gy = 0, s_gyx = 0;
  const int64_t step = int64_t(gridDim.y) * kThreads;
  for (int64_t j = int64_t(blockIdx.y) * kThreads + threadIdx.x; j < L; j += step) {
    const int64_t ni = j / HWV, hv = j - ni * HWV;
    const int64_t off = (ni * C + c) * HW + hv * V;
    const Vec<T, V> gv = load_vec<T, V>(g + off), xv = load_vec<T, V>(x + off);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const A xa = A(xv.v[i]);
      const A gy = relu_grad(A(gv.v[i]), xa, k);
      s_gy += gy;
      s_gyx += gy * bn_xhat(xa, k);
    }
  }
  __shared__ A sh_gy[kThreads], sh_gyx[kThreads];
  const int tid = threadIdx.x;
  sh_gy[tid] = s_gy;
  sh_gyx[tid] = s_gyx;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      sh_gy[tid] = s_gy = s_gy + sh_gy[tid + s];
      sh_gyx[tid] = s_gyx = s_gyx + sh_gyx[tid + s];
    }
    __syncthreads();
  }
  if (tid == 0) {
    const int64_t idx = int64_t(blockIdx.y) * C + c;
    part[idx] = s_gy;
    part[int64_t(parts) * C + idx] = s_gyx;
  }
}

// Sums the partials of each channel in a fixed order: grad_bias, grad_weight, and the two means
// grad_x needs in training (mean_gy: [2][C]).
template <typename A>
__global__ void __launch_bounds__(kFinalX* kFinalY)
    grad_finalize_kernel(const A* __restrict__ part, int parts, int C, int64_t M,
                         A* __restrict__ grad_weight, A* __restrict__ grad_bias,
                         A* __restrict__ mean_gy) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kFinalX + tx;
  A s_gy = 0, s_gyx = 0;
  if (c < C) {
    for (int p = ty; p < parts; p += kFinalY) {
      s_gy += part[int64_t(p) * C + c];
      s_gyx += part[int64_t(parts) * C + int64_t(p) * C + c];
    }
  }
  __shared__ A sh_gy[kFinalY][kFinalX], sh_gyx[kFinalY][kFinalX];
  sh_gy[ty][tx] = s_gy;
  sh_gyx[ty][tx] = s_gyx;
  __syncthreads();
  for (int s = kFinalY / 2; s > 0; s >>= 1) {
    if (ty < s) {
      sh_gy[ty][tx] = s_gy = s_gy + sh_gy[ty + s][tx];
      sh_gyx[ty][tx] = s_gyx = s_gyx + sh_gyx[ty + s][tx];
    }
    __syncthreads();
  }
  if (ty == 0 && c < C) {
    grad_bias[c] = s_gy;
    grad_weight[c] = s_gyx;
    mean_gy[c] = s_gy / A(M);
    mean_gy[C + c] = s_gyx / A(M);
  }
}

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
    grad_x_nhwc_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx,
                       int64_t M, int C, const A* __restrict__ mean, const A* __restrict__ var,
                       const A* __restrict__ weight, const A* __restrict__ bias, A eps,
                       const A* __restrict__ mean_gy, bool training) {
  const int cv = blockIdx.x * blockDim.x + threadIdx.x;
  if (cv >= C / V) return;
  ChannelCoef<A> k[V];
  load_coefs<T, V>(k, cv * V, mean, var, weight, bias, eps);
  A mg[V], mgx[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    mg[i] = training ? mean_gy[cv * V + i] : A(0);
    mgx[i] = training ? mean_gy[C + cv * V + i] : A(0);
  }
  const T* gb = g + int64_t(cv) * V;
  const T* xb = x + int64_t(cv) * V;
  T* db = dx + int64_t(cv) * V;
  const int64_t step = int64_t(gridDim.y) * blockDim.y;
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < M; r += step) {
    const Vec<T, V> gv = load_vec<T, V>(gb + r * C), xv = load_vec<T, V>(xb + r * C);
    Vec<T, V> out;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const A xa = A(xv.v[i]);
      const A gy = relu_grad(A(gv.v[i]), xa, k[i]);
      out.v[i] = T(training ? bn_grad_x_train(gy, bn_xhat(xa, k[i]), k[i], mg[i], mgx[i])
                            : bn_grad_x_eval(gy, k[i]));
    }
    store_vec<T, V>(db + r * C, out);
  }
}

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
    grad_x_nchw_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx,
                       int64_t total_vec, int C, int64_t HW, const A* __restrict__ mean,
                       const A* __restrict__ var, const A* __restrict__ weight,
                       const A* __restrict__ bias, A eps, const A* __restrict__ mean_gy,
                       bool training) {
  const int64_t HWV = HW / V;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < total_vec;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int c = int((j / HWV) % C);
    const ChannelCoef<A> k = bn_channel_coef(mean[c], var[c], weight, bias, c, eps);
    const A mg = training ? mean_gy[c] : A(0), mgx = training ? mean_gy[C + c] : A(0);
    const Vec<T, V> gv = load_vec<T, V>(g + j * V), xv = load_vec<T, V>(x + j * V);
    Vec<T, V> out;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const A xa = A(xv.v[i]);
      const A gy = relu_grad(A(gv.v[i]), xa, k);
      out.v[i] = T(training ? bn_grad_x_train(gy, bn_xhat(xa, k), k, mg, mgx)
                            : bn_grad_x_eval(gy, k));
    }
    store_vec<T, V>(dx + j * V, out);
  }
}

template <typename R, typename A>
__global__ void update_running_stats_kernel(R* __restrict__ running_mean,
                                            R* __restrict__ running_var,
                                            const A* __restrict__ mean, const A* __restrict__ var,
                                            int C, A momentum, A unbias) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  A rm = A(running_mean[c]), rv = A(running_var[c]);
  bn_running_update(rm, rv, mean[c], var[c], momentum, unbias);
  running_mean[c] = R(rm);
  running_var[c] = R(rv);
}

// ---- host side ---------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count(int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  return v;
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// The widest vector (in elements) that divides the contiguous extent (C for NHWC, H*W for NCHW)
// and keeps every pointer aligned: 16 bytes, else 4 bytes, else one element.
template <typename T>
int pick_vec(int64_t extent, std::initializer_list<const void*> ptrs) {
  const int candidates[] = {int(16 / sizeof(T)), int(4 / sizeof(T)), 1};
  for (int v : candidates) {
    if (v < 1 || extent % v != 0) continue;
    bool ok = true;
    for (const void* p : ptrs) ok = ok && aligned(p, v * int(sizeof(T)));
    if (ok) return v;
  }
  return 1;
}

// Calls f(std::integral_constant<int, V>) for the V chosen by pick_vec.
template <typename T, typename F>
void with_vec(int v, F&& f) {
  if constexpr (sizeof(T) == 2) {
    if (v == 8) return f(std::integral_constant<int, 8>());
    if (v == 2) return f(std::integral_constant<int, 2>());
  } else if constexpr (sizeof(T) == 4) {
    if (v == 4) return f(std::integral_constant<int, 4>());
  }
  f(std::integral_constant<int, 1>());
}

// Blocks of `kernel` (kThreads threads each) that one SM holds at once, from its registers and
// shared memory. Grids are sized to SMs x this: one full wave. A fixed guess above it (the
// reductions at V = 8 hold 80 registers a thread by ptxas on sm_90, so 4 blocks of 256 do not
// fit on one SM) leaves a second, partly empty wave, and a grid-stride kernel then takes up to twice as long.
template <typename Kernel>
int resident_blocks(Kernel kernel) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
  return std::max(n, 1);
}

// NHWC launch shape: bx threads over channel vectors (a power of two up to a warp), by over rows;
// grid.y fills the GPU with `blocks_per_sm` blocks per SM.
struct Launch {
  dim3 grid, block;
};

Launch nhwc_launch(int64_t M, int64_t CV, int sms, int blocks_per_sm) {
  int bx = 1;
  while (bx < CV && bx < 32) bx *= 2;
  const int by = kThreads / bx;
  const int64_t gx = ceil_div(CV, bx);
  const int64_t want = std::max<int64_t>(1, int64_t(sms) * blocks_per_sm / gx);
  const int64_t gy = std::min<int64_t>({ceil_div(M, by), want, 65535});
  return {dim3(unsigned(gx), unsigned(gy)), dim3(bx, by)};
}

// NCHW reduction grid: one block column per channel, enough rows of blocks to fill the GPU.
int nchw_parts(int64_t C, int64_t per_channel_vecs, int sms, int blocks_per_sm) {
  const int64_t want = std::max<int64_t>(1, ceil_div(int64_t(sms) * blocks_per_sm, C));
  return int(std::min<int64_t>({want, ceil_div(per_channel_vecs, kThreads), 65535}));
}

int64_t flat_blocks(int64_t total_vec, int sms, int blocks_per_sm) {
  return std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(total_vec, kThreads), int64_t(sms) * blocks_per_sm));
}

template <typename A>
const A* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

Tensor acc_or_undefined(const OptTensor& t, at::ScalarType acc) {
  return has(t) ? t->to(acc).contiguous() : Tensor();
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_forward_cuda(const Tensor& x_in, const OptTensor& weight,
                                                        const OptTensor& bias,
                                                        const OptTensor& running_mean,
                                                        const OptTensor& running_var,
                                                        bool training, double eps) {
  check_forward("bn_relu_forward", x_in, weight, bias, running_mean, running_var, training,
                c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Geometry g = bn_geometry(x_in);
  const Tensor x = x_in.contiguous(g.format);
  Tensor y = at::empty_like(x);
  const auto acc = acc_dtype(x.scalar_type());
  Tensor mean = at::empty({g.C}, x.options().dtype(acc));
  Tensor var = at::empty({g.C}, x.options().dtype(acc));
  if (x.numel() == 0) {
    if (training) {
      mean.zero_();
      var.zero_();
    } else {
      mean.copy_(*running_mean);
      var.copy_(*running_var);
    }
    return {y, mean, var};
  }
  const Tensor w = acc_or_undefined(weight, acc), b = acc_or_undefined(bias, acc);
  Tensor rmean, rvar;
  if (!training) {
    rmean = running_mean->to(acc).contiguous();
    rvar = running_var->to(acc).contiguous();
  }
  const int sms = sm_count(x.get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int C = int(g.C);
  FT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "bn_relu_forward_cuda", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const int vec = pick_vec<T>(g.nhwc ? g.C : g.HW, {xp, yp});
    with_vec<T>(vec, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      const A* mp;
      const A* vp;
      A* save_m = nullptr;
      A* save_v = nullptr;
      if (training) {
        Tensor part;
        int parts;
        if (g.nhwc) {
          static const int occupancy = resident_blocks(stats_nhwc_kernel<T, A, V>);
          const Launch l = nhwc_launch(g.M, g.C / V, sms, occupancy);
          parts = int(l.grid.y);
          part = at::empty({3 * parts + 1, g.C}, x.options().dtype(acc));
          stats_nhwc_kernel<T, A, V><<<l.grid, l.block, 0, stream>>>(
              xp, g.M, C, part.data_ptr<A>(), parts);
        } else {
          static const int occupancy = resident_blocks(stats_nchw_kernel<T, A, V>);
          parts = nchw_parts(g.C, g.N * (g.HW / V), sms, occupancy);
          part = at::empty({3 * parts + 1, g.C}, x.options().dtype(acc));
          stats_nchw_kernel<T, A, V><<<dim3(C, parts), kThreads, 0, stream>>>(
              xp, g.N, C, g.HW, part.data_ptr<A>(), parts);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const unsigned final_blocks = unsigned(ceil_div(g.C, kFinalX));
        stats_finalize_kernel<A><<<final_blocks, dim3(kFinalX, kFinalY), 0, stream>>>(
            part.const_data_ptr<A>(), parts, C, mean.data_ptr<A>(), var.data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        mp = mean.const_data_ptr<A>();
        vp = var.const_data_ptr<A>();
      } else {
        mp = rmean.const_data_ptr<A>();
        vp = rvar.const_data_ptr<A>();
        save_m = mean.data_ptr<A>();
        save_v = var.data_ptr<A>();
      }
      if (g.nhwc) {
        static const int occupancy = resident_blocks(forward_nhwc_kernel<T, A, V>);
        const Launch l = nhwc_launch(g.M, g.C / V, sms, occupancy);
        forward_nhwc_kernel<T, A, V><<<l.grid, l.block, 0, stream>>>(
            xp, yp, g.M, C, mp, vp, ptr_or_null<A>(w), ptr_or_null<A>(b), A(eps), save_m, save_v);
      } else {
        const int64_t total_vec = x.numel() / V;
        static const int occupancy = resident_blocks(forward_nchw_kernel<T, A, V>);
        const unsigned blocks = unsigned(flat_blocks(total_vec, sms, occupancy));
        forward_nchw_kernel<T, A, V><<<blocks, kThreads, 0, stream>>>(
            xp, yp, total_vec, C, g.HW, mp, vp, ptr_or_null<A>(w), ptr_or_null<A>(b), A(eps),
            save_m, save_v);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_backward_cuda(const Tensor& grad_in, const Tensor& x_in,
                                                         const OptTensor& weight,
                                                         const OptTensor& bias, const Tensor& mean,
                                                         const Tensor& var, bool training,
                                                         double eps) {
  check_backward("bn_relu_backward", grad_in, x_in, weight, bias, mean, var, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Geometry g = bn_geometry(x_in);
  const Tensor x = x_in.contiguous(g.format);
  const Tensor gr = grad_in.contiguous(g.format);
  Tensor dx = at::empty_like(x);
  const auto acc = acc_dtype(x.scalar_type());
  const auto wdtype = has(weight) ? weight->scalar_type() : acc;
  const auto bdtype = has(bias) ? bias->scalar_type() : acc;
  Tensor grad_weight = at::empty({g.C}, x.options().dtype(acc));
  Tensor grad_bias = at::empty({g.C}, x.options().dtype(acc));
  if (x.numel() == 0) {
    return {dx, grad_weight.zero_().to(wdtype), grad_bias.zero_().to(bdtype)};
  }
  const Tensor w = acc_or_undefined(weight, acc), b = acc_or_undefined(bias, acc);
  const Tensor mean_a = mean.to(acc).contiguous(), var_a = var.to(acc).contiguous();
  Tensor mean_gy = at::empty({2, g.C}, x.options().dtype(acc));
  const int sms = sm_count(x.get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int C = int(g.C);
  FT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "bn_relu_backward_cuda", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* xp = x.const_data_ptr<T>();
    const T* gp = gr.const_data_ptr<T>();
    T* dp = dx.data_ptr<T>();
    const A* mp = mean_a.const_data_ptr<A>();
    const A* vp = var_a.const_data_ptr<A>();
    const A* wp = ptr_or_null<A>(w);
    const A* bp = ptr_or_null<A>(b);
    const int vec = pick_vec<T>(g.nhwc ? g.C : g.HW, {xp, gp, dp});
    with_vec<T>(vec, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      Tensor part;
      int parts;
      if (g.nhwc) {
        static const int occupancy = resident_blocks(grad_sums_nhwc_kernel<T, A, V>);
        const Launch l = nhwc_launch(g.M, g.C / V, sms, occupancy);
        parts = int(l.grid.y);
        part = at::empty({2, parts, g.C}, x.options().dtype(acc));
        grad_sums_nhwc_kernel<T, A, V><<<l.grid, l.block, 0, stream>>>(
            gp, xp, g.M, C, mp, vp, wp, bp, A(eps), part.data_ptr<A>(), parts);
      } else {
        static const int occupancy = resident_blocks(grad_sums_nchw_kernel<T, A, V>);
        parts = nchw_parts(g.C, g.N * (g.HW / V), sms, occupancy);
        part = at::empty({2, parts, g.C}, x.options().dtype(acc));
        grad_sums_nchw_kernel<T, A, V><<<dim3(C, parts), kThreads, 0, stream>>>(
            gp, xp, g.N, C, g.HW, mp, vp, wp, bp, A(eps), part.data_ptr<A>(), parts);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const unsigned final_blocks = unsigned(ceil_div(g.C, kFinalX));
      grad_finalize_kernel<A><<<final_blocks, dim3(kFinalX, kFinalY), 0, stream>>>(
          part.const_data_ptr<A>(), parts, C, g.M, grad_weight.data_ptr<A>(),
          grad_bias.data_ptr<A>(), mean_gy.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (g.nhwc) {
        static const int occupancy = resident_blocks(grad_x_nhwc_kernel<T, A, V>);
        const Launch l = nhwc_launch(g.M, g.C / V, sms, occupancy);
        grad_x_nhwc_kernel<T, A, V><<<l.grid, l.block, 0, stream>>>(
            gp, xp, dp, g.M, C, mp, vp, wp, bp, A(eps), mean_gy.const_data_ptr<A>(), training);
      } else {
        const int64_t total_vec = x.numel() / V;
        static const int occupancy = resident_blocks(grad_x_nchw_kernel<T, A, V>);
        grad_x_nchw_kernel<T, A, V><<<unsigned(flat_blocks(total_vec, sms, occupancy)), kThreads, 0,
                                      stream>>>(
            gp, xp, dp, total_vec, C, g.HW, mp, vp, wp, bp, A(eps), mean_gy.const_data_ptr<A>(),
            training);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, grad_weight.to(wdtype), grad_bias.to(bdtype)};
}

void bn_update_running_stats_cuda(const Tensor& running_mean, const Tensor& running_var,
                                  const Tensor& mean, const Tensor& var, double momentum,
                                  int64_t count) {
  check_update("bn_update_running_stats", running_mean, running_var, mean, var, count,
               c10::DeviceType::CUDA);
  if (count == 0) return;  // an empty batch carries no statistics (as aten's batch_norm)
  const c10::cuda::CUDAGuard guard(running_mean.device());
  const int C = int(running_mean.numel());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FT_DISPATCH_FLOAT_TYPES(running_mean.scalar_type(), "bn_update_running_stats_cuda", [&] {
    using A = acc_t<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    const Tensor mean_a = mean.to(acc).contiguous(), var_a = var.to(acc).contiguous();
    const A unbias = A(double(count) / double(count - 1));  // count 1: inf, var 0 -> NaN like aten
    const unsigned blocks = unsigned(ceil_div(C, kThreads));
    update_running_stats_kernel<scalar_t, A><<<blocks, kThreads, 0, stream>>>(
        running_mean.data_ptr<scalar_t>(), running_var.data_ptr<scalar_t>(),
        mean_a.const_data_ptr<A>(), var_a.const_data_ptr<A>(), C, A(momentum), unbias);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CUDA, m) {
  m.impl("bn_relu_forward", &bn_relu_forward_cuda);
  m.impl("bn_relu_backward", &bn_relu_backward_cuda);
  m.impl("bn_update_running_stats", &bn_update_running_stats_cuda);
}

}  // namespace fasttrain
