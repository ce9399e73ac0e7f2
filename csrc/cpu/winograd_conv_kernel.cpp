// CPU kernels of solo_fast::winograd_conv3x3 / winograd_pack (the contract is
// solo_fast/ops/_winograd.py): a 3x3, stride 1, padding 1, dilation 1, groups 1
// convolution of a channels-last fp32 or bf16 input by Winograd's F(2x2, 3x3) (Lavin &
// Gray 2015), 16 products per 2x2 outputs and input channel instead of 36.
//
// Per image and block of `tiles` consecutive 2x2 output tiles (row-major, across tile
// rows), on one thread:
//   1. input transform: each tile's 4x4 input patch d -> V = B^T d B, 16 values per
//      channel, into V[16][tiles][Cp] (fp32, or bf16 rounded once; Cp = C rounded up to
//      even for bf16's pairs, the extra column zero);
//   2. per block of kOutBlock output channels, 16 GEMMs M[p] = V[p] @ U[p] (tiles x Cp by
//      Cp x ob, fp32 accumulation) with torch's brgemm micro-kernel (oneDNN's JIT ukernel:
//      AVX-512 fp32 FMA, AVX512-BF16 dot products) or, for fp32 without it, the AVX2 one
//      (cpu/gemm_avx2.h), U = G g G^T packed once per weight;
//   3. output transform: Y = A^T M A + bias, rounded once to the output dtype.
// Every GEMM call has M = `tiles` (a block's unused rows of V are zeros), so torch's
// per-thread cache of JIT kernels holds one per layer shape, not one per tail.
// The working set (V, M) stays in L2; U streams from L3 once per block of tiles.
//
// The GEMM's B operand is in cpu/brgemm.h's layout; where gemm_kernel says none, the caller
// keeps oneDNN's direct convolution.
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

#include "cpu/brgemm.h"
#include "cpu/parallel.h"

