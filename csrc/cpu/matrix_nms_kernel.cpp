// Matrix NMS decay factors on the CPU (DESIGN.md §2): masks bit-packed once into uint64
// words, intersections as popcount(a & b) over the upper triangle of same-label pairs
// only (pairs of different labels have IoU 0 and cannot lower a decay), blocks of rows
// in parallel on large inputs, and the decay math of csrc/common/matrix_nms.h.
//
// The package is built without -march=native, so the wide paths are compiled with
// per-function target attributes and chosen once per call from CPUID:
//   avx512  AVX-512BW packing (64 bytes -> one word with one compare) and VPOPCNTDQ
//           popcounts of 8 words at a time;
//   popcnt  SSE2 packing and the scalar POPCNT instruction (any x86-64 since ~2008);
//   generic portable C++ (on x86 without POPCNT __builtin_popcountll is a libgcc call).
// SOLO_FAST_CPU_ISA=avx512|popcnt|generic caps the choice (tests run every path).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SOLO_NMS_X86 1
#endif

#include "common/matrix_nms.h"
#include "cpu/parallel.h"

namespace solo_fast {
namespace {

// Rows of packed words are padded to whole 512-bit vectors (zeros), so the AVX-512 loop
// has no tail; at::empty's 64-byte alignment then holds for every row.
constexpr int64_t kVectorWords = 8;
// Rows sharing one pass over a column mask: each loaded word of mask j serves 4 rows,
// which cuts the traffic of streaming the column masks by 4.
constexpr int kRows = 4;
// Words of one pass over a column (a multiple of kVectorWords): 128 words = 1 KB.
constexpr int64_t kChunkWords = 128;

using PackFn = void (*)(const uint8_t* src, int64_t pixels, uint64_t* dst, int64_t words);
// out[r] = popcount(a[r] & b) over `words` words, for r < kRows (popc_rows) or r = 0 (popc_one).
using PopcFn = void (*)(const uint64_t* const* a, const uint64_t* b, int64_t words, int64_t* out);

struct Isa {
  const char* name;
  PackFn pack;
  PopcFn popc_rows;
  PopcFn popc_one;
};

// ---- packing: bit p % 64 of word p / 64 is pixel p, 1 for any nonzero byte ---------------
inline __attribute__((always_inline)) uint64_t pack8(const uint8_t* p) {
  uint64_t x;
  std::memcpy(&x, p, 8);
  const uint64_t low7 = 0x7f7f7f7f7f7f7f7fULL;
  // High bit of each byte set iff the byte is nonzero (no carry crosses a byte).
  uint64_t t = ((((x & low7) + low7) | x) & 0x8080808080808080ULL) >> 7;
  // Gathers byte i's flag into bit 56 + i: the eight partial products never overlap.
  return (t * 0x0102040810204080ULL) >> 56;
}

inline __attribute__((always_inline)) void pack_tail(const uint8_t* src, int64_t pixels, int64_t full,
                                                     uint64_t* dst, int64_t words) {
  if (full < words) {
    uint64_t w = 0;
    for (int64_t p = full * 64; p < pixels; ++p) w |= static_cast<uint64_t>(src[p] != 0) << (p - full * 64);
    dst[full] = w;
    for (int64_t q = full + 1; q < words; ++q) dst[q] = 0;
  }
}

void pack_generic(const uint8_t* src, int64_t pixels, uint64_t* dst, int64_t words) {
  const int64_t full = pixels / 64;
  for (int64_t w = 0; w < full; ++w) {
    uint64_t v = 0;
    for (int b = 0; b < 8; ++b) v |= pack8(src + w * 64 + b * 8) << (8 * b);
    dst[w] = v;
  }
  pack_tail(src, pixels, full, dst, words);
}

template <int R>
inline __attribute__((always_inline)) void popc_scalar(const uint64_t* const* a, const uint64_t* b, int64_t words,
                                                       int64_t* out) {
  uint64_t acc[R] = {};
  for (int64_t w = 0; w < words; ++w) {
    const uint64_t x = b[w];
    for (int r = 0; r < R; ++r) acc[r] += static_cast<uint64_t>(__builtin_popcountll(a[r][w] & x));
  }
  for (int r = 0; r < R; ++r) out[r] = static_cast<int64_t>(acc[r]);
}

void popc_rows_generic(const uint64_t* const* a, const uint64_t* b, int64_t words, int64_t* out) {
  popc_scalar<kRows>(a, b, words, out);
}
void popc_one_generic(const uint64_t* const* a, const uint64_t* b, int64_t words, int64_t* out) {
  popc_scalar<1>(a, b, words, out);
}

#if defined(SOLO_NMS_X86)
// SSE2 is part of x86-64 itself: no target attribute, no CPUID check.
void pack_sse2(const uint8_t* src, int64_t pixels, uint64_t* dst, int64_t words) {
  const int64_t full = pixels / 64;
  const __m128i zero = _mm_setzero_si128();
  for (int64_t w = 0; w < full; ++w) {
    uint64_t v = 0;
    for (int q = 0; q < 4; ++q) {
      __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + w * 64 + q * 16));
      uint32_t is_zero = static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(x, zero)));
      v |= static_cast<uint64_t>(~is_zero & 0xffffu) << (16 * q);
    }
    dst[w] = v;
  }
  pack_tail(src, pixels, full, dst, words);
}

