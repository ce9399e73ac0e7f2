// Matrix NMS (DESIGN.md §2): the per-pair decay math of the C++ CPU kernel
// (csrc/cpu/matrix_nms_kernel.cpp). The GPU path is the Triton kernel
// (kernels/matrix_nms.py), which spells the same formulas; there is no CUDA kernel of
// this op. ATen-free and HOST_DEVICE_INLINE like the rest of csrc/common/.
//
// Parity with solo_fast/ops/reference.py is the contract, so every formula keeps the
// reference's order of float32 operations: (-sigma) * (x * x), a division of two
// exponentials rather than one exponential of a difference. None of them has a
// multiply feeding an add, so FMA contraction cannot change a rounding either.
#pragma once

#include <stdint.h>

#include <cmath>

#include "common/host_device.h"

namespace solo_fast {
namespace matrix_nms {

// IoU of masks i and j from their intersection and areas. Two empty masks have union 0;
// their IoU is 0 rather than NaN (the reference clamps the union to >= 1).
HOST_DEVICE_INLINE float iou(float inter, float area_i, float area_j) {
  float uni = area_i + area_j - inter;
  return inter / (uni < 1.0f ? 1.0f : uni);
}

// f(x): gaussian exp(-sigma x^2) or linear 1 - x.
HOST_DEVICE_INLINE float gaussian(float x, float sigma) {
#if defined(__CUDA_ARCH__)
  return expf(-sigma * (x * x));
#else
  return std::exp(-sigma * (x * x));
#endif
}

// Denominator of the decay, f(comp[i]), computed once per row. The linear kernel clamps
// it to >= 1e-6 so a duplicate (comp = iou = 1) gives 0 / 1e-6 = 0, never 0 / 0.
HOST_DEVICE_INLINE float decay_denominator(float comp, bool linear, float sigma) {
  if (linear) {
    float d = 1.0f - comp;
    return d < 1e-6f ? 1e-6f : d;
  }
  return gaussian(comp, sigma);
}

// f(iou[i, j]) / f(comp[i]) for i < j.
HOST_DEVICE_INLINE float decay_ratio(float iou_ij, float denominator_i, bool linear, float sigma) {
  float num = linear ? 1.0f - iou_ij : gaussian(iou_ij, sigma);
  return num / denominator_i;
}

// decay[j] = min over all rows i of f(iou[i, j]) / f(comp[i]) in the reference. Pairs
// with iou 0 (i >= j, other label, disjoint) give 1 / f(comp[i]) >= 1 while row 0 gives
// f(iou[0, j]) <= 1, so the min is min(1, ratios of the pairs i < j with iou > 0): a
// kernel starts from this value and may skip every zero-IoU pair.
HOST_DEVICE_INLINE float decay_init() { return 1.0f; }

}  // namespace matrix_nms
}  // namespace solo_fast