namespace solo_fast {
namespace {

using at::Tensor;

constexpr int kPos = 16;         // positions of the 4x4 transformed tile
constexpr int64_t kOutBlock = 64;  // output channels per GEMM block (4 AVX-512 registers of fp32)
// Bytes of V per block of tiles: V and M stay in a 1-2 MB L2 with room for U's rows.
constexpr int64_t kVBytes = 384 * 1024;

// ---------------------------------------------------------------------------------------
// U = G g G^T per (input, output) channel pair, in fp64, rounded to fp32 (and that to bf16).
// G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
// ---------------------------------------------------------------------------------------
Tensor winograd_pack_cpu(const Tensor& weight, at::ScalarType dtype) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "weight: expected [O, C, 3, 3], got ", weight.sizes());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype: expected float32 or bfloat16, got ", dtype);
  TORCH_CHECK(weight.is_cpu(), "weight: expected a CPU tensor, got one on ", weight.device());
  TORCH_CHECK(weight.size(1) > 0, "weight: expected at least one input channel, got ", weight.sizes());
  const bool bf16 = dtype == at::kBFloat16;
  const int64_t o = weight.size(0), c = weight.size(1), cp = cpu::padded_k(c, bf16);
  Tensor w = weight.to(at::kDouble).contiguous();
  const double* wp = w.data_ptr<double>();
  std::vector<double> u(static_cast<size_t>(kPos * cp * o), 0.0);
  static const double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  for (int64_t oc = 0; oc < o; ++oc) {
    for (int64_t ic = 0; ic < c; ++ic) {
      const double* g = wp + (oc * c + ic) * 9;
      double gt[4][3];  // G g
      for (int i = 0; i < 4; ++i)
        for (int b = 0; b < 3; ++b) gt[i][b] = G[i][0] * g[b] + G[i][1] * g[3 + b] + G[i][2] * g[6 + b];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
          u[(i * 4 + j) * cp * o + cpu::b_offset(ic, oc, o, bf16)] =
              gt[i][0] * G[j][0] + gt[i][1] * G[j][1] + gt[i][2] * G[j][2];
    }
  }
  Tensor out = at::empty({kPos, cp, o}, weight.options().dtype(dtype));
  if (bf16) {
    auto* p = out.data_ptr<c10::BFloat16>();
    for (size_t i = 0; i < u.size(); ++i) p[i] = static_cast<c10::BFloat16>(static_cast<float>(u[i]));
  } else {
    auto* p = out.data_ptr<float>();
    for (size_t i = 0; i < u.size(); ++i) p[i] = static_cast<float>(u[i]);
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// The forward
// ---------------------------------------------------------------------------------------
struct Shape {
  int64_t n, h, w, c, cp, o, th, tw, tiles, blocks_per_image;
};

// Buffers reused by each thread across calls: no allocation (nor fresh pages) per block.
template <class A>
struct Scratch {
  std::vector<A> v;
  std::vector<float> m, zeros, sink;
};

template <class T>
Scratch<T>& scratch() {
  thread_local Scratch<T> s;
  return s;
}

// The transforms, for the baseline ISA, AVX2 and AVX-512 (see winograd_transforms.h).
namespace generic {
#include "cpu/winograd_transforms.h"
}  // namespace generic
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
namespace avx512 {
#include "cpu/winograd_transforms.h"
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "cpu/winograd_transforms.h"
}  // namespace avx2
#pragma GCC pop_options

using cpu::has_avx512;

template <class T>
void forward_block(const Shape& s, const T* x, const T* u, const float* bias, T* y, int64_t item, cpu::Gemm g) {
  constexpr bool bf16 = std::is_same<T, c10::BFloat16>::value;
  const int64_t per_image = s.th * s.tw;
  const int64_t n = item / s.blocks_per_image;
  const int64_t t0 = (item % s.blocks_per_image) * s.tiles, nt = std::min(s.tiles, per_image - t0);
  const int64_t ldv = s.tiles * s.cp;  // stride between positions in V
  Scratch<T>& sc = scratch<T>();
  if (static_cast<int64_t>(sc.v.size()) < kPos * ldv) sc.v.resize(kPos * ldv);
  if (static_cast<int64_t>(sc.m.size()) < kPos * s.tiles * kOutBlock) sc.m.resize(kPos * s.tiles * kOutBlock);
  if (static_cast<int64_t>(sc.zeros.size()) < s.cp) sc.zeros.assign(s.cp, 0.0f);
  if (static_cast<int64_t>(sc.sink.size()) < kOutBlock) sc.sink.resize(kOutBlock);
  static_assert(sizeof(T) <= sizeof(float), "zeros/sink buffers are floats");
  const T* zeros = reinterpret_cast<const T*>(sc.zeros.data());  // all-zero bits are 0 in both dtypes
  T* sink = reinterpret_cast<T*>(sc.sink.data());
  T* v = sc.v.data();
  float* m = sc.m.data();

  // 1. Input transform, tile by tile; V[p] is [nt][Cp] with leading dimension Cp.
  const T* img = x + n * s.h * s.w * s.c;
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t ty = (t0 + t) / s.tw, tx = (t0 + t) % s.tw;
    const int64_t y0 = 2 * ty - 1, x0 = 2 * tx - 1;
    const T* rows[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t yy = y0 + i, xx = x0 + j;
        rows[i][j] = (yy >= 0 && yy < s.h && xx >= 0 && xx < s.w) ? img + (yy * s.w + xx) * s.c : zeros;
      }
    T* vt = v + t * s.cp;
    if (has_avx512())
      avx512::input_transform(rows, s.c, vt, ldv);
    else if (cpu::avx2::supported())
      avx2::input_transform(rows, s.c, vt, ldv);
    else
      generic::input_transform(rows, s.c, vt, ldv);
    for (int64_t k = s.c; k < s.cp; ++k)
      for (int p = 0; p < kPos; ++p) vt[p * ldv + k] = T(0.0f);
  }
  for (int p = 0; p < kPos; ++p)  // a short last block: zero rows, so that every call is tiles x Cp
    std::fill(v + p * ldv + nt * s.cp, v + (p + 1) * ldv, T(0.0f));

  // 2-3. Per block of output channels: 16 GEMMs, then the output transform.
  T* out_img = y + n * s.h * s.w * s.o;
  for (int64_t o0 = 0; o0 < s.o; o0 += kOutBlock) {
    const int64_t ob = std::min(kOutBlock, s.o - o0);
    for (int p = 0; p < kPos; ++p) {
      const T* up = u + p * s.cp * s.o + (bf16 ? 2 * o0 : o0);
      cpu::gemm(g, s.tiles, ob, s.cp, s.cp, s.o, kOutBlock, v + p * ldv, up, m + p * s.tiles * kOutBlock);
    }
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t oy = 2 * ((t0 + t) / s.tw), ox = 2 * ((t0 + t) % s.tw);
      T* outs[2][2];
      for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b)
          outs[a][b] = (oy + a < s.h && ox + b < s.w) ? out_img + ((oy + a) * s.w + ox + b) * s.o + o0 : sink;
      const float* bo = bias ? bias + o0 : nullptr;
      if (has_avx512())
        avx512::output_transform(m + t * kOutBlock, s.tiles * kOutBlock, bo, ob, outs);
      else if (cpu::avx2::supported())
        avx2::output_transform(m + t * kOutBlock, s.tiles * kOutBlock, bo, ob, outs);
      else
        generic::output_transform(m + t * kOutBlock, s.tiles * kOutBlock, bo, ob, outs);
    }
  }
}

