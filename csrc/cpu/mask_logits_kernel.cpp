// CPU kernel of solo_fast::mask_logits, the GEMM of ops.mask_predict's "cpu" path when the
// features come channels-last (SOLOv2's mask features from the fast network):
// logits[K][n] = kernels[K][E] @ features[n][E]^T + bias, fp32, for fp32 or bf16 operands.
//
// The features' rows are the GEMM's A operand as they lie; kernels^T, laid out once in
// cpu/brgemm.h's B layout, is B. Each block of kRows pixels and kCols kernels is one brgemm
// call into a small fp32 buffer that stays in L1, written out transposed with the bias:
// no [n][K] intermediate and no conversion of the features to fp32. brgemm_usable (the
// op of the same name) says where this runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/brgemm.h"

namespace solo_fast {
namespace {

using at::Tensor;

constexpr int64_t kRows = 128;  // pixels per block
constexpr int64_t kCols = 64;   // kernels per GEMM call (4 AVX-512 registers of fp32)

template <class T>
void logits_blocks(const T* feats, int64_t n, int64_t e, const T* b_op, int64_t ep, int64_t k, const float* bias,
                   float* out) {
  constexpr bool bf16 = std::is_same<T, c10::BFloat16>::value;
  const int64_t blocks = (n + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> c(kRows * kCols);
    std::vector<T> padded(ep == e ? 0 : kRows * ep, T(0.0f));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t j0 = blk * kRows, nb = std::min(kRows, n - j0);
      const T* a = feats + j0 * e;
      int64_t lda = e;
      if (ep != e) {  // bf16 pairs: an odd E gets a zero column
        for (int64_t j = 0; j < nb; ++j) std::copy(a + j * e, a + (j + 1) * e, padded.begin() + j * ep);
        a = padded.data(), lda = ep;
      }
      for (int64_t k0 = 0; k0 < k; k0 += kCols) {
        const int64_t kb = std::min(kCols, k - k0);
        at::native::cpublas::brgemm(nb, kb, ep, lda, k, kCols, false, a, b_op + (bf16 ? 2 * k0 : k0), c.data(), bf16);
        for (int64_t kk = 0; kk < kb; ++kk) {
          const float add = bias ? bias[k0 + kk] : 0.0f;
          float* row = out + (k0 + kk) * n + j0;
          for (int64_t j = 0; j < nb; ++j) row[j] = c[j * kCols + kk] + add;
        }
      }
    }
    at::native::cpublas::brgemm_release(bf16);
  });
}

Tensor mask_logits_cpu(const Tensor& features, const Tensor& kernels, const c10::optional<Tensor>& bias) {
  TORCH_CHECK(features.dim() == 2 && features.stride(1) == 1 && features.stride(0) == features.size(1),
              "features: expected [n, E] rows (contiguous), got ", features.sizes(), " strides ", features.strides());
  const at::ScalarType dt = features.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "features: expected float32 or bfloat16, got ", dt);
  TORCH_CHECK(kernels.dim() == 2 && kernels.size(1) == features.size(1), "kernels: expected [K, ", features.size(1),
              "], got ", kernels.sizes());
  TORCH_CHECK(cpu::brgemm_usable(dt), "mask_logits: brgemm_usable(", dt, ") is false on this CPU");
  const bool bf16 = dt == at::kBFloat16;
  const int64_t n = features.size(0), e = features.size(1), k = kernels.size(0), ep = cpu::padded_k(e, bf16);
  Tensor b;
  if (bias.has_value()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == k, "bias: expected [", k, "], got ", b.sizes());
  }
  Tensor out = at::empty({k, n}, features.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  // B = kernels^T [E][K] in the brgemm layout (K x E values: small next to the features).
  Tensor kt = kernels.to(dt).contiguous();
  Tensor b_op = at::zeros({ep * k}, features.options());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (bf16) {
    const auto* src = kt.data_ptr<c10::BFloat16>();
    auto* dst = b_op.data_ptr<c10::BFloat16>();
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t ee = 0; ee < e; ++ee) dst[cpu::b_offset(ee, kk, k, true)] = src[kk * e + ee];
    logits_blocks(features.data_ptr<c10::BFloat16>(), n, e, static_cast<const c10::BFloat16*>(dst), ep, k, bp,
                  out.data_ptr<float>());
  } else {
    const auto* src = kt.data_ptr<float>();
    auto* dst = b_op.data_ptr<float>();
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t ee = 0; ee < e; ++ee) dst[cpu::b_offset(ee, kk, k, false)] = src[kk * e + ee];
    logits_blocks(features.data_ptr<float>(), n, e, static_cast<const float*>(dst), ep, k, bp, out.data_ptr<float>());
  }
  return out;
}

bool brgemm_usable_op(at::ScalarType dtype) { return cpu::brgemm_usable(dtype); }

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) {
  m.impl("mask_logits", &solo_fast::mask_logits_cpu);
}

TORCH_LIBRARY_IMPL(solo_fast, CompositeExplicitAutograd, m) {
  m.impl("brgemm_usable", &solo_fast::brgemm_usable_op);
}