// popc_scalar inlined here is compiled for POPCNT, so __builtin_popcountll becomes the
// instruction instead of a libgcc call (the package's baseline flags lack -mpopcnt).
__attribute__((target("popcnt"))) void popc_rows_popcnt(const uint64_t* const* a, const uint64_t* b, int64_t words,
                                                        int64_t* out) {
  popc_scalar<kRows>(a, b, words, out);
}
__attribute__((target("popcnt"))) void popc_one_popcnt(const uint64_t* const* a, const uint64_t* b, int64_t words,
                                                       int64_t* out) {
  popc_scalar<1>(a, b, words, out);
}

__attribute__((target("avx512f,avx512bw"))) void pack_avx512(const uint8_t* src, int64_t pixels, uint64_t* dst,
                                                             int64_t words) {
  const int64_t full = pixels / 64;
  for (int64_t w = 0; w < full; ++w) {
    __m512i x = _mm512_loadu_si512(src + w * 64);
    dst[w] = static_cast<uint64_t>(_mm512_test_epi8_mask(x, x));
  }
  const int64_t rest = pixels - full * 64;
  if (full < words) {
    // A masked load never touches the bytes past the end of the mask.
    __m512i x = _mm512_maskz_loadu_epi8(rest ? (~0ULL >> (64 - rest)) : 0ULL, src + full * 64);
    dst[full] = static_cast<uint64_t>(_mm512_test_epi8_mask(x, x));
    for (int64_t q = full + 1; q < words; ++q) dst[q] = 0;
  }
}

__attribute__((target("avx512f,avx512vpopcntdq"))) void popc_rows_avx512(const uint64_t* const* a, const uint64_t* b,
                                                                         int64_t words, int64_t* out) {
  static_assert(kRows == 4, "popc_rows_avx512 is written for 4 rows");
  __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  const uint64_t *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  for (int64_t w = 0; w < words; w += kVectorWords) {
    const __m512i x = _mm512_load_si512(b + w);
    acc0 = _mm512_add_epi64(acc0, _mm512_popcnt_epi64(_mm512_and_si512(x, _mm512_load_si512(a0 + w))));
    acc1 = _mm512_add_epi64(acc1, _mm512_popcnt_epi64(_mm512_and_si512(x, _mm512_load_si512(a1 + w))));
    acc2 = _mm512_add_epi64(acc2, _mm512_popcnt_epi64(_mm512_and_si512(x, _mm512_load_si512(a2 + w))));
    acc3 = _mm512_add_epi64(acc3, _mm512_popcnt_epi64(_mm512_and_si512(x, _mm512_load_si512(a3 + w))));
  }
  out[0] = _mm512_reduce_add_epi64(acc0);
  out[1] = _mm512_reduce_add_epi64(acc1);
  out[2] = _mm512_reduce_add_epi64(acc2);
  out[3] = _mm512_reduce_add_epi64(acc3);
}

__attribute__((target("avx512f,avx512vpopcntdq"))) void popc_one_avx512(const uint64_t* const* a, const uint64_t* b,
                                                                        int64_t words, int64_t* out) {
  __m512i acc = _mm512_setzero_si512();
  const uint64_t* a0 = a[0];
  for (int64_t w = 0; w < words; w += kVectorWords) {
    acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_load_si512(b + w),
                                                                     _mm512_load_si512(a0 + w))));
  }
  out[0] = _mm512_reduce_add_epi64(acc);
}
#endif  // SOLO_NMS_X86

// ---- mask areas (nonzero bytes per row), for the default mask_area -------------------
// torch's reduction of a bool [500, 67200] tensor takes ~120-220 ms on the reference CPU (it
// widens every byte to int64); counting bytes here is memory-bound.
int64_t count_nonzero_generic(const uint8_t* src, int64_t pixels) {
  int64_t c = 0;
  for (int64_t p = 0; p < pixels; ++p) c += src[p] != 0;
  return c;
}

