// CPU kernel of solo_fast::binary_masks_x4 (the contract is solo_fast/ops/_binary_masks.py):
// F.interpolate(soft, scale 4, bilinear, align_corners=False) cropped to [0, crop_h) x
// [0, crop_w) and thresholded (> thr), without the fp32 map at full size.
//
// torch's CPU kernel for a one-channel map whose output has H + W > 128 (its generic path;
// ops.binary_masks_x4 sends smaller ones to the reference) interpolates along W
// first, then along H, each as fma(v0, w0, v1 * w1) with weights from the half-pixel rule
// (exact for a factor of 4: 0.125, 0.375, ...). The same arithmetic here, in the same order,
// gives its values bit for bit; ops.binary_masks_x4 checks that once against F.interpolate
// and otherwise keeps torch's path. Per output row: the two source rows it blends, each
// interpolated along W once (kept while the next rows use them), then one vectorised pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace solo_fast {
namespace {

using at::Tensor;

struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<float> w0, w1;
};

// torch's area_pixel_compute_source_index (align_corners=False) and guard_index_and_lambda,
// in fp32 as its kernel computes them.
Taps taps(int64_t in, int64_t out, int64_t count) {
  Taps t;
  t.i0.resize(count), t.i1.resize(count), t.w0.resize(count), t.w1.resize(count);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t d = 0; d < count; ++d) {
    float real = scale * (static_cast<float>(d) + 0.5f) - 0.5f;
    real = real < 0.0f ? 0.0f : real;
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(real)), in - 1);
    const float lambda = std::min(std::max(real - static_cast<float>(i0), 0.0f), 1.0f);
    t.i0[d] = i0, t.i1[d] = i0 < in - 1 ? i0 + 1 : i0;
    t.w0[d] = 1.0f - lambda, t.w1[d] = lambda;
  }
  return t;
}

#pragma GCC push_options
#pragma GCC target("fma")
inline float lerp(float v0, float w0, float v1, float w1) { return __builtin_fmaf(v0, w0, v1 * w1); }

void row_along_w(const float* src, const Taps& tx, int64_t n, float* dst) {
  for (int64_t x = 0; x < n; ++x) dst[x] = lerp(src[tx.i0[x]], tx.w0[x], src[tx.i1[x]], tx.w1[x]);
}

void blend_rows(const float* r0, float w0, const float* r1, float w1, int64_t n, float thr, bool* out) {
#pragma omp simd
  for (int64_t x = 0; x < n; ++x) out[x] = lerp(r0[x], w0, r1[x], w1) > thr;
}
#pragma GCC pop_options

bool has_fma() {
  static const bool yes = __builtin_cpu_supports("fma");
  return yes;
}

constexpr int64_t kRows = 64;  // output rows per work item

Tensor binary_masks_x4_cpu(const Tensor& soft, int64_t crop_h, int64_t crop_w, double thr) {
  TORCH_CHECK(soft.dim() == 3 && soft.scalar_type() == at::kFloat, "soft: expected float32 [N, h, w], got ",
              soft.scalar_type(), " ", soft.sizes());
  TORCH_CHECK(has_fma(), "binary_masks_x4: this CPU has no FMA");
  const int64_t n = soft.size(0), h = soft.size(1), w = soft.size(2);
  TORCH_CHECK(crop_h >= 0 && crop_h <= 4 * h && crop_w >= 0 && crop_w <= 4 * w, "crop: expected within [",
              4 * h, ", ", 4 * w, "], got [", crop_h, ", ", crop_w, "]");
  Tensor src = soft.contiguous();
  Tensor out = at::empty({n, crop_h, crop_w}, soft.options().dtype(at::kBool));
  if (out.numel() == 0) return out;
  const Taps ty = taps(h, 4 * h, crop_h), tx = taps(w, 4 * w, crop_w);
  const float t = static_cast<float>(thr);  // torch.gt compares with the scalar in the tensor's dtype
  const float* sp = src.data_ptr<float>();
  bool* op = out.data_ptr<bool>();
  const int64_t chunks = (crop_h + kRows - 1) / kRows;
  at::parallel_for(0, n * chunks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> rows(2 * crop_w);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t m = item / chunks, y0 = (item % chunks) * kRows, y1 = std::min(crop_h, y0 + kRows);
      const float* plane = sp + m * h * w;
      int64_t cached[2] = {-1, -1};  // source row held in rows[0 / 1]
      auto along_w = [&](int64_t r) -> const float* {
        for (int s = 0; s < 2; ++s)
          if (cached[s] == r) return rows.data() + s * crop_w;
        const int s = cached[0] < cached[1] ? 0 : 1;  // rows only move down: drop the upper one
        row_along_w(plane + r * w, tx, crop_w, rows.data() + s * crop_w);
        cached[s] = r;
        return rows.data() + s * crop_w;
      };
      for (int64_t y = y0; y < y1; ++y) {
        const float* r0 = along_w(ty.i0[y]);
        const float* r1 = along_w(ty.i1[y]);
        blend_rows(r0, ty.w0[y], r1, ty.w1[y], crop_w, t, op + (m * crop_h + y) * crop_w);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) {
  m.impl("binary_masks_x4", &solo_fast::binary_masks_x4_cpu);
}
