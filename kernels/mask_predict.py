"""Fused mask prediction: GEMM + bias + sigmoid + threshold + per-mask reductions (DESIGN.md §2).

One program owns a [BLOCK_K masks x BLOCK_N pixels] tile: it accumulates
``kernels[k, :] . features[:, n]`` over E in fp32 with ``tl.dot`` (tensor cores for
fp16/bf16 operands), then in the epilogue adds the bias, applies the sigmoid, writes the
soft mask in the output dtype and the binary mask as bytes, and adds the tile's area and
maskness partial sums into per-mask totals with atomics. The [K, H*W] fp32 logits never
exist in memory: each output byte is written once.

Numerics. ``binary``, ``area`` and ``maskness`` are defined from the fp32 logits. With
"ieee" operands (fp32, no tf32) the logits equal the reference's up to the summation
order over E; with fp16/bf16 operands they also carry the operands' rounding (relative
2**-11 / 2**-8 per product), so pixels whose logit lies that close to the threshold's
logit may flip. When kernels and features are exactly representable in the operand
dtype and their products sum exactly in fp32 (e.g. small dyadic values), every mode
gives the reference's logits bit for bit.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import aot_spec, interpreting, launch_kwargs, pointer_args

# GEMM operand modes, the kernel's OPERAND (an int keeps the op's schema and the AOT
# signatures simple): fp32 "ieee" dots, or operands rounded to fp16 / bf16.
IEEE, FP16, BF16 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
OPERANDS = {"ieee": IEEE.value, "fp16": FP16.value, "bf16": BF16.value}


@triton.jit
def _mask_predict_kernel(
    kern_ptr,  # [K, E] fp16/bf16/fp32, row stride stride_k, unit column stride
    feat_ptr,  # [E, N] fp16/bf16/fp32, row stride stride_e, unit column stride (N = H*W)
    bias_ptr,  # [K] any float (unused without HAS_BIAS)
    soft_ptr,  # [K, N] out dtype, contiguous
    bin_ptr,  # [K, N] uint8, contiguous
    area_ptr,  # [K] int32, zero-initialised; pixels over the threshold
    msum_ptr,  # [K] fp32, zero-initialised; sum of soft over those pixels
    K,  # int32 number of masks
    E,  # int32 feature channels
    N,  # int32 pixels per mask
    stride_k,  # int32 elements between rows of kern_ptr
    stride_e,  # int32 elements between rows of feat_ptr
    mask_thr,  # fp32 threshold of the binary mask
    k_bucket,  # int32 autotune key only: next power of two of K
    n_bucket,  # int32 autotune key only: next power of two of N
    HAS_BIAS: tl.constexpr,  # bool
    OPERAND: tl.constexpr,  # IEEE, FP16 or BF16
    BLOCK_K: tl.constexpr,  # masks per program
    BLOCK_N: tl.constexpr,  # pixels per program
    BLOCK_E: tl.constexpr,  # channels per dot
):
    # Mask tiles vary fastest, so the programs resident at one time share their feature
    # tile through L2 and features are read from DRAM about once.
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    # 64-bit scalar bases plus 32-bit offsets inside the tile: per-element 64-bit
    # addresses of a [BLOCK_K, BLOCK_N] tile cost 2 registers per element and made every
    # config spill on sm_80 (ptxas-blackwell -v).
    k0 = pid_k * BLOCK_K
    n0 = pid_n * BLOCK_N
    lk = tl.arange(0, BLOCK_K)
    ln = tl.arange(0, BLOCK_N)
    re = tl.arange(0, BLOCK_E)
    k_ok = (k0 + lk) < K
    n_ok = (n0 + ln) < N
    a_base = kern_ptr + k0.to(tl.int64) * stride_k
    b_base = feat_ptr + n0
    a_offs = lk[:, None] * stride_k + re[None, :]
    b_offs = re[:, None] * stride_e + ln[None, :]

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        e_ok = (e0 + re) < E
        a = tl.load(a_base + a_offs, mask=k_ok[:, None] & e_ok[None, :], other=0.0)
        b = tl.load(b_base + b_offs, mask=e_ok[:, None] & n_ok[None, :], other=0.0)
        if OPERAND == FP16:
            acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
        elif OPERAND == BF16:
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        a_base += BLOCK_E
        b_base += BLOCK_E * stride_e  # int32: fine below 2**26 pixels per mask

    if HAS_BIAS:
        acc += tl.load(bias_ptr + k0 + lk, mask=k_ok, other=0.0).to(tl.float32)[:, None]
    soft = tl.sigmoid(acc)
    ok = k_ok[:, None] & n_ok[None, :]
    # Padding lanes have logit 0 -> soft 0.5; they must not count for mask_thr < 0.5.
    on = (soft > mask_thr) & ok
    tl.atomic_add(area_ptr + k0 + lk, tl.sum(on.to(tl.int32), axis=1), mask=k_ok)
    tl.atomic_add(msum_ptr + k0 + lk, tl.sum(tl.where(on, soft, 0.0), axis=1), mask=k_ok)
    out_base = k0.to(tl.int64) * N + n0
    offs = lk[:, None] * N + ln[None, :]  # < BLOCK_K * N: int32 up to 16M pixels per mask
    tl.store(soft_ptr + out_base + offs, soft.to(soft_ptr.dtype.element_ty), mask=ok)
    tl.store(bin_ptr + out_base + offs, on.to(tl.uint8), mask=ok)


# Tiles for the GPU, all checked by aot_specs() for spills on sm_80 and sm_90a with
# ptxas-blackwell -v. The epilogue keeps soft, the threshold mask and the store addresses
# of the whole tile live, so what matters is tile elements per thread: at 64 (64x128 or
# 128x128 with 4 / 8 warps) every config spilled on sm_90a (368-840 bytes, unaligned
# specialisation), at 32 none does (89-126 registers aligned, 149-254 unaligned).
# 16 warps would cap registers at 128 and spill again.
_CONFIGS = [
    triton.Config({"BLOCK_K": 64, "BLOCK_N": 128, "BLOCK_E": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_K": 128, "BLOCK_N": 64, "BLOCK_E": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_K": 64, "BLOCK_N": 64, "BLOCK_E": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_K": 32, "BLOCK_N": 128, "BLOCK_E": 32}, num_warps=4, num_stages=3),
]
# Under the interpreter each program is a batch of numpy ops: large tiles mean fewer
# Python-level programs. (BLOCK_E sets the order of the fp32 sums over E, which the
# tests' tolerances cover.)
_INTERPRETER_CONFIG = triton.Config({"BLOCK_K": 32, "BLOCK_N": 256, "BLOCK_E": 64})

# Keyed on power-of-two buckets: the number of masks changes with every image, and
# re-tuning for each distinct K would cost more than it saves.
_mask_predict_kernel_tuned = triton.autotune(
    configs=_CONFIGS,
    key=["E", "k_bucket", "n_bucket", "OPERAND"],
    reset_to_zero=["area_ptr", "msum_ptr"],
)(_mask_predict_kernel)


def launch_mask_predict(
    features: torch.Tensor,
    kernels: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask_thr: float,
    out_dtype: torch.dtype,
    operand: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``features`` [E, N], ``kernels`` [K, E] (unit column strides) -> soft [K, N] ``out_dtype``,
    binary [K, N] uint8, area [K] int32, msum [K] fp32 (the sum of soft over the binary mask)."""
    k, e = kernels.shape
    n = features.shape[1]
    dev = features.device
    soft = torch.empty(k, n, dtype=out_dtype, device=dev)
    binary = torch.empty(k, n, dtype=torch.uint8, device=dev)
    area = torch.zeros(k, dtype=torch.int32, device=dev)
    msum = torch.zeros(k, dtype=torch.float32, device=dev)
    if k == 0 or n == 0:
        return soft, binary, area, msum
    args = [
        kernels,
        features,
        bias if bias is not None else msum,
        soft,
        binary,
        area,
        msum,
        k,
        e,
        n,
        kernels.stride(0),
        features.stride(0),
        float(mask_thr),
        triton.next_power_of_2(int(k)),
        triton.next_power_of_2(int(n)),
    ]
    grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    if interpreting():
        if operand == BF16.value:
            # Triton 3.9's interpreter gets tl.dot on bf16 operands wrong (errors ~1e10 on
            # a 16x16 product of N(0, 1) values) and its fp32 -> bf16 cast truncates; the
            # GPU rounds to nearest even. Rounding the operands here with torch and running
            # the exact fp32 dot gives the GPU's numbers: bf16 x bf16 products are exact
            # in fp32, accumulated in fp32.
            args[0], args[1] = kernels.bfloat16(), features.bfloat16()
            operand = IEEE.value
        wrap_triton(_mask_predict_kernel)[grid](
            *args, HAS_BIAS=bias is not None, OPERAND=operand, **launch_kwargs(_INTERPRETER_CONFIG)
        )
    else:
        wrap_triton(_mask_predict_kernel_tuned)[grid](*args, HAS_BIAS=bias is not None, OPERAND=operand)
    return soft, binary, area, msum