Tensor winograd_conv3x3_cpu(const Tensor& x, const Tensor& u, const c10::optional<Tensor>& bias,
                            int64_t out_channels) {
  TORCH_CHECK(x.dim() == 4, "x: expected [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x: expected float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(u.scalar_type() == x.scalar_type(), "packed: expected ", x.scalar_type(), ", got ", u.scalar_type());
  const cpu::Gemm g = cpu::gemm_kernel(x.scalar_type());
  TORCH_CHECK(g != cpu::Gemm::none, "winograd_conv3x3: no ", x.scalar_type(), " GEMM kernel on this CPU");
  TORCH_CHECK(x.size(1) > 0, "x: expected at least one channel, got ", x.sizes());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  Shape s;
  s.n = x.size(0), s.c = x.size(1), s.h = x.size(2), s.w = x.size(3);
  s.cp = cpu::padded_k(s.c, bf16), s.o = out_channels;
  TORCH_CHECK(u.dim() == 3 && u.size(0) == kPos && u.size(1) == s.cp && u.size(2) == s.o && u.is_contiguous(),
              "packed: expected the winograd_pack of a [", s.o, ", ", s.c, ", 3, 3] weight, got ", u.sizes());
  Tensor b;
  if (bias.has_value()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == s.o, "bias: expected [", s.o, "], got ", b.sizes());
  }
  Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  Tensor y = at::empty({s.n, s.o, s.h, s.w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  s.th = (s.h + 1) / 2, s.tw = (s.w + 1) / 2;
  const int64_t elem = bf16 ? 2 : 4;
  // Blocks of consecutive tiles (across tile rows) whose V fits kVBytes, as many per image
  // as a multiple of the threads so that none waits for another's last block.
  const int64_t total = s.th * s.tw, threads = at::get_num_threads();
  int64_t blocks = (total * kPos * s.cp * elem + kVBytes - 1) / kVBytes;
  if (s.n == 1 && blocks < total) blocks = std::min(total, (blocks + threads - 1) / threads * threads);
  s.tiles = (total + blocks - 1) / blocks;
  s.tiles = std::min(total, (s.tiles + 3) / 4 * 4);  // few distinct GEMM shapes across image sizes
  s.blocks_per_image = (total + s.tiles - 1) / s.tiles;
  const int64_t items = s.n * s.blocks_per_image;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  // OpenMP, as oneDNN's convolutions around it: its threads are the ones spinning after
  // the previous layer (a helper from another pool would share their cores with them).
  const int64_t work = s.tiles * s.cp * s.o;  // multiply-adds / 16 of one item
  const int64_t grain = std::max<int64_t>(1, cpu::parallel_work(int64_t{1} << 16) / std::max<int64_t>(1, work));
  if (bf16) {
    const auto* xp = xc.data_ptr<c10::BFloat16>();
    const auto* up = u.data_ptr<c10::BFloat16>();
    auto* yp = y.data_ptr<c10::BFloat16>();
    at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) forward_block(s, xp, up, bp, yp, i, g);
      cpu::gemm_release(g, bf16);
    });
  } else {
    const auto* xp = xc.data_ptr<float>();
    const auto* up = u.data_ptr<float>();
    auto* yp = y.data_ptr<float>();
    at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) forward_block(s, xp, up, bp, yp, i, g);
      cpu::gemm_release(g, bf16);
    });
  }
  return y;
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) {
  m.impl("winograd_conv3x3", &solo_fast::winograd_conv3x3_cpu);
}

TORCH_LIBRARY_IMPL(solo_fast, CompositeExplicitAutograd, m) {
  m.impl("winograd_pack", &solo_fast::winograd_pack_cpu);
}
