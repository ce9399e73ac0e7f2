// torch's brgemm micro-kernel (at::native::cpublas::brgemm: oneDNN's JIT ukernel, AVX-512
// fp32 FMA, AVX512-BF16 dot products), as the CPU kernels use it: C[M][N] = A[M][K] @
// B[K][N], fp32 C, with B laid out once by the caller --
//   fp32: [K][N] row-major;
//   bf16: VNNI pairs, [K/2][N][2] (K even), which the AVX512-BF16 ukernel reads unpacked.
// On AMX oneDNN wants its own packing (cpublas::could_pack), and without AVX-512 (for bf16,
// AVX512-BF16) the ukernel is missing and brgemm falls back to a slow loop: brgemm_usable
// says where this layout runs fast, checked once per dtype, then on a small GEMM.
//
// Where it does not, fp32 GEMMs run cpu/gemm_avx2.h's micro-kernel on AVX2 + FMA CPUs,
// from the same B layout: gemm_kernel(dtype) says which kernel the callers use (none: they
// keep oneDNN / MKL), gemm() and gemm_release() run it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <atomic>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/gemm_avx2.h"

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

enum class Gemm { none = 0, brgemm = 1, avx2 = 2 };

inline const char* gemm_name(Gemm g) { return g == Gemm::brgemm ? "brgemm" : g == Gemm::avx2 ? "avx2" : "none"; }

// fp32's kernel as set by set_f32_gemm (-1: the default). Tests run the AVX2 kernel on
// AVX-512 machines too through it.
inline std::atomic<int>& f32_gemm_choice() {
  static std::atomic<int> choice{-1};
  return choice;
}

// The kernel that dtype's GEMMs use here: brgemm where it is fast, else for fp32 the AVX2
// micro-kernel, else none.
inline Gemm gemm_kernel(at::ScalarType dtype) {
  if (dtype == at::kFloat) {
    const int chosen = f32_gemm_choice().load();
    if (chosen >= 0) return static_cast<Gemm>(chosen);
  }
  if (brgemm_usable(dtype)) return Gemm::brgemm;
  if (dtype == at::kFloat && avx2::supported()) return Gemm::avx2;
  return Gemm::none;
}

// Sets fp32's kernel ("auto": the default); false where that kernel does not run here.
inline bool set_f32_gemm(const std::string& name) {
  if (name == "auto") {
    f32_gemm_choice().store(-1);
    return true;
  }
  if (name == "brgemm" && brgemm_usable(at::kFloat)) {
    f32_gemm_choice().store(static_cast<int>(Gemm::brgemm));
    return true;
  }
  if (name == "avx2" && avx2::supported()) {
    f32_gemm_choice().store(static_cast<int>(Gemm::avx2));
    return true;
  }
  return false;
}

// C[M][N] = A[M][K] @ B[K][N] in the layout above (fp32 C); `g` from gemm_kernel, not none.
template <class T>
inline void gemm(Gemm g, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, const T* a,
                 const T* b, float* c) {
  constexpr bool bf16 = std::is_same<T, c10::BFloat16>::value;
  if (g == Gemm::brgemm) {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, false, a, b, c, bf16);
    return;
  }
  if constexpr (!bf16) {
    if (g == Gemm::avx2) {
      avx2::gemm(m, n, k, a, lda, b, ldb, c, ldc);
      return;
    }
  }
  TORCH_CHECK(false, "gemm: no ", gemm_name(g), " kernel for this dtype");
}

// What a thread calls after its last gemm() of a region (brgemm's per-thread state).
inline void gemm_release(Gemm g, bool bf16) {
  if (g == Gemm::brgemm) at::native::cpublas::brgemm_release(bf16);
}

}  // namespace cpu
}  // namespace solo_fast
