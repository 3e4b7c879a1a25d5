// Input checks, layout decisions and dtype dispatch shared by the CPU and CUDA operators (host).
// Every failed check names the operator, the tensor and the offending value in one line.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>

// Dispatch over the dtypes of x the ops accept (fp32, fp64, fp16, bf16).
#define FT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace fasttrain {

using OptTensor = c10::optional<at::Tensor>;

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Accumulation dtype of the statistics and the returned mean/var: fp64 for fp64 x, else fp32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_x(const char* op, const char* name, const at::Tensor& x,
                    c10::DeviceType device) {
  TORCH_CHECK(x.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", x.dim(),
              "-D with shape ", x.sizes());
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().type() == device, op, ": ", name, " must be on ", device, ", got ",
              x.device());
  TORCH_CHECK(x.size(1) > 0, op, ": ", name, " must have at least one channel, got shape ",
              x.sizes());
}

// A per-channel vector (weight, bias, running stats, saved stats): 1-D, C elements, same device.
inline void check_channel(const char* op, const char* name, const at::Tensor& t, int64_t C,
                          const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == C, op, ": ", name, " must have shape (", C,
              ",) for ", C, " channels, got ", t.sizes());
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
              " like x, got ", t.device());
}

inline void check_opt_channel(const char* op, const char* name, const OptTensor& t, int64_t C,
                              const at::Tensor& x) {
  if (t.has_value() && t->defined()) check_channel(op, name, *t, C, x);
}

inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// How a kernel walks x: as rows of C channels (NHWC) or as N*C planes of H*W (NCHW).
//
// x is made contiguous in `format` (a no-op for NCHW- or channels_last-contiguous inputs) and the
// output is allocated like it, so the output keeps the input's layout; the Python fake kernel
// applies the same rule. A tensor contiguous in both formats (C == 1 or H*W == 1) has the same
// element order either way; it takes the NHWC walk when H*W == 1, whose loads are then coalesced.
struct Geometry {
  int64_t N, C, HW, M;  // M = N * H * W: the elements of one channel
  at::MemoryFormat format;
  bool nhwc;
};

inline Geometry bn_geometry(const at::Tensor& x) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.HW = x.size(2) * x.size(3);
  g.M = g.N * g.HW;
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  g.format = (cl && !x.is_contiguous()) ? at::MemoryFormat::ChannelsLast
                                        : at::MemoryFormat::Contiguous;
  g.nhwc = g.format == at::MemoryFormat::ChannelsLast || g.HW == 1;
  return g;
}

inline void check_forward(const char* op, const at::Tensor& x, const OptTensor& weight,
                          const OptTensor& bias, const OptTensor& running_mean,
                          const OptTensor& running_var, bool training, c10::DeviceType device) {
  check_x(op, "x", x, device);
  const int64_t C = x.size(1);
  check_opt_channel(op, "weight", weight, C, x);
  check_opt_channel(op, "bias", bias, C, x);
  check_opt_channel(op, "running_mean", running_mean, C, x);
  check_opt_channel(op, "running_var", running_var, C, x);
  TORCH_CHECK(training || (has(running_mean) && has(running_var)), op,
              ": running_mean and running_var are required when training=False, got ",
              has(running_mean) ? "running_var" : "running_mean", "=None");
}

inline void check_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                           const OptTensor& weight, const OptTensor& bias,
                           const at::Tensor& mean, const at::Tensor& var,
                           c10::DeviceType device) {
  check_x(op, "x", x, device);
  check_x(op, "grad_out", grad_out, device);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out must have the shape of x ",
              x.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op,
              ": grad_out must have the dtype of x (", x.scalar_type(), "), got ",
              grad_out.scalar_type());
  const int64_t C = x.size(1);
  check_opt_channel(op, "weight", weight, C, x);
  check_opt_channel(op, "bias", bias, C, x);
  check_channel(op, "mean", mean, C, x);
  check_channel(op, "var", var, C, x);
}

inline void check_update(const char* op, const at::Tensor& running_mean,
                         const at::Tensor& running_var, const at::Tensor& mean,
                         const at::Tensor& var, int64_t count, c10::DeviceType device) {
  TORCH_CHECK(running_mean.dim() == 1, op, ": running_mean must be 1-D, got shape ",
              running_mean.sizes());
  const int64_t C = running_mean.numel();
  check_channel(op, "running_mean", running_mean, C, running_mean);
  check_channel(op, "running_var", running_var, C, running_mean);
  check_channel(op, "mean", mean, C, running_mean);
  check_channel(op, "var", var, C, running_mean);
  TORCH_CHECK(running_mean.device().type() == device, op, ": running_mean must be on ", device,
              ", got ", running_mean.device());
  TORCH_CHECK(running_var.scalar_type() == running_mean.scalar_type(), op,
              ": running_var must have the dtype of running_mean (", running_mean.scalar_type(),
              "), got ", running_var.scalar_type());
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(), op,
              ": running_mean and running_var must be contiguous (they are updated in place)");
  TORCH_CHECK(count >= 0, op, ": count must be >= 0, got ", count);
}

}  // namespace fasttrain
