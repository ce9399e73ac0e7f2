// torch's brgemm micro-kernel (at::native::cpublas::brgemm: oneDNN's JIT ukernel, AVX-512
// fp32 FMA, AVX512-BF16 dot products), as the CPU kernels use it: C[M][N] = A[M][K] @
// B[K][N], fp32 C, with B laid out once by the caller --
//   fp32: [K][N] row-major;
//   bf16: VNNI pairs, [K/2][N][2] (K even), which the AVX512-BF16 ukernel reads unpacked.
// On AMX oneDNN wants its own packing (cpublas::could_pack), and without AVX-512 (for bf16,
// AVX512-BF16) the ukernel is missing and brgemm falls back to a slow loop: brgemm_usable
// says where this layout runs fast, checked once per dtype, then on a small GEMM.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <exception>
#include <mutex>
#include <vector>

namespace solo_fast {
namespace cpu {

// K rounded up to bf16's pairs.
inline int64_t padded_k(int64_t k, bool bf16) { return bf16 ? (k + 1) / 2 * 2 : k; }

// Offset of element (k, n) of a [K][N] B operand in its layout.
inline int64_t b_offset(int64_t k, int64_t n, int64_t ncols, bool bf16) {
  return bf16 ? ((k / 2) * ncols + n) * 2 + (k % 2) : k * ncols + n;
}

inline bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return yes;
}

// b[k * ld_src + n] (k < K, n < N) written into `dst` in the layout, `ncols` wide (>= N).
template <class T, class S>
void pack_b(const S* b, int64_t k_rows, int64_t n_cols, int64_t ld_src, int64_t ncols, T* dst) {
  constexpr bool bf16 = std::is_same<T, c10::BFloat16>::value;
  for (int64_t k = 0; k < k_rows; ++k)
    for (int64_t n = 0; n < n_cols; ++n) dst[b_offset(k, n, ncols, bf16)] = static_cast<T>(b[k * ld_src + n]);
}

// Checked as the kernels call it: a column block at an offset in a wider B (ld_b > N), an
// N tail, ld_c > N. Small integers: every product and sum is exact, so a right kernel gives
// them bit for bit.
inline bool brgemm_usable(at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16) return false;
  static std::once_flag once[2];
  static bool ok[2] = {false, false};
  const int idx = dtype == at::kBFloat16;
  std::call_once(once[idx], [&] {
    try {
      if (at::native::cpublas::could_pack(dtype)) return;  // oneDNN's own packing (AMX)
      // Speed: without the ISA, the ukernel is missing and brgemm runs a plain loop (right,
      // but slower than oneDNN's convolutions and MKL).
      if (!has_avx512() || (idx == 1 && !__builtin_cpu_supports("avx512bf16"))) return;
      const int64_t M = 5, K = 6, N = 20, LDB = 40, OFF = 16, LDC = 24;
      std::vector<float> a(M * K), b(K * LDB), ref(M * LDC, -1.0f), c(M * LDC, -1.0f);
      for (int64_t i = 0; i < M * K; ++i) a[i] = static_cast<float>(i % 7 - 3);
      for (int64_t i = 0; i < K * LDB; ++i) b[i] = static_cast<float>(i % 5 - 2);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          float sum = 0.0f;
          for (int64_t k = 0; k < K; ++k) sum += a[i * K + k] * b[k * LDB + OFF + j];
          ref[i * LDC + j] = sum;
        }
      if (idx == 1) {
        std::vector<c10::BFloat16> ab(a.begin(), a.end()), bb(K * LDB);
        pack_b(b.data(), K, LDB, LDB, LDB, bb.data());
        at::native::cpublas::brgemm(M, N, K, K, LDB, LDC, false, ab.data(), bb.data() + 2 * OFF, c.data(), true);
        at::native::cpublas::brgemm_release(true);
      } else {
        at::native::cpublas::brgemm(M, N, K, K, LDB, LDC, false, a.data(), b.data() + OFF, c.data(), false);
        at::native::cpublas::brgemm_release(false);
      }
      ok[idx] = c == ref;
    } catch (const std::exception&) {
      ok[idx] = false;
    }
  });
  return ok[idx];
}

}  // namespace cpu
}  // namespace solo_fast
