// CPU kernels of solo_fast::deform_conv2d_forward / deform_conv2d_backward (modulated
// deformable convolution, DCNv2; the contract is solo_fast/ops/_deform_conv.py).
//
// Forward, per image and per chunk of `chunk` output pixels: the sampled columns
// [C*K, n] (K = KH*KW taps, n <= chunk pixels) are filled from a per-offset-group table of
// the taps' bilinear corners (computed once per (tap, pixel) and shared by the group's
// channels), then one addmm per conv group writes [O/groups, n] of the output. The full
// [C*K, Ho*Wo] column matrix is never built: the working set beyond inputs and outputs is
// one column buffer (C*K*chunk elements), one corner table (K*chunk Corners<T> of 4
// indices and 12 coefficients, plus the taps' masks and inside flags) -- together within
// the byte budget the caller sized `chunk` for (solo_fast.ops._deform_conv.column_chunk)
// -- and, when an image takes several chunks, one GEMM result (O/groups*chunk elements).
//
// Backward, same chunks: grad_cols = W_g^T @ grad_out_g; grad_x by a scatter parallel over
// channels (each channel owns its plane: no atomics, deterministic); grad_offset /
// grad_mask by a reduction over the group's channels parallel over (tap, pixel block),
// whose gathers also re-sample the columns for grad_weight += grad_out_g @ cols^T. One
// more column-sized buffer (grad_cols).
//
// fp16 / bf16 inputs are computed in fp32 and rounded once; fp32 and fp64 natively.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <tuple>
#include <vector>

#include "common/deform_conv.h"
#include "cpu/parallel.h"

