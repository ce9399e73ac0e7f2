// CPU kernel of solo_fast::masks_to_boxes (the contract is solo_fast/ops/_masks_to_boxes.py,
// the reference ops.reference.masks_to_boxes): tight boxes of bool / uint8 masks.
//
// One pass over each mask, row by row: an OR over the row's bytes (vectorised) tells
// whether it has a pixel; only rows that do are scanned, from the left up to the leftmost
// column found so far and from the right down to the rightmost. Exact: it finds the same
// extreme rows and columns as the reference's any() reductions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace solo_fast {
namespace {

using at::Tensor;

void box_of(const uint8_t* m, int64_t h, int64_t w, float* box) {
  int64_t y1 = -1, y2 = -1, x1 = w, x2 = -1;
  for (int64_t r = 0; r < h; ++r) {
    const uint8_t* row = m + r * w;
    uint8_t any = 0;
    for (int64_t j = 0; j < w; ++j) any |= row[j];
    if (!any) continue;
    if (y1 < 0) y1 = r;
    y2 = r;
    for (int64_t j = 0; j < x1; ++j)
      if (row[j]) {
        x1 = j;
        break;
      }
    for (int64_t j = w - 1; j > x2; --j)
      if (row[j]) {
        x2 = j;
        break;
      }
  }
  if (y1 < 0) {
    box[0] = box[1] = box[2] = box[3] = 0.0f;
    return;
  }
  box[0] = static_cast<float>(x1), box[1] = static_cast<float>(y1);
  box[2] = static_cast<float>(x2 + 1), box[3] = static_cast<float>(y2 + 1);
}

Tensor masks_to_boxes_cpu(const Tensor& masks) {
  TORCH_CHECK(masks.dim() == 3, "masks: expected [N, H, W], got ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == at::kBool || masks.scalar_type() == at::kByte,
              "masks: expected bool or uint8, got ", masks.scalar_type());
  const Tensor m = masks.contiguous();
  const int64_t n = m.size(0), h = m.size(1), w = m.size(2);
  Tensor out = at::empty({n, 4}, m.options().dtype(at::kFloat));
  const auto* p = static_cast<const uint8_t*>(m.data_ptr());
  float* o = out.data_ptr<float>();
  // OpenMP, as the convolutions before it (see winograd_conv_kernel.cpp); a mask per item.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, h * w));
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) box_of(p + i * h * w, h, w, o + 4 * i);
  });
  return out;
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) {
  m.impl("masks_to_boxes", &solo_fast::masks_to_boxes_cpu);
}