#if defined(SOLO_NMS_X86)
__attribute__((target("avx512f,avx512bw,popcnt"))) int64_t count_nonzero_avx512(const uint8_t* src, int64_t pixels) {
  const int64_t full = pixels / 64;
  int64_t c = 0;
  for (int64_t w = 0; w < full; ++w) {
    __m512i x = _mm512_loadu_si512(src + w * 64);
    c += __builtin_popcountll(static_cast<uint64_t>(_mm512_test_epi8_mask(x, x)));
  }
  return c + count_nonzero_generic(src + full * 64, pixels - full * 64);
}
#endif

// Going parallel can cost a scheduler time slice (a fork-join region measured 16 ms for a
// 0.2 ms torch gather with 2 threads on the loaded reference CPU), so a region goes
// parallel only when its one-thread time is well above that: ~2**28 word operations (popcounts of
// 64-bit words, bytes packed or counted) take ~30 ms on one core at AVX-512 speed.
int64_t parallel_work() { return cpu::parallel_work(int64_t{1} << 28); }

Isa select_isa() {
  const char* env = std::getenv("SOLO_FAST_CPU_ISA");
  const std::string cap = env ? env : "";
  const bool any = cap.empty() || cap == "avx512";
#if defined(SOLO_NMS_X86)
  __builtin_cpu_init();
  // libgcc also checks that the OS saves the zmm state (XCR0) before reporting avx512*.
  if (any && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vpopcntdq")) {
    return {"avx512", pack_avx512, popc_rows_avx512, popc_one_avx512};
  }
  if ((any || cap == "popcnt") && __builtin_cpu_supports("popcnt")) {
    return {"popcnt", pack_sse2, popc_rows_popcnt, popc_one_popcnt};
  }
#endif
  return {"generic", pack_generic, popc_rows_generic, popc_one_generic};
}

