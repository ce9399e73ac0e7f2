// Center-region label assignment (DESIGN.md §2): the per-instance and per-cell math
// shared by the C++ CPU kernel and the CUDA kernel. ATen-free on purpose, so nvcc can
// compile the CUDA side on a machine whose torch is a CPU build.
//
// Bit-exactness with solo_fast/ops/reference.py is the contract. The reference does its
// region arithmetic in Python floats (IEEE float64, every operation rounded) and its
// downsampling through F.interpolate in float32. nvcc contracts a*b+c into an FMA by
// default, which would skip a rounding, so device code spells every operation with an
// explicitly rounded intrinsic; host code is compiled with -ffp-contract=off.
#pragma once

#include <stdint.h>

#include <cmath>

#include "common/host_device.h"

namespace solo_fast {
namespace center_region {

// ---- explicitly rounded arithmetic -------------------------------------------------
// Device code: the _rn intrinsics, which nvcc never contracts; host code: the plain
// operators, which -ffp-contract=off keeps apart.
#if defined(__CUDA_ARCH__)
HOST_DEVICE_INLINE double dmul(double a, double b) { return __dmul_rn(a, b); }
HOST_DEVICE_INLINE double dadd(double a, double b) { return __dadd_rn(a, b); }
HOST_DEVICE_INLINE double dsub(double a, double b) { return __dsub_rn(a, b); }
HOST_DEVICE_INLINE double ddiv(double a, double b) { return __ddiv_rn(a, b); }
HOST_DEVICE_INLINE double dsqrt(double a) { return __dsqrt_rn(a); }
HOST_DEVICE_INLINE float fmul(float a, float b) { return __fmul_rn(a, b); }
HOST_DEVICE_INLINE float fadd(float a, float b) { return __fadd_rn(a, b); }
HOST_DEVICE_INLINE float fsub(float a, float b) { return __fsub_rn(a, b); }
HOST_DEVICE_INLINE float fdiv(float a, float b) { return __fdiv_rn(a, b); }
#else
HOST_DEVICE_INLINE double dmul(double a, double b) { return a * b; }
HOST_DEVICE_INLINE double dadd(double a, double b) { return a + b; }
HOST_DEVICE_INLINE double dsub(double a, double b) { return a - b; }
HOST_DEVICE_INLINE double ddiv(double a, double b) { return a / b; }
HOST_DEVICE_INLINE double dsqrt(double a) { return std::sqrt(a); }
HOST_DEVICE_INLINE float fmul(float a, float b) { return a * b; }
HOST_DEVICE_INLINE float fadd(float a, float b) { return a + b; }
HOST_DEVICE_INLINE float fsub(float a, float b) { return a - b; }
HOST_DEVICE_INLINE float fdiv(float a, float b) { return a / b; }
#endif
HOST_DEVICE_INLINE int64_t floor_to_int(double v) { return static_cast<int64_t>(floor(v)); }
HOST_DEVICE_INLINE int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
HOST_DEVICE_INLINE int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- per instance ------------------------------------------------------------------
// Exact integer moments of one mask (pixel values are weights, as in the reference's
// int64 sums) plus its tight bounds, which give the default box.
struct Moments {
  int64_t area;   // sum of pixel values
  int64_t sum_r;  // sum of row index * value
  int64_t sum_c;  // sum of column index * value
  int64_t rmin, rmax, cmin, cmax;  // bounds of the non-zero pixels (rmin > rmax when empty)
};

HOST_DEVICE_INLINE void moments_init(Moments* m, int64_t H, int64_t W) {
  m->area = 0;
  m->sum_r = 0;
  m->sum_c = 0;
  m->rmin = H;
  m->rmax = -1;
  m->cmin = W;
  m->cmax = -1;
}

// Default box of reference.masks_to_boxes: (min col, min row, max col + 1, max row + 1),
// width and height taken in float64 like the reference (float32 box, then .double()).
HOST_DEVICE_INLINE void tight_box_wh(const Moments& m, double* w, double* h) {
  if (m.area == 0) {
    *w = 0.0;
    *h = 0.0;
    return;
  }
  *w = dsub(static_cast<double>(static_cast<float>(m.cmax + 1)), static_cast<double>(static_cast<float>(m.cmin)));
  *h = dsub(static_cast<double>(static_cast<float>(m.rmax + 1)), static_cast<double>(static_cast<float>(m.rmin)));
}

// The level test: a non-empty mask whose sqrt(w*h) lies in [lo, hi].
HOST_DEVICE_INLINE bool in_scale_range(int64_t area, double w, double h, double lo, double hi) {
  if (area == 0) return false;
  const double scale = dsqrt(dmul(w, h));
  return lo <= scale && scale <= hi;
}

struct Region {
  int32_t top, down, left, right;  // inclusive cell bounds
};

// floor(v / size * S) with Python's evaluation order: (v / size) * S.
HOST_DEVICE_INLINE int64_t grid_coord(double v, int64_t size, int64_t S) {
  return floor_to_int(dmul(ddiv(v, static_cast<double>(size)), static_cast<double>(S)));
}

// The centre region of one candidate on a grid of S×S cells over an H×W padded image.
// Centre of mass over pixel indices, no +0.5, from the exact integer moments.
HOST_DEVICE_INLINE Region center_region(const Moments& m, double w, double h, int64_t H, int64_t W, int64_t S,
                             double pos_scale) {
  const double cy = ddiv(static_cast<double>(m.sum_r), static_cast<double>(m.area));
  const double cx = ddiv(static_cast<double>(m.sum_c), static_cast<double>(m.area));
  const int64_t ci = grid_coord(cy, H, S);
  const int64_t cj = grid_coord(cx, W, S);
  // Python evaluates 0.5 * h * pos_scale left to right.
  const double half_h = dmul(dmul(0.5, h), pos_scale);
  const double half_w = dmul(dmul(0.5, w), pos_scale);
  Region r;
  r.top = static_cast<int32_t>(imax(imax(0, grid_coord(dsub(cy, half_h), H, S)), ci - 1));
  r.down = static_cast<int32_t>(imin(imin(S - 1, grid_coord(dadd(cy, half_h), H, S)), ci + 1));
  r.left = static_cast<int32_t>(imax(imax(0, grid_coord(dsub(cx, half_w), W, S)), cj - 1));
  r.right = static_cast<int32_t>(imin(imin(S - 1, grid_coord(dadd(cx, half_w), W, S)), cj + 1));
  return r;
}

// ---- per cell ----------------------------------------------------------------------
HOST_DEVICE_INLINE bool region_contains(const Region& r, int64_t i, int64_t j) {
  return r.top <= i && i <= r.down && r.left <= j && j <= r.right;
}

// Later instances overwrite earlier ones: a cell belongs to the highest candidate index
// whose region covers it, so the owner of a cell is a max over instance indices, which
// is order-free and maps onto atomicMax on the GPU. -1 means background.
HOST_DEVICE_INLINE int64_t last_writer(int64_t owner, int64_t instance) { return instance > owner ? instance : owner; }

// ---- mask downsampling -------------------------------------------------------------
// One axis of F.interpolate(mode="bilinear", align_corners=False) with an explicit output
// size, as PyTorch's UpSample.h computes it in float32 (opmath of float):
//   scale = float(in) / out; src = scale * (dst + 0.5) - 0.5, clamped below at 0;
//   i0 = min(floor(src), in - 1); l1 = clamp(src - i0, 0, 1); i1 = i0 + (i0 < in - 1);
//   l0 = 1 - l1; equal sizes copy (l0 = 1, l1 = 0).
struct Tap {
  int64_t i0, i1;
  float l0, l1;
};

HOST_DEVICE_INLINE float linear_scale(int64_t in_size, int64_t out_size) {
  return fdiv(static_cast<float>(in_size), static_cast<float>(out_size));
}

HOST_DEVICE_INLINE Tap linear_tap(float scale, int64_t dst, int64_t in_size, int64_t out_size) {
  Tap t;
  if (in_size == out_size) {
    t.i0 = dst;
    t.i1 = dst;
    t.l0 = 1.0f;
    t.l1 = 0.0f;
    return t;
  }
  float src = fsub(fmul(scale, fadd(static_cast<float>(dst), 0.5f)), 0.5f);
  if (src < 0.0f) src = 0.0f;
  t.i0 = imin(static_cast<int64_t>(floorf(src)), in_size - 1);
  float l1 = fsub(src, static_cast<float>(t.i0));
  l1 = l1 < 0.0f ? 0.0f : (l1 > 1.0f ? 1.0f : l1);
  t.l1 = l1;
  t.i1 = t.i0 + (t.i0 < in_size - 1 ? 1 : 0);
  t.l0 = fsub(1.0f, l1);
  return t;
}

// One output pixel of the downsampled mask: PyTorch's separable order (width first,
// then height), then the >= 0.5 threshold of the reference.
HOST_DEVICE_INLINE uint8_t bilinear_pixel(const uint8_t* row0, const uint8_t* row1, const Tap& ty, const Tap& tx) {
  const float top = fadd(fmul(static_cast<float>(row0[tx.i0]), tx.l0), fmul(static_cast<float>(row0[tx.i1]), tx.l1));
  const float bot = fadd(fmul(static_cast<float>(row1[tx.i0]), tx.l0), fmul(static_cast<float>(row1[tx.i1]), tx.l1));
  const float v = fadd(fmul(top, ty.l0), fmul(bot, ty.l1));
  return v >= 0.5f ? 1 : 0;
}

// With an integer stride s (the Python wrapper checks that s divides the padded size)
// every tap is exact: src = s*d + (s-1)/2, so the weights are (0.5, 0.5) for even s and
// (1, 0) for odd s, and all products and sums of 8-bit values above are exact in
// float32. That is why PyTorch's CPU and CUDA bilinear kernels, which sum in different
// orders, agree with each other and with this function bit for bit.

}  // namespace center_region
}  // namespace solo_fast