namespace solo_fast {
namespace {

namespace dc = deform_conv;
using at::Tensor;

// Elements of work below which a region stays on the calling thread (waking helpers on
// a loaded machine can cost a scheduler slice, see cpu/parallel.h).
int64_t parallel_work() { return cpu::parallel_work(int64_t{1} << 18); }

struct Geometry {
  int64_t b, c, h, w, o, kh, kw, k, ho, wo, l;
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t groups, og, cg, cog, og_ch;  // cg = C/groups, cog = O/groups, og_ch = C/offset_groups
  int64_t chunk;
};

Geometry geometry(const Tensor& x, const Tensor& offset, const Tensor& mask, const Tensor& weight,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                  int64_t offset_groups, int64_t chunk) {
  TORCH_CHECK(x.dim() == 4, "x: expected [B, C, H, W], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, "weight: expected [O, C/groups, KH, KW], got ", weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding, dilation: expected pairs");
  TORCH_CHECK(groups > 0 && offset_groups > 0 && chunk > 0, "groups, offset_groups, chunk: expected positive");
  Geometry g;
  g.b = x.size(0), g.c = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.o = weight.size(0), g.kh = weight.size(2), g.kw = weight.size(3), g.k = g.kh * g.kw;
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  TORCH_CHECK(g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.ph >= 0 && g.pw >= 0,
              "stride, dilation: expected positive; padding: non-negative");
  g.ho = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.wo = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.ho > 0 && g.wo > 0, "x: no output pixel for this kernel, stride, padding and dilation");
  g.l = g.ho * g.wo;
  g.groups = groups, g.og = offset_groups;
  TORCH_CHECK(g.c % groups == 0 && g.o % groups == 0 && weight.size(1) * groups == g.c,
              "weight: expected [O, C/groups, KH, KW] with C and O divisible by groups, got ", weight.sizes());
  TORCH_CHECK(g.c % offset_groups == 0, "offset_groups: expected a divisor of C");
  g.cg = g.c / groups, g.cog = g.o / groups, g.og_ch = g.c / offset_groups;
  TORCH_CHECK(offset.sizes() == at::IntArrayRef({g.b, 2 * g.og * g.k, g.ho, g.wo}), "offset: expected [",
              g.b, ", ", 2 * g.og * g.k, ", ", g.ho, ", ", g.wo, "], got ", offset.sizes());
  TORCH_CHECK(mask.sizes() == at::IntArrayRef({g.b, g.og * g.k, g.ho, g.wo}), "mask: expected [", g.b, ", ",
              g.og * g.k, ", ", g.ho, ", ", g.wo, "], got ", mask.sizes());
  TORCH_CHECK(offset.scalar_type() == x.scalar_type() && mask.scalar_type() == x.scalar_type() &&
                  weight.scalar_type() == x.scalar_type(),
              "x, offset, mask, weight: expected one dtype");
  g.chunk = std::min(chunk, g.l);
  return g;
}

at::ScalarType acc_type(at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "x: expected a floating dtype, got ", t);
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// Corner tables of offset group `og` of image `bi` for pixels [p0, p0 + n): entry
// t * n + p is tap t of pixel p0 + p; `m` gets the tap's mask.
template <typename T, bool kDeriv>
void fill_table(const Geometry& g, const T* off, const T* msk, int64_t bi, int64_t og, int64_t p0, int64_t n,
                dc::Corners<T>* table, T* m, uint8_t* in) {
  const T* off_b = off + ((bi * g.og + og) * 2 * g.k) * g.l;
  const T* msk_b = msk + ((bi * g.og + og) * g.k) * g.l;
  cpu::parallel_dynamic(g.k, g.k * n * 8 >= parallel_work(), [&](int64_t t) {
    const int64_t i = t / g.kw, j = t % g.kw;
    const T* dy = off_b + (2 * t) * g.l;
    const T* dx = off_b + (2 * t + 1) * g.l;
    for (int64_t p = 0; p < n; ++p) {
      const int64_t pix = p0 + p, oh = pix / g.wo, ow = pix % g.wo;
      const T py = dc::tap_position(dy[pix], i, g.dh, oh, g.sh, g.ph);
      const T px = dc::tap_position(dx[pix], j, g.dw, ow, g.sw, g.pw);
      const bool inside = dc::corners<T, kDeriv>(py, px, g.h, g.w, &table[t * n + p]);
      if (in) in[t * n + p] = inside;
      m[t * n + p] = msk_b[t * g.l + pix];
    }
  });
}

// cols[(c * K + t) * n + p] = sample of channel c (of offset group og) * mask, for
// the group's channels; `cols` points at the group's first channel.
template <typename T>
void fill_cols(const Geometry& g, const T* xb, int64_t og, int64_t n, const dc::Corners<T>* table, const T* m,
               T* cols) {
  cpu::parallel_dynamic(g.og_ch, g.og_ch * g.k * n >= parallel_work(), [&](int64_t cc) {
    const int64_t c = og * g.og_ch + cc;
    const T* plane = xb + c * g.h * g.w;
    T* row = cols + cc * g.k * n;
    for (int64_t t = 0; t < g.k; ++t) {
      for (int64_t p = 0; p < n; ++p) row[t * n + p] = dc::sample(plane, table[t * n + p]) * m[t * n + p];
    }
  });
}

// Samples the chunk's whole column matrix [C*K, n] into `cols`.
template <typename T>
void sample_chunk(const Geometry& g, const T* xb, const T* off, const T* msk, int64_t bi, int64_t p0, int64_t n,
                  std::vector<dc::Corners<T>>& table, std::vector<T>& m, T* cols) {
  for (int64_t og = 0; og < g.og; ++og) {
    fill_table<T, false>(g, off, msk, bi, og, p0, n, table.data(), m.data(), nullptr);
    fill_cols<T>(g, xb, og, n, table.data(), m.data(), cols + og * g.og_ch * g.k * n);
  }
}

Tensor deform_conv2d_forward_cpu(const Tensor& x_in, const Tensor& offset_in, const Tensor& mask_in,
                                 const Tensor& weight_in, const c10::optional<Tensor>& bias_in, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                 int64_t offset_groups, int64_t chunk) {
  const Geometry g =
      geometry(x_in, offset_in, mask_in, weight_in, stride, padding, dilation, groups, offset_groups, chunk);
  const at::ScalarType acc = acc_type(x_in.scalar_type());
  const Tensor x = x_in.to(acc).contiguous(), off = offset_in.to(acc).contiguous(),
               msk = mask_in.to(acc).contiguous();
  const Tensor wmat = weight_in.to(acc).reshape({g.o, g.cg * g.k}).contiguous();
  Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == g.o, "bias: expected [", g.o, "], got ",
                bias_in->sizes());
    bias = bias_in->to(acc).contiguous();
  }
  Tensor out = at::empty({g.b, g.o, g.l}, x.options());
  if (g.b == 0) return out.reshape({g.b, g.o, g.ho, g.wo}).to(x_in.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(acc, "deform_conv2d_forward_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* op = off.data_ptr<T>();
    const T* mp = msk.data_ptr<T>();
    std::vector<dc::Corners<T>> table(g.k * g.chunk);
    std::vector<T> m(g.k * g.chunk);
    Tensor cols_buf = at::empty({g.c * g.k * g.chunk}, x.options());
    for (int64_t bi = 0; bi < g.b; ++bi) {
      const T* xb = xp + bi * g.c * g.h * g.w;
      for (int64_t p0 = 0; p0 < g.l; p0 += g.chunk) {
        const int64_t n = std::min(g.chunk, g.l - p0);
        Tensor cols = cols_buf.narrow(0, 0, g.c * g.k * n).view({g.groups, g.cg * g.k, n});
        sample_chunk<T>(g, xb, op, mp, bi, p0, n, table, m, cols.data_ptr<T>());
        for (int64_t gi = 0; gi < g.groups; ++gi) {
          const Tensor wg = wmat.narrow(0, gi * g.cog, g.cog);
          Tensor dst = out[bi].narrow(0, gi * g.cog, g.cog).narrow(1, p0, n);
          if (n == g.l) {  // contiguous destination: write in place
            if (bias.defined()) {
              at::addmm_out(dst, bias.narrow(0, gi * g.cog, g.cog).unsqueeze(1), wg, cols[gi]);
            } else {
              at::mm_out(dst, wg, cols[gi]);
            }
          } else {
            dst.copy_(bias.defined() ? at::addmm(bias.narrow(0, gi * g.cog, g.cog).unsqueeze(1), wg, cols[gi])
                                     : at::mm(wg, cols[gi]));
          }
        }
      }
    }
  });
  return out.reshape({g.b, g.o, g.ho, g.wo}).to(x_in.scalar_type());
}

