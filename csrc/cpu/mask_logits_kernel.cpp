// CPU kernel of solo_fast::mask_logits, the GEMM of ops.mask_predict's "cpu" path when the
// features come channels-last (SOLOv2's mask features from the fast network):
// logits[K][n] = kernels[K][E] @ features[n][E]^T + bias, fp32, for fp32 or bf16 operands.
//
// The features' rows are the GEMM's A operand as they lie; kernels^T, laid out once per
// call in cpu/brgemm.h's B layout (panels of kCols kernels), is B. Each block of kRows pixels and kCols kernels is one brgemm
// call into a small fp32 buffer that stays in L1, written out transposed with the bias:
// no [n][K] intermediate and no conversion of the features to fp32. cpu::gemm_kernel (op
// cpu_gemm_kernel) says where this runs and with which micro-kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/brgemm.h"

namespace solo_fast {
namespace {

using at::Tensor;

constexpr int64_t kRows = 128;  // pixels per block
constexpr int64_t kCols = 64;   // kernels per GEMM call (4 AVX-512 registers of fp32)

// B = kernels^T as panels of kCols kernels, each [Ep][kCols] in the brgemm layout, zero
// past K: every call is kRows x kCols x Ep with ld_b = kCols, so torch's per-thread cache
// of JIT kernels holds one kernel whatever the number of candidates (a tail of pixels is
// copied into a zero-padded block for the same reason).
template <class T>
std::vector<T> kernel_panels(const T* kern, int64_t k, int64_t e, int64_t ep) {
  const int64_t panels = (k + kCols - 1) / kCols;
  std::vector<T> b(panels * ep * kCols, T(0.0f));
  std::vector<T> kt(ep * kCols);
  for (int64_t q = 0; q < panels; ++q) {
    std::fill(kt.begin(), kt.end(), T(0.0f));
    for (int64_t kk = 0; kk < std::min(kCols, k - q * kCols); ++kk)
      for (int64_t ee = 0; ee < e; ++ee) kt[ee * kCols + kk] = kern[(q * kCols + kk) * e + ee];
    cpu::pack_b(kt.data(), ep, kCols, kCols, kCols, b.data() + q * ep * kCols);
  }
  return b;
}

template <class T>
void logits_blocks(const T* feats, int64_t n, int64_t e, const T* b_op, int64_t ep, int64_t k, const float* bias,
                   float* out, cpu::Gemm g) {
  constexpr bool bf16 = std::is_same<T, c10::BFloat16>::value;
  const int64_t blocks = (n + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> c(kRows * kCols);
    std::vector<T> padded;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t j0 = blk * kRows, nb = std::min(kRows, n - j0);
      const T* a = feats + j0 * e;
      int64_t lda = e;
      if (ep != e || nb < kRows) {  // bf16 pairs (an odd E gets a zero column), or the last rows
        padded.assign(kRows * ep, T(0.0f));
        for (int64_t j = 0; j < nb; ++j) std::copy(a + j * e, a + (j + 1) * e, padded.begin() + j * ep);
        a = padded.data(), lda = ep;
      }
      for (int64_t k0 = 0; k0 < k; k0 += kCols) {
        const int64_t kb = std::min(kCols, k - k0);
        cpu::gemm(g, kRows, kCols, ep, lda, kCols, kCols, a, b_op + (k0 / kCols) * ep * kCols, c.data());
        for (int64_t kk = 0; kk < kb; ++kk) {
          const float add = bias ? bias[k0 + kk] : 0.0f;
          float* row = out + (k0 + kk) * n + j0;
          for (int64_t j = 0; j < nb; ++j) row[j] = c[j * kCols + kk] + add;
        }
      }
    }
    cpu::gemm_release(g, bf16);
  });
}

Tensor mask_logits_cpu(const Tensor& features, const Tensor& kernels, const c10::optional<Tensor>& bias) {
  TORCH_CHECK(features.dim() == 2 && features.stride(1) == 1 && features.stride(0) == features.size(1),
              "features: expected [n, E] rows (contiguous), got ", features.sizes(), " strides ", features.strides());
  const at::ScalarType dt = features.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "features: expected float32 or bfloat16, got ", dt);
  TORCH_CHECK(kernels.dim() == 2 && kernels.size(1) == features.size(1), "kernels: expected [K, ", features.size(1),
              "], got ", kernels.sizes());
  TORCH_CHECK(features.size(1) > 0, "features: expected at least one channel, got ", features.sizes());
  TORCH_CHECK(features.is_cpu() && kernels.is_cpu(), "features, kernels: expected CPU tensors");
  const cpu::Gemm g = cpu::gemm_kernel(dt);
  TORCH_CHECK(g != cpu::Gemm::none, "mask_logits: no ", dt, " GEMM kernel on this CPU");
  const bool bf16 = dt == at::kBFloat16;
  const int64_t n = features.size(0), e = features.size(1), k = kernels.size(0), ep = cpu::padded_k(e, bf16);
  Tensor b;
  if (bias.has_value()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == k, "bias: expected [", k, "], got ", b.sizes());
  }
  Tensor out = at::empty({k, n}, features.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  Tensor kt = kernels.to(dt).contiguous();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (bf16) {
    const auto panels = kernel_panels(kt.data_ptr<c10::BFloat16>(), k, e, ep);
    logits_blocks(features.data_ptr<c10::BFloat16>(), n, e, panels.data(), ep, k, bp, out.data_ptr<float>(), g);
  } else {
    const auto panels = kernel_panels(kt.data_ptr<float>(), k, e, ep);
    logits_blocks(features.data_ptr<float>(), n, e, panels.data(), ep, k, bp, out.data_ptr<float>(), g);
  }
  return out;
}

// The GEMM kernel of dtype here ("brgemm", "avx2" or "none"), after setting fp32's to `want`
// ("auto", "brgemm", "avx2"; "" leaves it).
std::string cpu_gemm_kernel_op(at::ScalarType dtype, c10::string_view want) {
  if (!want.empty()) {
    TORCH_CHECK(dtype == at::kFloat, "cpu_gemm_kernel: only float32's kernel can be chosen, got ", dtype);
    TORCH_CHECK(cpu::set_f32_gemm(std::string(want)), "cpu_gemm_kernel: no '", std::string(want),
                "' kernel on this CPU");
  }
  return cpu::gemm_name(cpu::gemm_kernel(dtype));
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) {
  m.impl("mask_logits", &solo_fast::mask_logits_cpu);
}

TORCH_LIBRARY_IMPL(solo_fast, CompositeExplicitAutograd, m) {
  m.impl("cpu_gemm_kernel", &solo_fast::cpu_gemm_kernel_op);
}
