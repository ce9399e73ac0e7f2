// CPU kernel of solo_fast::center_region_assign (DESIGN.md §2).
//
// One pass over each gt mask (parallel over the instances of the whole batch) gathers
// the exact integer moments and the tight bounds and, while the rows it needs are still
// in L1, writes every downsampled mask target. Most of a padded mask is background, so
// each row is first tested with a word-wide OR and only the span between its first and
// last non-zero byte is accumulated. The per-cell assignment is a few thousand cells per
// level and runs serially afterwards.
#include <ATen/ATen.h>
#include <ATen/core/List.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "center_region_inputs.h"
#include "common/center_region.h"
#include "cpu/parallel.h"

namespace solo_fast {
namespace {

namespace cr = center_region;
using at::Tensor;

// [lo, hi] of the non-zero bytes of a row; false when the row is all zero.
inline bool row_span(const uint8_t* row, int64_t W, int64_t* lo, int64_t* hi) {
  const int64_t nw = W / 8;
  uint64_t any = 0;
  for (int64_t k = 0; k < nw; ++k) {
    uint64_t v;
    std::memcpy(&v, row + 8 * k, 8);
    any |= v;
  }
  for (int64_t c = nw * 8; c < W; ++c) any |= row[c];
  if (!any) return false;
  int64_t a = 0;
  while (row[a] == 0) ++a;
  int64_t b = W - 1;
  while (row[b] == 0) --b;
  *lo = a;
  *hi = b;
  return true;
}

// Taps of one downsampling stride along one axis, from the shared header.
struct AxisTaps {
  std::vector<cr::Tap> taps;
  void build(int64_t in_size, int64_t out_size) {
    taps.resize(out_size);
    const float scale = cr::linear_scale(in_size, out_size);
    for (int64_t d = 0; d < out_size; ++d) taps[d] = cr::linear_tap(scale, d, in_size, out_size);
  }
};

struct StrideTaps {
  int64_t oh, ow;
  AxisTaps rows, cols;
  // Output columns whose taps fall in a column span, as a half-open range.
  int64_t col_begin(int64_t lo) const {
    int64_t e = 0;
    while (e < ow && cols.taps[e].i1 < lo) ++e;
    return e;
  }
};

// Buffers of scan_instance, kept per thread.
struct Scratch {
  std::vector<uint32_t> colsum;
  std::vector<int64_t> lo, hi;  // per row span, lo > hi when the row is empty
  std::vector<uint8_t*> out;    // the instance's mask target of each stride

