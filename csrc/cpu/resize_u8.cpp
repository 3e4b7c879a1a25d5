// Antialiased bilinear resize of one uint8 RGB image through ATen, with a C entry point.
//
// Why: FFCV's numba-compiled decoders can only call plain C functions, and the resize they ship
// (libffcv's OpenCV INTER_AREA) costs ~4x torch's uint8 antialiased bilinear kernel (AVX2, a
// port of Pillow-SIMD's) on a ~280 px crop to 224. Calling ATen's kernel from C gives FFCV the
// torch backend's resize, pixel for pixel (torchvision.transforms.v2.functional.resize with
// antialias=True), at its speed, from FFCV's threads and without the GIL.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/ParallelGuard.h>

#include <cstdint>

// Resize the (height, width, 3) image at `src`, whose rows are `src_row_stride` bytes apart (a
// window of a larger image is fine), to (out_height, out_width, 3) packed rows at `dst`.
// Returns 0, or -1 on bad arguments or any error (never throws: numba callers cannot catch).
// Runs in the calling thread: a decoder thread must not start a thread team of its own.
extern "C" __attribute__((visibility("default"))) int fasttrain_resize_rgb_u8(
    const uint8_t* src, int64_t height, int64_t width, int64_t src_row_stride, uint8_t* dst,
    int64_t out_height, int64_t out_width) {
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
    at::Tensor output = at::from_blob(dst, {1, 3, out_height, out_width},
                                      {out_height * out_width * 3, 1, out_width * 3, 3}, options);
    if (out_height == height && out_width == width) {
      output.copy_(input);
    } else {
      at::_upsample_bilinear2d_aa_out(output, input, {out_height, out_width},
                                      /*align_corners=*/false);
    }
    return 0;
  } catch (...) {
    return -1;
  }
}
