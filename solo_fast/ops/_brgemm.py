"""Which micro-kernel runs solo_fast's CPU GEMMs here (``winograd_conv3x3``,
``mask_logits``; csrc/cpu/brgemm.h): torch's brgemm where it is fast (AVX-512; AVX512-BF16
for bf16; not AMX, where oneDNN wants its own packing), else for fp32 solo_fast's AVX2 + FMA
micro-kernel (csrc/cpu/gemm_avx2.h), else none, and then those ops are not used. Checked
once per dtype."""
from __future__ import annotations

import functools

import torch

from .. import _ext

_OPS = ("cpu_gemm_kernel", "winograd_conv3x3", "mask_logits")


def kernel(dtype: torch.dtype) -> str:
    """"brgemm", "avx2" or "none"."""
    if dtype not in (torch.float32, torch.bfloat16) or not _ext.available():
        return "none"
    if not all(hasattr(torch.ops.solo_fast, op) for op in _OPS):
        return "none"
    return str(torch.ops.solo_fast.cpu_gemm_kernel(dtype))


@functools.lru_cache(maxsize=None)
def usable(dtype: torch.dtype) -> bool:
    """Whether some micro-kernel runs ``dtype``'s GEMMs here (choosing fp32's kernel with
    ``cpu_gemm_kernel`` never changes this: only kernels that run here can be chosen)."""
    return kernel(dtype) != "none"


def available_f32_kernels() -> list:
    """The fp32 kernels that run here (for tests to run each)."""
    if not usable(torch.float32):
        return []
    before = kernel(torch.float32)
    found = []
    try:
        for name in ("brgemm", "avx2"):
            try:
                torch.ops.solo_fast.cpu_gemm_kernel(torch.float32, name)
                found.append(name)
            except RuntimeError:
                pass
    finally:
        torch.ops.solo_fast.cpu_gemm_kernel(torch.float32, "auto")
    assert kernel(torch.float32) == before
    return found
