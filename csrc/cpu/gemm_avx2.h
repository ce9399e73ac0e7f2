// An fp32 GEMM micro-kernel for AVX2 + FMA CPUs, where torch's brgemm has no fast kernel
// (cpu/brgemm.h): C[M][N] = A[M][K] @ B[K][N], row-major, B in brgemm's fp32 layout
// ([K][N] with leading dimension ldb), so the same packed operands serve both.
//
// Blocks of 6 rows x 16 columns of C live in 12 ymm registers; per k, two loads of B's
// row and six broadcasts of A feed 12 FMAs (the classic Haswell/Zen register tile). A
// column block's panel of B (K x 16 floats: 16-32 KB for K <= 512), copied contiguous,
// stays in L1 while every row block passes over it. Sums run in k order, one FMA per product: a different
// summation order from brgemm's, not a less accurate one.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace solo_fast {
namespace cpu {
namespace avx2 {

inline bool supported() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// Lanes of an 8-wide column block that are inside N: n0 = first column, n = N.
inline __m256i lane_mask(int64_t n0, int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t left = n - n0;
  const int32_t l = static_cast<int32_t>(left < 0 ? 0 : (left > 8 ? 8 : left));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(l), idx);
}

// Accumulators as named locals, not an array: GCC kept an array's 12 registers but also
// stored them to the stack on every k (12 stores per 12 FMAs, half the speed).
#define SOLO_FAST_AVX2_ROW(r)                                                                 \
  if (R > r) {                                                                                \
    const __m256 av = _mm256_broadcast_ss(a + r * lda + k);                                    \
    c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);                                                \
    c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);                                                \
  }
#define SOLO_FAST_AVX2_STORE(r)                                                               \
  if (R > r) {                                                                                \
    if (Full) {                                                                               \
      _mm256_storeu_ps(c + r * ldc, c##r##0);                                                  \
      _mm256_storeu_ps(c + r * ldc + 8, c##r##1);                                              \
    } else {                                                                                  \
      _mm256_maskstore_ps(c + r * ldc, m0, c##r##0);                                           \
      _mm256_maskstore_ps(c + r * ldc + 8, m1, c##r##1);                                       \
    }                                                                                         \
  }

// C[R][16] = A[R][K] @ B[K][16]; B's rows 16 floats apart (a packed panel).
template <int R, bool Full>
inline void tile(int64_t k_len, const float* a, int64_t lda, const float* b, float* c, int64_t ldc, __m256i m0,
                 __m256i m1) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < k_len; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * 16);
    const __m256 b1 = _mm256_loadu_ps(b + k * 16 + 8);
    SOLO_FAST_AVX2_ROW(0)
    SOLO_FAST_AVX2_ROW(1)
    SOLO_FAST_AVX2_ROW(2)
    SOLO_FAST_AVX2_ROW(3)
    SOLO_FAST_AVX2_ROW(4)
    SOLO_FAST_AVX2_ROW(5)
  }
  SOLO_FAST_AVX2_STORE(0)
  SOLO_FAST_AVX2_STORE(1)
  SOLO_FAST_AVX2_STORE(2)
  SOLO_FAST_AVX2_STORE(3)
  SOLO_FAST_AVX2_STORE(4)
  SOLO_FAST_AVX2_STORE(5)
}
#undef SOLO_FAST_AVX2_ROW
#undef SOLO_FAST_AVX2_STORE

template <bool Full>
inline void rows(int64_t m, int64_t k, const float* a, int64_t lda, const float* b, float* c, int64_t ldc, __m256i m0,
                 __m256i m1) {
  int64_t i = 0;
  for (; i + 6 <= m; i += 6) tile<6, Full>(k, a + i * lda, lda, b, c + i * ldc, ldc, m0, m1);
  const float* ai = a + i * lda;
  float* ci = c + i * ldc;
  switch (m - i) {
    case 5: tile<5, Full>(k, ai, lda, b, ci, ldc, m0, m1); break;
    case 4: tile<4, Full>(k, ai, lda, b, ci, ldc, m0, m1); break;
    case 3: tile<3, Full>(k, ai, lda, b, ci, ldc, m0, m1); break;
    case 2: tile<2, Full>(k, ai, lda, b, ci, ldc, m0, m1); break;
    case 1: tile<1, Full>(k, ai, lda, b, ci, ldc, m0, m1); break;
    default: break;
  }
}

// C = A @ B (C overwritten). Only where supported(). Each 16-column panel of B is first
// copied into a contiguous [K][16] buffer (zeros past N): read from B in place, its rows
// ldb floats apart (1-2 KB for 256-512 channels) fall into a few L1 sets and evict each
// other, and the panel would come from L2 for every block of rows (measured on Zen 3:
// Winograd at 0.34-0.8x oneDNN's direct conv without the copy).
inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                 int64_t ldc) {
  thread_local std::vector<float> panel;
  if (static_cast<int64_t>(panel.size()) < k * 16) panel.resize(k * 16);
  float* p = panel.data();
  const __m256i all = _mm256_set1_epi32(-1);
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t cols = std::min<int64_t>(16, n - j);
    for (int64_t kk = 0; kk < k; ++kk) {
      const float* src = b + kk * ldb + j;
      float* dst = p + kk * 16;
      if (cols == 16) {
        _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
        _mm256_storeu_ps(dst + 8, _mm256_loadu_ps(src + 8));
      } else {
        for (int64_t q = 0; q < 16; ++q) dst[q] = q < cols ? src[q] : 0.0f;
      }
    }
    if (cols == 16)
      rows<true>(m, k, a, lda, p, c + j, ldc, all, all);
    else
      rows<false>(m, k, a, lda, p, c + j, ldc, lane_mask(j, n), lane_mask(j + 8, n));
  }
}

#pragma GCC pop_options

}  // namespace avx2
}  // namespace cpu
}  // namespace solo_fast
