// CPU kernel of solo_fast::binary_masks_x4 (the contract is solo_fast/ops/_binary_masks.py):
// F.interpolate(soft, scale 4, bilinear, align_corners=False) cropped to [0, crop_h) x
// [0, crop_w), resized again (bilinear) to out_h x out_w where that differs from the crop,
// and thresholded (> thr), without an fp32 map at full size.
//
// torch's CPU kernel for a one-channel map whose output has H + W > 128 (its generic path;
// ops.binary_masks_x4 sends smaller ones to the reference) interpolates along W
// first, then along H, each as fma(v0, w0, v1 * w1) with weights from the half-pixel rule
// (exact for a factor of 4: 0.125, 0.375, ...). The same arithmetic here, in the same order,
// gives its values bit for bit; ops.binary_masks_x4 checks that once against F.interpolate
// and otherwise keeps torch's path. Per output row: the two source rows it blends, each
// interpolated along W once (kept while the next rows use them), then one vectorised pass;
// the second resize does the same on the first one's rows, each computed once when needed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
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
    // One fused multiply-add, as torch's kernel compiles it: exact for a factor of 4, but
    // another rounding would move some taps of a general scale.
    float real = std::fma(scale, static_cast<float>(d) + 0.5f, -0.5f);
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

void blend_rows(const float* r0, float w0, const float* r1, float w1, int64_t n, float* out) {
#pragma omp simd
  for (int64_t x = 0; x < n; ++x) out[x] = lerp(r0[x], w0, r1[x], w1);
}
#pragma GCC pop_options

bool has_fma() {
  static const bool yes = __builtin_cpu_supports("fma");
  return yes;
}

constexpr int64_t kRows = 64;  // output rows per work item

// Rows of a bilinear resize along W, two at a time: the source rows an output row blends,
// each resized along W once and kept while the next output rows use them (rows only move
// down). `source(r, dst)` writes source row r.
template <class Source>
class RowsAlongW {
 public:
  RowsAlongW(const Taps& tx, int64_t width, Source source) : tx_(tx), width_(width), source_(source) {}
  void start(int64_t in_width) {
    cached_[0] = cached_[1] = -1;
    rows_.resize(2 * width_);
    src_.resize(in_width);
  }
  // Rows a and b, resized along W; fetching one never drops the other.
  std::pair<const float*, const float*> get(int64_t a, int64_t b) {
    const float* pa = fetch(a, b);
    return {pa, fetch(b, a)};
  }

 private:
  const Taps& tx_;
  int64_t width_;
  Source source_;
  int64_t cached_[2];
  std::vector<float> rows_, src_;

  const float* fetch(int64_t r, int64_t keep) {
    for (int s = 0; s < 2; ++s)
      if (cached_[s] == r) return rows_.data() + s * width_;
    // Keep `keep`; otherwise drop the upper row (output rows only move down).
    const int s = cached_[0] == keep ? 1 : cached_[1] == keep ? 0 : (cached_[0] < cached_[1] ? 0 : 1);
    row_along_w(source_(r, src_.data()), tx_, width_, rows_.data() + s * width_);
    cached_[s] = r;
    return rows_.data() + s * width_;
  }
};

// soft [N, h, w] -> x4 -> [:crop_h, :crop_w] -> (out_h, out_w) unless that is the crop's
// size -> > thr. The second resize reads the first's fp32 rows as torch's would read its
// output tensor: row r of the crop is computed when the second resize first needs it.
Tensor binary_masks_x4_cpu(const Tensor& soft, int64_t crop_h, int64_t crop_w, int64_t out_h, int64_t out_w,
                           double thr) {
  TORCH_CHECK(soft.dim() == 3 && soft.scalar_type() == at::kFloat, "soft: expected float32 [N, h, w], got ",
              soft.scalar_type(), " ", soft.sizes());
  TORCH_CHECK(has_fma(), "binary_masks_x4: this CPU has no FMA");
  const int64_t n = soft.size(0), h = soft.size(1), w = soft.size(2);
  TORCH_CHECK(crop_h >= 0 && crop_h <= 4 * h && crop_w >= 0 && crop_w <= 4 * w, "crop: expected within [",
              4 * h, ", ", 4 * w, "], got [", crop_h, ", ", crop_w, "]");
  const bool resize = out_h != crop_h || out_w != crop_w;
  TORCH_CHECK(!resize || (crop_h > 0 && crop_w > 0 && out_h > 0 && out_w > 0),
              "size: a resize needs non-empty sizes, got crop [", crop_h, ", ", crop_w, "] to [", out_h, ", ",
              out_w, "]");
  Tensor src = soft.contiguous();
  Tensor out = at::empty({n, out_h, out_w}, soft.options().dtype(at::kBool));
  if (out.numel() == 0) return out;
  const Taps ty = taps(h, 4 * h, crop_h), tx = taps(w, 4 * w, crop_w);
  const Taps ty2 = resize ? taps(crop_h, out_h, out_h) : Taps{}, tx2 = resize ? taps(crop_w, out_w, out_w) : Taps{};
  const float t = static_cast<float>(thr);  // torch.gt compares with the scalar in the tensor's dtype
  const float* sp = src.data_ptr<float>();
  bool* op = out.data_ptr<bool>();
  const int64_t chunks = (out_h + kRows - 1) / kRows;
  at::parallel_for(0, n * chunks, 1, [&](int64_t i0, int64_t i1) {
    const float* plane = nullptr;
    // Stage 1: the soft rows along W, then row r of the x4 resize's crop.
    auto soft_row = [&](int64_t r, float*) { return plane + r * w; };
    RowsAlongW<decltype(soft_row)> x4(tx, crop_w, soft_row);
    auto crop_row = [&](int64_t r, float* dst) -> const float* {
      const auto rows = x4.get(ty.i0[r], ty.i1[r]);
      blend_rows(rows.first, ty.w0[r], rows.second, ty.w1[r], crop_w, dst);
      return dst;
    };
    // Stage 2: the crop's rows along W, to the output's width.
    RowsAlongW<decltype(crop_row)> back(tx2, out_w, crop_row);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t m = item / chunks, y0 = (item % chunks) * kRows, y1 = std::min(out_h, y0 + kRows);
      plane = sp + m * h * w;
      x4.start(0);
      if (resize) back.start(crop_w);
      for (int64_t y = y0; y < y1; ++y) {
        bool* o = op + (m * out_h + y) * out_w;
        if (resize) {
          const auto rows = back.get(ty2.i0[y], ty2.i1[y]);
          blend_rows(rows.first, ty2.w0[y], rows.second, ty2.w1[y], out_w, t, o);
        } else {
          const auto rows = x4.get(ty.i0[y], ty.i1[y]);
          blend_rows(rows.first, ty.w0[y], rows.second, ty.w1[y], crop_w, t, o);
        }
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
