// Antialiased bilinear resize (and horizontal flip) of one uint8 RGB image through ATen, with a
// C entry point.
//
// Why: FFCV's numba-compiled decoders can only call plain C functions, and the resize they ship
// (libffcv's OpenCV INTER_AREA) costs ~4x torch's uint8 antialiased bilinear kernel (AVX2, a
// port of Pillow-SIMD's) on a ~280 px crop to 224. Calling ATen's kernel from C gives FFCV the
// torch backend's resize, pixel for pixel (torchvision.transforms.v2.functional.resize with
// antialias=True), at its speed, from FFCV's threads and without the GIL. The Python loaders
// (the torch backend's workers, DALI's CPU path) call it too: one call per crop instead of
// torch's dispatch for the resize, the flip and the output allocation, writing straight into
// the caller's batch memory.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/ParallelGuard.h>

#include <array>
#include <cstdint>
#include <vector>

namespace {

// dst's packed (height, width, 3) rows = src's rows (`src_row_stride` bytes apart) mirrored.
void mirror_rows(const uint8_t* __restrict src, int64_t height, int64_t width,
                 int64_t src_row_stride, uint8_t* __restrict dst) {
  for (int64_t y = 0; y < height; ++y) {
    const uint8_t* last = src + y * src_row_stride + (width - 1) * 3;
    uint8_t* row = dst + y * width * 3;
    for (int64_t x = 0; x < width; ++x) {
      row[3 * x] = last[-3 * x];
      row[3 * x + 1] = last[-3 * x + 1];
      row[3 * x + 2] = last[-3 * x + 2];
    }
  }
}

}  // namespace

// Resize the (height, width, 3) image at `src`, whose rows are `src_row_stride` bytes apart (a
// window of a larger image is fine), to (out_height, out_width, 3) packed rows at `dst`, mirrored
// left-right when `flip` is non-zero. `dst` must not overlap `src`.
// Returns 0, or -1 on bad arguments or any error (never throws: numba callers cannot catch).
// Runs in the calling thread: a decoder thread must not start a thread team of its own.
extern "C" __attribute__((visibility("default"))) int fasttrain_resize_flip_rgb_u8(
    const uint8_t* src, int64_t height, int64_t width, int64_t src_row_stride, uint8_t* dst,
    int64_t out_height, int64_t out_width, int32_t flip) {
  if (src == nullptr || dst == nullptr || height <= 0 || width <= 0 || out_height <= 0 ||
      out_width <= 0 || src_row_stride < width * 3) {
    return -1;
  }
  try {
    c10::InferenceMode inference;
    c10::ParallelGuard serial(true);
    const auto options = at::TensorOptions().dtype(at::kByte).device(at::kCPU);
    // (1, 3, H, W) views of (H, W, 3) memory: the layout whose 3-channel path skips the
    // kernel's unpacking and packing copies.
    const at::Tensor input = at::from_blob(const_cast<uint8_t*>(src), {1, 3, height, width},
                                           {height * src_row_stride, 1, src_row_stride, 3},
                                           options);
    const std::array<int64_t, 4> out_sizes = {1, 3, out_height, out_width};
    const std::array<int64_t, 4> out_strides = {out_height * out_width * 3, 1, out_width * 3, 3};
    at::Tensor output = at::from_blob(dst, out_sizes, out_strides, options);
    const bool same_size = out_height == height && out_width == width;
    if (!flip) {
      if (same_size) {
        output.copy_(input);
      } else {
        at::_upsample_bilinear2d_aa_out(output, input, {out_height, out_width},
                                        /*align_corners=*/false);
      }
      return 0;
    }
    // The kernels cannot write a mirrored output: resize into this thread's scratch image, then
    // mirror it into `dst` (a plain loop: ~24 us at 224 px, where torch's flip costs ~18 us plus
    // an allocation, and its out= variant ~42 us: it flips, then copies).
    const uint8_t* resized = src;
    int64_t resized_row_stride = src_row_stride;
    if (!same_size) {
      thread_local std::vector<uint8_t> scratch;
      scratch.resize(static_cast<size_t>(out_height * out_width * 3));
      at::Tensor scratch_view = at::from_blob(scratch.data(), out_sizes, out_strides, options);
      at::_upsample_bilinear2d_aa_out(scratch_view, input, {out_height, out_width},
                                      /*align_corners=*/false);
      resized = scratch.data();
      resized_row_stride = out_width * 3;
    }
    mirror_rows(resized, out_height, out_width, resized_row_stride, dst);
    return 0;
  } catch (...) {
    return -1;
  }
}