  void reset(int64_t H, int64_t W, int64_t D) {
    colsum.assign(W, 0);
    lo.resize(H);
    hi.resize(H);
    out.resize(D);
  }
};

// Moments of one mask, and its downsampled targets (s.out[k] points to [oh_k, ow_k]).
void scan_instance(const uint8_t* mask, int64_t H, int64_t W, const std::vector<StrideTaps>& strides, Scratch& s,
                   cr::Moments* mom) {
  const std::vector<uint8_t*>& out = s.out;
  cr::moments_init(mom, H, W);
  // Zeroed here rather than by at::zeros: a fill is an OpenMP region, and on a loaded
  // machine every fork-join region costs tens of ms (measured on the reference CPU).
  for (size_t k = 0; k < strides.size(); ++k) std::memset(out[k], 0, strides[k].oh * strides[k].ow);
  uint32_t* colsum = s.colsum.data();
  std::vector<int64_t> next(strides.size(), 0);
  int64_t sum_r = 0, area = 0;
  for (int64_t r = 0; r < H; ++r) {
    const uint8_t* row = mask + r * W;
    int64_t lo, hi;
    if (row_span(row, W, &lo, &hi)) {
      uint32_t rs = 0;
      for (int64_t c = lo; c <= hi; ++c) {
        colsum[c] += row[c];
        rs += row[c];
      }
      area += rs;
      sum_r += r * static_cast<int64_t>(rs);
      if (mom->rmin > r) mom->rmin = r;
      mom->rmax = r;
      if (lo < mom->cmin) mom->cmin = lo;
      if (hi > mom->cmax) mom->cmax = hi;
      s.lo[r] = lo;
      s.hi[r] = hi;
    } else {
      s.lo[r] = W;
      s.hi[r] = -1;
    }
    // Emit every output row whose lower tap row is this one.
    for (size_t k = 0; k < strides.size(); ++k) {
      const StrideTaps& st = strides[k];
      while (next[k] < st.oh && st.rows.taps[next[k]].i1 <= r) {
        const cr::Tap& ty = st.rows.taps[next[k]];
        const int64_t clo = std::min(s.lo[ty.i0], s.lo[ty.i1]);
        const int64_t chi = std::max(s.hi[ty.i0], s.hi[ty.i1]);
        if (clo <= chi) {  // all four taps zero gives 0, so empty rows stay zero-filled
          const uint8_t* r0 = mask + ty.i0 * W;
          const uint8_t* r1 = mask + ty.i1 * W;
          uint8_t* dst = out[k] + next[k] * st.ow;
          for (int64_t e = st.col_begin(clo); e < st.ow && st.cols.taps[e].i0 <= chi; ++e)
            dst[e] = cr::bilinear_pixel(r0, r1, ty, st.cols.taps[e]);
        }
        ++next[k];
      }
    }
  }
  mom->area = area;
  mom->sum_r = sum_r;
  int64_t sum_c = 0;
  for (int64_t c = mom->cmin; c <= mom->cmax; ++c) sum_c += c * static_cast<int64_t>(colsum[c]);
  mom->sum_c = sum_c;
}

cr::Outputs center_region_assign_cpu(const cr::Inputs& in) {
  const int64_t B = in.B, L = in.L, D = in.D, H = in.H, W = in.W;
  const std::vector<int64_t>& first = in.first;
  const int64_t total = first[B];

  std::vector<StrideTaps> taps(D);
  for (int64_t k = 0; k < D; ++k) {
    taps[k].oh = H / in.mask_strides[k];
    taps[k].ow = W / in.mask_strides[k];
    taps[k].rows.build(H, taps[k].oh);
    taps[k].cols.build(W, taps[k].ow);
  }
  std::vector<Tensor> targets(B * D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < D; ++k)
      targets[b * D + k] = at::empty({first[b + 1] - first[b], taps[k].oh, taps[k].ow}, at::kByte);

  std::vector<cr::Moments> mom(total);
  // Small batches of masks stay on the calling thread: waking a helper costs more than a
  // few 64×96 masks.
  const int64_t min_pixels = int64_t{1} << 18;
  cpu::parallel_dynamic(total, total * H * W >= 2 * min_pixels, [&](int64_t g) {
    int64_t b = 0;
    while (g >= first[b + 1]) ++b;
    const int64_t m = g - first[b];
    thread_local Scratch s;
    s.reset(H, W, D);
    for (int64_t k = 0; k < D; ++k) s.out[k] = targets[b * D + k].data_ptr<uint8_t>() + m * taps[k].oh * taps[k].ow;
    const uint8_t* mask = reinterpret_cast<const uint8_t*>(in.masks[b].data_ptr()) + m * H * W;
    scan_instance(mask, H, W, taps, s, &mom[g]);
  });

  std::vector<Tensor> labels_out(B * L), cells_out(B * L), inst_out(B * L);
  std::vector<int64_t> owner;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t M = first[b + 1] - first[b];
    const int64_t* lab = in.labels[b].data_ptr<int64_t>();
    const double* box = in.boxes[b].defined() ? in.boxes[b].data_ptr<double>() : nullptr;
    std::vector<double> bw(M), bh(M);
    for (int64_t m = 0; m < M; ++m) {
      if (box) {
        bw[m] = cr::dsub(box[4 * m + 2], box[4 * m + 0]);
        bh[m] = cr::dsub(box[4 * m + 3], box[4 * m + 1]);
      } else {
        cr::tight_box_wh(mom[first[b] + m], &bw[m], &bh[m]);
      }
    }
    for (int64_t l = 0; l < L; ++l) {
      const int64_t S = in.num_grids[l];
      owner.assign(S * S, -1);
      for (int64_t m = 0; m < M; ++m) {
        const cr::Moments& mm = mom[first[b] + m];
        if (!cr::in_scale_range(mm.area, bw[m], bh[m], in.scale_lo[l], in.scale_hi[l])) continue;
        const cr::Region reg = cr::center_region(mm, bw[m], bh[m], H, W, S, in.pos_scale);
        for (int64_t i = reg.top; i <= reg.down; ++i)
          for (int64_t j = reg.left; j <= reg.right; ++j) owner[i * S + j] = cr::last_writer(owner[i * S + j], m);
      }
      Tensor lab_t = at::full({S, S}, in.num_classes, at::kLong);
      int64_t* lp = lab_t.data_ptr<int64_t>();
      int64_t npos = 0;
      for (int64_t c = 0; c < S * S; ++c) npos += owner[c] >= 0;
      Tensor cells = at::empty({npos}, at::kLong), inst = at::empty({npos}, at::kLong);
      int64_t* cp = cells.data_ptr<int64_t>();
      int64_t* ip = inst.data_ptr<int64_t>();
      for (int64_t c = 0, p = 0; c < S * S; ++c) {
        if (owner[c] < 0) continue;
        lp[c] = lab[owner[c]];
        cp[p] = c;
        ip[p] = owner[c];
        ++p;
      }
      labels_out[b * L + l] = lab_t;
      cells_out[b * L + l] = cells;
      inst_out[b * L + l] = inst;
    }
  }
  return {labels_out, cells_out, inst_out, targets};
}

}  // namespace

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) { m.impl("center_region_assign", &cr::checked<center_region_assign_cpu>); }

}  // namespace solo_fast