// (grad_x, grad_offset, grad_mask, grad_weight); grad_bias is grad_out.sum((0, 2, 3)).
std::tuple<Tensor, Tensor, Tensor, Tensor> deform_conv2d_backward_cpu(
    const Tensor& grad_in, const Tensor& x_in, const Tensor& offset_in, const Tensor& mask_in,
    const Tensor& weight_in, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, int64_t offset_groups, int64_t chunk) {
  const Geometry g =
      geometry(x_in, offset_in, mask_in, weight_in, stride, padding, dilation, groups, offset_groups, chunk);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({g.b, g.o, g.ho, g.wo}), "grad_out: expected [", g.b, ", ", g.o,
              ", ", g.ho, ", ", g.wo, "], got ", grad_in.sizes());
  const at::ScalarType acc = acc_type(x_in.scalar_type());
  const Tensor x = x_in.to(acc).contiguous(), off = offset_in.to(acc).contiguous(),
               msk = mask_in.to(acc).contiguous();
  const Tensor wmat = weight_in.to(acc).reshape({g.o, g.cg * g.k}).contiguous();
  const Tensor gout = grad_in.to(acc).reshape({g.b, g.o, g.l}).contiguous();
  // grad_x accumulates; every element of the others is written (grad_weight by the first
  // chunk's GEMM), so they are not zero-filled (fresh pages cost more than the writes).
  Tensor gx = at::zeros_like(x);
  Tensor goff = at::empty_like(off);
  Tensor gmsk = at::empty_like(msk);
  Tensor gw = g.b > 0 ? at::empty({g.o, g.cg * g.k}, x.options()) : at::zeros({g.o, g.cg * g.k}, x.options());
  if (g.b > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "deform_conv2d_backward_cpu", [&] {
      using T = scalar_t;
      const T* xp = x.data_ptr<T>();
      const T* op = off.data_ptr<T>();
      const T* mp = msk.data_ptr<T>();
      T* gxp = gx.data_ptr<T>();
      T* goffp = goff.data_ptr<T>();
      T* gmp = gmsk.data_ptr<T>();
      const int64_t work = parallel_work();
      std::vector<dc::Corners<T>> table(g.k * g.chunk);
      std::vector<T> m(g.k * g.chunk);
      std::vector<uint8_t> in_buf(g.k * g.chunk);
      uint8_t* in = in_buf.data();
      Tensor cols_buf = at::empty({g.c * g.k * g.chunk}, x.options());
      Tensor gcols_buf = at::empty({g.c * g.k * g.chunk}, x.options());
      for (int64_t bi = 0; bi < g.b; ++bi) {
        const T* xb = xp + bi * g.c * g.h * g.w;
        T* gxb = gxp + bi * g.c * g.h * g.w;
        for (int64_t p0 = 0; p0 < g.l; p0 += g.chunk) {
          const int64_t n = std::min(g.chunk, g.l - p0);
          Tensor cols = cols_buf.narrow(0, 0, g.c * g.k * n).view({g.groups, g.cg * g.k, n});
          Tensor gcols = gcols_buf.narrow(0, 0, g.c * g.k * n).view({g.groups, g.cg * g.k, n});
          for (int64_t gi = 0; gi < g.groups; ++gi) {
            const Tensor go = gout[bi].narrow(0, gi * g.cog, g.cog).narrow(1, p0, n);  // [O/g, n]
            Tensor gcg = gcols[gi];
            at::mm_out(gcg, wmat.narrow(0, gi * g.cog, g.cog).t(), go);
          }
          const T* gc = gcols.data_ptr<T>();
          T* colp = cols.data_ptr<T>();
          for (int64_t og = 0; og < g.og; ++og) {
            fill_table<T, true>(g, op, mp, bi, og, p0, n, table.data(), m.data(), in);
            // grad_x: channel cc scatters into its own plane.
            cpu::parallel_dynamic(g.og_ch, g.og_ch * g.k * n >= work, [&](int64_t cc) {
              const int64_t c = og * g.og_ch + cc;
              T* plane = gxb + c * g.h * g.w;
              const T* row = gc + c * g.k * n;
              for (int64_t t = 0; t < g.k; ++t) {
                for (int64_t p = 0; p < n; ++p) {
                  const int64_t e = t * n + p;
                  if (!in[e]) continue;
                  const T v = row[e] * m[e];
                  const dc::Corners<T>& cr = table[e];
                  for (int q = 0; q < 4; ++q) plane[cr.idx[q]] += v * cr.w[q];
                }
              }
            });
            // grad_offset, grad_mask: reductions over the group's channels, per (tap, block of
            // pixels); the same gathers re-sample the columns for grad_weight (the forward's
            // formula and order: bit-identical columns).
            constexpr int64_t kBlock = 64;
            const int64_t nblk = (n + kBlock - 1) / kBlock;
            T* goff_b = goffp + ((bi * g.og + og) * 2 * g.k) * g.l;
            T* gm_b = gmp + ((bi * g.og + og) * g.k) * g.l;
            cpu::parallel_dynamic(g.k * nblk, g.og_ch * g.k * n >= work, [&](int64_t job) {
              const int64_t t = job / nblk, q0 = (job % nblk) * kBlock, len = std::min(kBlock, n - q0);
              T ay[kBlock] = {}, ax[kBlock] = {}, am[kBlock] = {};
              for (int64_t cc = 0; cc < g.og_ch; ++cc) {
                const int64_t c = og * g.og_ch + cc;
                const T* plane = xb + c * g.h * g.w;
                const T* row = gc + (c * g.k + t) * n;
                T* col = colp + (c * g.k + t) * n + q0;
                for (int64_t p = 0; p < len; ++p) {
                  const int64_t e = t * n + q0 + p;
                  if (!in[e]) {
                    col[p] = T(0);
                    continue;
                  }
                  const dc::Corners<T>& cr = table[e];
                  const T gr = row[q0 + p];
                  T val = T(0), vy = T(0), vx = T(0);
                  for (int q = 0; q < 4; ++q) {
                    const T v = plane[cr.idx[q]];
                    val = val + v * cr.w[q];
                    vy += v * cr.wy[q];
                    vx += v * cr.wx[q];
                  }
                  col[p] = val * m[e];
                  am[p] += gr * val;
                  ay[p] += gr * vy;
                  ax[p] += gr * vx;
                }
              }
              for (int64_t p = 0; p < len; ++p) {
                const int64_t e = t * n + q0 + p, pix = p0 + q0 + p;
                gm_b[t * g.l + pix] = am[p];
                goff_b[(2 * t) * g.l + pix] = ay[p] * m[e];
                goff_b[(2 * t + 1) * g.l + pix] = ax[p] * m[e];
              }
            });
          }
          for (int64_t gi = 0; gi < g.groups; ++gi) {
            const Tensor go = gout[bi].narrow(0, gi * g.cog, g.cog).narrow(1, p0, n);
            Tensor gwg = gw.narrow(0, gi * g.cog, g.cog);
            if (bi == 0 && p0 == 0) {
              at::mm_out(gwg, go, cols[gi].t());
            } else {
              gwg.addmm_(go, cols[gi].t());
            }
          }
        }
      }
    });
  }
  const at::ScalarType dt = x_in.scalar_type();
  return {gx.to(dt), goff.to(dt), gmsk.to(dt), gw.reshape(weight_in.sizes()).to(dt)};
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) {
  m.impl("deform_conv2d_forward", &solo_fast::deform_conv2d_forward_cpu);
  m.impl("deform_conv2d_backward", &solo_fast::deform_conv2d_backward_cpu);
}