at::Tensor matrix_nms_decay_popcount_cpu(const at::Tensor& masks, const at::Tensor& labels, const at::Tensor& areas,
                                         c10::string_view kernel, double sigma) {
  TORCH_CHECK(masks.dim() == 3, "masks: expected [N, H, W], got ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == at::kBool || masks.scalar_type() == at::kByte,
              "masks: expected bool or uint8, got ", masks.scalar_type());
  const int64_t n = masks.size(0);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, "labels: expected [", n, "], got ", labels.sizes());
  TORCH_CHECK(areas.dim() == 1 && areas.size(0) == n, "areas: expected [", n, "], got ", areas.sizes());
  TORCH_CHECK(kernel == "gaussian" || kernel == "linear", "kernel: expected 'gaussian' or 'linear', got '",
              std::string(kernel), "'");
  const bool linear = kernel == "linear";
  const float sig = static_cast<float>(sigma);
  at::Tensor out = at::empty({n}, masks.options().dtype(at::kFloat));
  if (n == 0) return out;

  const int64_t pixels = masks.size(1) * masks.size(2);
  // bool and uint8 share one byte layout.
  const at::Tensor flat = masks.reshape({n, pixels}).contiguous();
  const uint8_t* src = static_cast<const uint8_t*>(flat.data_ptr());
  const at::Tensor lab_t = labels.to(at::kLong).contiguous();
  const at::Tensor area_t = areas.to(at::kFloat).contiguous();
  const int64_t* lab = lab_t.data_ptr<int64_t>();
  const float* area = area_t.data_ptr<float>();

  const Isa isa = select_isa();
  const int64_t words = (pixels + 64 * kVectorWords - 1) / (64 * kVectorWords) * kVectorWords;
  at::Tensor packed_t = at::empty({n, std::max<int64_t>(words, 1)}, masks.options().dtype(at::kLong));
  uint64_t* packed = reinterpret_cast<uint64_t*>(packed_t.data_ptr<int64_t>());
  const int64_t par_work = parallel_work();
  cpu::parallel_dynamic(n, n * pixels >= par_work,
                        [&](int64_t i) { isa.pack(src + i * pixels, pixels, packed + i * words, words); });

  // iou_t[j * n + i] = iou[i, j] for i < j of the same label, else 0: row j holds column j
  // of the reference's matrix, so both column reductions below read contiguous memory.
  std::vector<float> iou_t(static_cast<size_t>(n) * static_cast<size_t>(n), 0.0f);
  const int64_t blocks = (n + kRows - 1) / kRows;
  // Same-label pairs: only they are counted.
  std::vector<int64_t> sorted_labels(lab, lab + n);
  std::sort(sorted_labels.begin(), sorted_labels.end());
  int64_t pairs = 0;
  for (int64_t i = 0, run = 0; i < n; ++i) {
    run = (i > 0 && sorted_labels[i] == sorted_labels[i - 1]) ? run + 1 : 0;
    pairs += run;
  }
  // Block b has about n - kRows * b columns to its right: handing blocks out in order
  // starts the longest first, so the last ones to finish are short.
  cpu::parallel_dynamic(blocks, pairs * words >= par_work, [&](int64_t blk) {
    const int64_t i0 = blk * kRows;
    const int rows = static_cast<int>(std::min<int64_t>(kRows, n - i0));
    std::vector<int64_t> cols;
    std::vector<unsigned> act;
    for (int64_t j = i0 + 1; j < n; ++j) {
      unsigned active = 0;
      for (int r = 0; r < rows; ++r) {
        if (i0 + r < j && lab[i0 + r] == lab[j]) active |= 1u << r;
      }
      if (active != 0) {
        cols.push_back(j);
        act.push_back(active);
      }
    }
    if (cols.empty()) return;
    std::vector<int64_t> inter(cols.size() * kRows, 0);
    // Chunks of kChunkWords: the block's rows (4 x 1 KB) stay in L1 and the chunk of
    // every column (N x 1 KB) in L2, instead of whole masks streaming from L3.
    for (int64_t w0 = 0; w0 < words; w0 += kChunkWords) {
      const int64_t len = std::min<int64_t>(kChunkWords, words - w0);
      const uint64_t* a[kRows];
      for (int r = 0; r < kRows; ++r) a[r] = packed + std::min<int64_t>(i0 + r, n - 1) * words + w0;
      for (size_t c = 0; c < cols.size(); ++c) {
        const uint64_t* col = packed + cols[c] * words + w0;
        int64_t part[kRows] = {};
        const unsigned active = act[c];
        if ((active & (active - 1)) == 0) {
          const int r = __builtin_ctz(active);
          isa.popc_one(a + r, col, len, part + r);
        } else {
          isa.popc_rows(a, col, len, part);
        }
        for (int r = 0; r < kRows; ++r) inter[c * kRows + r] += part[r];
      }
    }
    for (size_t c = 0; c < cols.size(); ++c) {
      const int64_t j = cols[c];
      for (int r = 0; r < rows; ++r) {
        if (act[c] & (1u << r)) {
          // Exact up to 2**24 pixels, like the reference's float32 matmul.
          iou_t[j * n + i0 + r] =
              matrix_nms::iou(static_cast<float>(inter[c * kRows + r]), area[i0 + r], area[j]);
        }
      }
    }
  });

  // comp[j] = max_i iou[i, j]; denominators f(comp[i]) once per row.
  // Both passes are N^2 / 2 float compares, small next to the popcounts.
  const int64_t row_chunks = (n + 63) / 64;
  std::vector<float> denom(n);
  cpu::parallel_dynamic(row_chunks, n * n / 2 >= par_work, [&](int64_t c) {
    for (int64_t j = c * 64; j < std::min<int64_t>(n, c * 64 + 64); ++j) {
      const float* row = iou_t.data() + j * n;
      float comp = 0.0f;
      for (int64_t i = 0; i < j; ++i) comp = std::max(comp, row[i]);
      denom[j] = matrix_nms::decay_denominator(comp, linear, sig);
    }
  });
  float* dec = out.data_ptr<float>();
  cpu::parallel_dynamic(row_chunks, n * n / 2 >= par_work, [&](int64_t c) {
    for (int64_t j = c * 64; j < std::min<int64_t>(n, c * 64 + 64); ++j) {
      const float* row = iou_t.data() + j * n;
      float d = matrix_nms::decay_init();
      for (int64_t i = 0; i < j; ++i) {
        if (row[i] > 0.0f) d = std::min(d, matrix_nms::decay_ratio(row[i], denom[i], linear, sig));
      }
      dec[j] = d;
    }
  });
  return out;
}

at::Tensor matrix_nms_mask_area_cpu(const at::Tensor& masks) {
  TORCH_CHECK(masks.dim() == 3, "masks: expected [N, H, W], got ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == at::kBool || masks.scalar_type() == at::kByte,
              "masks: expected bool or uint8, got ", masks.scalar_type());
  const int64_t n = masks.size(0);
  const int64_t pixels = masks.size(1) * masks.size(2);
  at::Tensor out = at::empty({n}, masks.options().dtype(at::kLong));
  if (n == 0) return out;
  const at::Tensor flat = masks.reshape({n, pixels}).contiguous();
  const uint8_t* src = static_cast<const uint8_t*>(flat.data_ptr());
  int64_t (*count)(const uint8_t*, int64_t) = count_nonzero_generic;
#if defined(SOLO_NMS_X86)
  if (std::string(select_isa().name) == "avx512") count = count_nonzero_avx512;
#endif
  int64_t* dst = out.data_ptr<int64_t>();
  cpu::parallel_dynamic(n, n * pixels >= parallel_work(), [&](int64_t i) { dst[i] = count(src + i * pixels, pixels); });
  return out;
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) {
  m.impl("matrix_nms_decay_popcount", &solo_fast::matrix_nms_decay_popcount_cpu);
  m.impl("matrix_nms_mask_area", &solo_fast::matrix_nms_mask_area_cpu);
}
