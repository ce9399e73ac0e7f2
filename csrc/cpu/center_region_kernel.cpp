// CPU kernel of solo_fast::center_region_assign (DESIGN.md §2).
//
// One pass over each gt mask (parallel over the instances of the whole batch) gathers
// the exact integer moments and the tight bounds and, while the rows it needs are still
// in L1, writes every downsampled mask target. Most of a padded mask is background, so
// each row is first tested with a word-wide OR and only the span between its first and
// last non-zero byte is accumulated. The per-cell assignment is a few thousand cells per
// level and runs serially afterwards.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/List.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <tuple>
#include <vector>

#include "common/center_region.h"

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

struct Scratch {
  std::vector<uint32_t> colsum;
  std::vector<int64_t> lo, hi;  // per row span, lo > hi when the row is empty
};

// Instances handed out one at a time. A helper may start after the op has returned, so
// it reaches the op's state (through `work`) only after claiming an instance, which the
// op then waits for.
struct WorkQueue {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> busy{0};
  int64_t total = 0;
  std::function<void(WorkQueue&, int64_t)> work;

  void run() {
    ++busy;
    const int64_t g = next++;
    if (g < total) work(*this, g);
    --busy;
  }
};

// Moments of one mask, and its downsampled targets (out[k] points to [oh_k, ow_k]).
void scan_instance(const uint8_t* mask, int64_t H, int64_t W, const std::vector<StrideTaps>& strides,
                   const std::vector<uint8_t*>& out, Scratch& s, cr::Moments* mom) {
  cr::moments_init(mom, H, W);
  // Zeroed here rather than by at::zeros: a fill is an OpenMP region, and on a loaded
  // machine every fork-join region costs tens of ms (measured on the 2-core box).
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
  for (int64_t c = mom->cmin; c <= mom->cmax; ++c) {
    sum_c += c * static_cast<int64_t>(colsum[c]);
    colsum[c] = 0;
  }
  mom->sum_c = sum_c;
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
center_region_assign_cpu(at::TensorList gt_masks, at::TensorList gt_labels,
                         const c10::List<std::optional<Tensor>>& gt_boxes, at::IntArrayRef num_grids,
                         at::ArrayRef<double> scale_lo, at::ArrayRef<double> scale_hi, double pos_scale,
                         int64_t num_classes, at::IntArrayRef mask_strides) {
  const int64_t B = static_cast<int64_t>(gt_masks.size());
  const int64_t L = static_cast<int64_t>(num_grids.size());
  const int64_t D = static_cast<int64_t>(mask_strides.size());
  TORCH_CHECK(B >= 1, "center_region_assign: expected at least one image");
  TORCH_CHECK(static_cast<int64_t>(gt_labels.size()) == B && static_cast<int64_t>(gt_boxes.size()) == B,
              "center_region_assign: gt_masks, gt_labels and gt_boxes need one entry per image");
  TORCH_CHECK(static_cast<int64_t>(scale_lo.size()) == L && static_cast<int64_t>(scale_hi.size()) == L,
              "center_region_assign: one scale range per level expected");
  TORCH_CHECK(D >= 1, "center_region_assign: expected at least one mask stride");
  TORCH_CHECK(gt_masks[0].dim() == 3, "center_region_assign: gt_masks must be [M, H, W]");
  const int64_t H = gt_masks[0].size(1), W = gt_masks[0].size(2);
  for (int64_t k = 0; k < D; ++k)
    TORCH_CHECK(mask_strides[k] > 0 && H % mask_strides[k] == 0 && W % mask_strides[k] == 0,
                "center_region_assign: mask stride ", mask_strides[k], " must divide the padded size");

  std::vector<Tensor> masks(B), labels(B), boxes(B);
  std::vector<int64_t> first(B + 1, 0);  // instance offsets of the images in the batch
  for (int64_t b = 0; b < B; ++b) {
    const Tensor& m = gt_masks[b];
    TORCH_CHECK(m.device().is_cpu() && m.dim() == 3 && m.size(1) == H && m.size(2) == W,
                "center_region_assign: gt_masks[", b, "] must be a CPU [M, H, W] tensor of the padded size");
    TORCH_CHECK(m.scalar_type() == at::kByte || m.scalar_type() == at::kBool,
                "center_region_assign: gt_masks must be uint8 or bool");
    masks[b] = m.contiguous();
    const int64_t M = m.size(0);
    labels[b] = gt_labels[b].to(at::kLong).contiguous();
    TORCH_CHECK(labels[b].dim() == 1 && labels[b].size(0) == M, "center_region_assign: gt_labels[", b,
                "] must have one entry per mask");
    const std::optional<Tensor> box = gt_boxes.get(b);
    if (box.has_value()) {
      boxes[b] = box->to(at::kDouble).contiguous();
      TORCH_CHECK(boxes[b].dim() == 2 && boxes[b].size(0) == M && boxes[b].size(1) == 4,
                  "center_region_assign: gt_boxes[", b, "] must be [M, 4]");
    }
    first[b + 1] = first[b] + M;
  }
  const int64_t total = first[B];

  std::vector<StrideTaps> taps(D);
  for (int64_t k = 0; k < D; ++k) {
    taps[k].oh = H / mask_strides[k];
    taps[k].ow = W / mask_strides[k];
    taps[k].rows.build(H, taps[k].oh);
    taps[k].cols.build(W, taps[k].ow);
  }
  std::vector<Tensor> targets(B * D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < D; ++k)
      targets[b * D + k] = at::empty({first[b + 1] - first[b], taps[k].oh, taps[k].ow}, at::kByte);

  std::vector<cr::Moments> mom(total);
  auto scan = [&](int64_t g, Scratch& s, std::vector<uint8_t*>& out) {
    int64_t b = 0;
    while (g >= first[b + 1]) ++b;
    const int64_t m = g - first[b];
    const uint8_t* mask = reinterpret_cast<const uint8_t*>(masks[b].data_ptr()) + m * H * W;
    for (int64_t k = 0; k < D; ++k) out[k] = targets[b * D + k].data_ptr<uint8_t>() + m * taps[k].oh * taps[k].ow;
    scan_instance(mask, H, W, taps, out, s, &mom[g]);
  };
  // Helpers from the inter-op pool share the instances with the calling thread through a
  // counter, and the caller waits only for helpers that have claimed one. A fork-join
  // (OpenMP) region such as at::parallel_for waits for every thread to be scheduled: on
  // the 2-core box under load (load average ~7) a 4M-element sum took 32 ms with two
  // threads against 6.5 ms with one, and this op with its fork-join regions ~110 ms
  // against ~8 ms. Here a busy machine degrades to the one-thread time. Small batches of
  // masks stay on the calling thread: waking a helper costs more than a few 64×96 masks.
  auto queue = std::make_shared<WorkQueue>();
  queue->total = total;
  queue->work = [&scan, H, W, D](WorkQueue& q, int64_t g) {
    Scratch s;
    s.colsum.assign(W, 0);
    s.lo.resize(H);
    s.hi.resize(H);
    std::vector<uint8_t*> out(D);
    do scan(g, s, out);
    while ((g = q.next++) < q.total);
  };
  const int64_t min_pixels = int64_t{1} << 18;
  const int64_t helpers =
      total * H * W >= 2 * min_pixels ? std::min<int64_t>(at::get_num_threads() - 1, total - 1) : 0;
  for (int64_t h = 0; h < helpers; ++h) at::launch([queue] { queue->run(); });
  queue->run();
  while (queue->busy.load() != 0) std::this_thread::yield();

  std::vector<Tensor> labels_out(B * L), cells_out(B * L), inst_out(B * L);
  std::vector<int64_t> owner;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t M = first[b + 1] - first[b];
    const int64_t* lab = labels[b].data_ptr<int64_t>();
    const double* box = boxes[b].defined() ? boxes[b].data_ptr<double>() : nullptr;
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
      const int64_t S = num_grids[l];
      owner.assign(S * S, -1);
      for (int64_t m = 0; m < M; ++m) {
        const cr::Moments& mm = mom[first[b] + m];
        if (!cr::in_scale_range(mm.area, bw[m], bh[m], scale_lo[l], scale_hi[l])) continue;
        const cr::Region reg = cr::center_region(mm, bw[m], bh[m], H, W, S, pos_scale);
        for (int64_t i = reg.top; i <= reg.down; ++i)
          for (int64_t j = reg.left; j <= reg.right; ++j) owner[i * S + j] = cr::last_writer(owner[i * S + j], m);
      }
      Tensor lab_t = at::full({S, S}, num_classes, at::kLong);
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

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) { m.impl("center_region_assign", &center_region_assign_cpu); }

}  // namespace solo_fast