def aot_specs() -> List[dict]:
    """Every autotune config for each tensor-core operand mode the launcher uses on a GPU (DESIGN.md §5).

    fp16 and bf16 inputs keep their dtype; fp32 inputs on a GPU are rounded to fp16 in
    the kernel (the "ieee" mode is the interpreter's exact-parity mode and has no mma).
    A launch specialises on 16-aligned pointers (every torch allocation) and on ints
    divisible by 16 (vectorised loads and stores); the model's shapes (E = 256, H*W a
    multiple of 64) get that, odd sizes do not, so fp16 is also compiled without it, and
    once with one mask over a 1x1 map (Triton turns int arguments equal to 1 into constants).
    """
    kernel, ptrs = _mask_predict_kernel, pointer_args(_mask_predict_kernel)

    def types(in_dt, out_dt):
        return {**dict.fromkeys(("kern_ptr", "feat_ptr", "bias_ptr"), f"*{in_dt}"), "soft_ptr": f"*{out_dt}",
                "bin_ptr": "*u8", "area_ptr": "*i32", "msum_ptr": "*fp32", "mask_thr": "fp32"}

    even = ptrs + ("E", "N", "stride_k", "stride_e")
    variants = [("fp16", "fp16", FP16, even), ("bf16", "bf16", BF16, even), ("fp32", "fp16", FP16, even),
                ("fp16", "fp16", FP16, ptrs)]
    specs = [
        aot_spec(kernel, c, types(in_dt, out_dt), aligned=aligned, tensor_cores=True, HAS_BIAS=True, OPERAND=op.value)
        for in_dt, out_dt, op, aligned in variants for c in _CONFIGS
    ]
    specs.append(aot_spec(kernel, _CONFIGS[-1], types("fp16", "fp16"), aligned=ptrs, tensor_cores=True,
                          ones=("K", "N", "stride_e", "k_bucket", "n_bucket"), HAS_BIAS=True, OPERAND=FP16.value))
    return specs
