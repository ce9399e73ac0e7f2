// Modulated deformable convolution (DCNv2, solo_fast.ops.deform_conv2d): the sampling
// math shared by the C++ CPU kernel (csrc/cpu/deform_conv_kernel.cpp) and any CUDA
// source. ATen-free and HOST_DEVICE_INLINE like the rest of csrc/common/. The GPU path
// is the Triton kernel (kernels/deform_conv.py), which spells the same formulas.
//
// The border rule is mmcv's dmcn_im2col_bilinear: a sample at py <= -1, py >= H,
// px <= -1 or px >= W is 0 (value and every derivative); inside, each of the four
// corners outside the image contributes 0. Its derivatives (mmcv's
// dmcn_get_coordinate_weight) take d floor / d p = 0. Each formula keeps the order of
// operations of solo_fast/ops/reference.py, so the sampled columns match it bit for bit
// (the build has no FMA contraction).
#pragma once

#include <stdint.h>

#include <cmath>

#include "common/host_device.h"

namespace solo_fast {
namespace deform_conv {

template <typename T>
HOST_DEVICE_INLINE T floor_of(T v) {
#if defined(__CUDA_ARCH__)
  return floor(v);
#else
  return std::floor(v);
#endif
}

// Where tap `tap` (kernel row or column) of output row/column `out` samples, along one
// axis: (offset + tap * dilation) + (out * stride - padding).
template <typename T>
HOST_DEVICE_INLINE T tap_position(T off, int64_t tap, int64_t dilation, int64_t out, int64_t stride,
                                  int64_t padding) {
  return (off + static_cast<T>(tap * dilation)) + static_cast<T>(out * stride - padding);
}

// The four corners of a bilinear sample: offsets into the H*W plane (0 for a corner
// outside the image, whose coefficients are 0), in the order (y0, x0), (y0, x1),
// (y1, x0), (y1, x1); w = the bilinear weights, wy / wx = their derivatives in py / px.
template <typename T>
struct Corners {
  int64_t idx[4];
  T w[4];
  T wy[4];
  T wx[4];
};

// Fills `c` for a sample at (py, px) of an H x W plane; returns false (all
// coefficients 0) outside the sampling region. With kDeriv false, wy / wx are left unset.
template <typename T, bool kDeriv>
HOST_DEVICE_INLINE bool corners(T py, T px, int64_t height, int64_t width, Corners<T>* c) {
  if (!(py > T(-1) && py < static_cast<T>(height) && px > T(-1) && px < static_cast<T>(width))) {
    for (int q = 0; q < 4; ++q) {
      c->idx[q] = 0;
      c->w[q] = T(0);
      if (kDeriv) c->wy[q] = c->wx[q] = T(0);
    }
    return false;
  }
  const T y0f = floor_of(py), x0f = floor_of(px);
  const T ly = py - y0f, lx = px - x0f;
  const T hy = T(1) - ly, hx = T(1) - lx;
  const int64_t y0 = static_cast<int64_t>(y0f), x0 = static_cast<int64_t>(x0f);
  const T w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const T wy[4] = {-hx, -lx, hx, lx};
  const T wx[4] = {-hy, hy, -ly, ly};
  for (int q = 0; q < 4; ++q) {
    const int64_t yy = y0 + (q >> 1), xx = x0 + (q & 1);
    const bool valid = yy >= 0 && yy < height && xx >= 0 && xx < width;
    c->idx[q] = valid ? yy * width + xx : 0;
    c->w[q] = valid ? w[q] : T(0);
    if (kDeriv) {
      c->wy[q] = valid ? wy[q] : T(0);
      c->wx[q] = valid ? wx[q] : T(0);
    }
  }
  return true;
}

// The sampled value of `plane` (H*W, row-major) in the reference's order:
// ((((0 + v0 w0) + v1 w1) + v2 w2) + v3 w3).
template <typename T>
HOST_DEVICE_INLINE T sample(const T* plane, const Corners<T>& c) {
  T v = T(0);
  for (int q = 0; q < 4; ++q) v = v + plane[c.idx[q]] * c.w[q];
  return v;
}

}  // namespace deform_conv
}  // namespace solo_fast
