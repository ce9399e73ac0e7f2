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

// Small integers: every product and sum is exact, so a right kernel gives them bit for bit.
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
      const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
      if (!avx512 || (idx == 1 && !__builtin_cpu_supports("avx512bf16"))) return;
      const int64_t M = 5, K = 6, N = 3;
      std::vector<float> a(M * K), b(K * N), ref(M * N, 0.0f), c(M * N, -1.0f);
      for (int64_t i = 0; i < M * K; ++i) a[i] = static_cast<float>(i % 7 - 3);
      for (int64_t i = 0; i < K * N; ++i) b[i] = static_cast<float>(i % 5 - 2);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j)
          for (int64_t k = 0; k < K; ++k) ref[i * N + j] += a[i * K + k] * b[k * N + j];
      if (idx == 1) {
        std::vector<c10::BFloat16> ab(M * K), bb(K * N);
        for (int64_t i = 0; i < M * K; ++i) ab[i] = c10::BFloat16(a[i]);
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < N; ++j) bb[b_offset(k, j, N, true)] = c10::BFloat16(b[k * N + j]);
        at::native::cpublas::brgemm(M, N, K, K, N, N, false, ab.data(), bb.data(), c.data(), true);
        at::native::cpublas::brgemm_release(true);
      } else {
        at::native::cpublas::brgemm(M, N, K, K, N, N, false, a.data(), b.data(), c.data(), false);
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
