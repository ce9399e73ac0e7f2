"""Modulated deformable convolution (DCNv2) as implicit GEMMs (solo_fast.ops.deform_conv2d).

Forward: one program owns a [BLOCK_M output pixels x BLOCK_N output channels] tile of one
image and conv group. It loops over the taps (unrolled) and, per tap, over the offset
groups meeting the conv group's channels and their channels in BLOCK_K chunks: the tap's
bilinear corners and weights are computed once per pixel ([BLOCK_M] vectors), the
[BLOCK_M, BLOCK_K] column tile is gathered from the 4 corners, weighted, multiplied by
the mask and fed to ``tl.dot`` against the [BLOCK_K, BLOCK_N] weight tile. The column
matrix never exists in memory; accumulation is fp32 (fp64 for fp64), the bias is the
epilogue.

Backward (correctness first, atomics):
- ``_bwd_data_kernel``: per (image, conv group, tap) and [BLOCK_M pixels x BLOCK_N
  channels] tile, the column gradient tile ``grad_out^T @ W_tap`` by ``tl.dot`` over the
  group's output channels, then, per offset group in the tile, grad_x scattered to the
  four corners with ``tl.atomic_add`` and grad_offset / grad_mask (the bilinear
  derivatives, mmcv's ``dmcn_col2im_coord``) reduced over the tile's channels and added
  with ``tl.atomic_add``; all three into fp32 (fp64) buffers.
- ``_bwd_weight_kernel``: per (conv group, tap) and [BLOCK_M output channels x BLOCK_N
  channels] tile, ``sum_{b, p} grad_out[b, o, p] * col[b, c, tap, p]`` with the column
  tile re-sampled per BLOCK_K pixels (an implicit GEMM over B*Ho*Wo; no atomics).

The sampling formulas are those of csrc/common/deform_conv.h (mmcv's border rule: a
sample at h <= -1, h >= H, w <= -1 or w >= W is 0; corners outside contribute 0).
Operands: fp32 inputs use "ieee" fp32 dots, fp64 fp64 dots; on a GPU fp16/bf16 inputs
feed the dots in their own dtype (tensor cores, fp32 accumulation), so the sampled
columns are rounded to it; under the interpreter they use fp32 dots (Triton 3.9's
interpreter gets bf16 dots wrong, see kernels/mask_predict.py).
Index arithmetic: x's and the output's per-image offsets are int32 on an int64 image base;
offset and mask are indexed in int32 over the whole batch. :func:`_check_int32` refuses
shapes past 2**31 elements there.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import aot_spec, interpreting, launch_kwargs, pointer_args

# Dot operand modes (the OPERAND constexpr): the accumulator's dtype ("ieee" fp32 or
# fp64), or operands rounded to fp16 / bf16.
NATIVE, FP16, BF16 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _acc(v, F64: tl.constexpr):
    """``v`` in the accumulator dtype: fp64 for fp64 inputs, fp32 otherwise."""
    if F64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def _dot(a, b, acc, OPERAND: tl.constexpr, F64: tl.constexpr):
    if OPERAND == FP16:
        return tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif OPERAND == BF16:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif F64:
        return tl.dot(a.to(tl.float64), b.to(tl.float64), acc)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def _corners(off_ptr, mask_ptr, off_base, L, p, p_ok, oh, ow, i, j, H, W, SH, SW, PH, PW, DH, DW,
             F64: tl.constexpr):
    """Bilinear corners of one tap at pixels ``p`` (1-D): (mask, inside, ly, lx, i00, i01, i10, i11,
    ok00, ok01, ok10, ok11), indices into the H*W plane; ``off_base`` = (b*G + g)*KH*KW + tap."""
    dy = _acc(tl.load(off_ptr + (off_base * 2) * L + p, mask=p_ok, other=0.0), F64)
    dx = _acc(tl.load(off_ptr + (off_base * 2 + 1) * L + p, mask=p_ok, other=0.0), F64)
    m = _acc(tl.load(mask_ptr + off_base * L + p, mask=p_ok, other=0.0), F64)
    # (Sizes equal to 1 arrive as constexprs, so the int terms are promoted, never .to()-ed.)
    py = (dy + i * DH) + _acc(oh * SH - PH, F64)
    px = (dx + j * DW) + _acc(ow * SW - PW, F64)
    inside = (py > -1.0) & (py < H) & (px > -1.0) & (px < W) & p_ok
    py = tl.where(inside, py, 0.0)
    px = tl.where(inside, px, 0.0)
    y0f = tl.floor(py)
    x0f = tl.floor(px)
    ly = py - y0f
    lx = px - x0f
    y0 = y0f.to(tl.int32)
    x0 = x0f.to(tl.int32)
    y_lo = inside & (y0 >= 0)
    y_hi = inside & (y0 + 1 < H)
    x_lo = x0 >= 0
    x_hi = x0 + 1 < W
    i00 = y0 * W + x0
    return m, inside, ly, lx, i00, y_lo & x_lo, y_lo & x_hi, y_hi & x_lo, y_hi & x_hi


@triton.jit
def _fwd_kernel(
    x_ptr,  # [B, C, H, W] contiguous, fp16/bf16/fp32/fp64
    off_ptr,  # [B, 2*G*KH*KW, Ho, Wo] contiguous, x's dtype
    mask_ptr,  # [B, G*KH*KW, Ho, Wo] contiguous, x's dtype
    w_ptr,  # [O, C/groups, KH, KW] contiguous, x's dtype
    bias_ptr,  # [O] x's dtype (unused without HAS_BIAS)
    out_ptr,  # [B, O, Ho, Wo] contiguous, x's dtype
    C, H, W, O, Ho, Wo,  # int32 sizes
    SH, SW, PH, PW, DH, DW,  # int32 stride, padding, dilation
    GROUPS,  # int32 conv groups
    OG_CH,  # int32 channels per offset group, C / G
    HAS_BIAS: tl.constexpr,
    F64: tl.constexpr,
    OPERAND: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_M: tl.constexpr,  # output pixels per program
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # input channels per dot
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = pid_bg // GROUPS
    gi = pid_bg % GROUPS
    CG = C // GROUPS
    COG = O // GROUPS
    G = C // OG_CH
    L = Ho * Wo
    HW = H * W
    KK: tl.constexpr = KH * KW
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_ok = p < L
    oh = p // Wo
    ow = p % Wo
    o_loc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = o_loc < COG
    o = gi * COG + o_loc
    rk = tl.arange(0, BLOCK_K)
    x_b = x_ptr + b.to(tl.int64) * C * HW
    c_lo = gi * CG
    c_hi = c_lo + CG
    og_lo = c_lo // OG_CH
    og_hi = (c_hi - 1) // OG_CH
    if F64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, KK):  # a runtime loop: unrolling the taps multiplied code size and registers
        i = t // KW
        j = t % KW
        for og in range(og_lo, og_hi + 1):
            m, inside, ly, lx, i00, k00, k01, k10, k11 = _corners(
                off_ptr, mask_ptr, (b * G + og) * KK + t, L, p, p_ok, oh, ow, i, j, H, W, SH, SW, PH, PW, DH, DW, F64)
            hy = 1.0 - ly
            hx = 1.0 - lx
            w00 = (hy * hx)[:, None]
            w01 = (hy * lx)[:, None]
            w10 = (ly * hx)[:, None]
            w11 = (ly * lx)[:, None]
            s_lo = tl.maximum(c_lo, og * OG_CH)
            s_hi = tl.minimum(c_hi, og * OG_CH + OG_CH)
            for c0 in range(s_lo, s_hi, BLOCK_K):
                c = c0 + rk
                c_ok = c < s_hi
                pl = x_b + (c * HW)[None, :] + i00[:, None]
                okc = c_ok[None, :]
                v = _acc(tl.load(pl, mask=k00[:, None] & okc, other=0.0), F64) * w00
                v = v + _acc(tl.load(pl + 1, mask=k01[:, None] & okc, other=0.0), F64) * w01
                v = v + _acc(tl.load(pl + W, mask=k10[:, None] & okc, other=0.0), F64) * w10
                v = v + _acc(tl.load(pl + W + 1, mask=k11[:, None] & okc, other=0.0), F64) * w11
                a = v * m[:, None]
                wt = tl.load(w_ptr + (o * (CG * KK))[None, :] + ((c - c_lo) * KK + t)[:, None],
                             mask=c_ok[:, None] & o_ok[None, :], other=0.0)
                acc = _dot(a, wt, acc, OPERAND, F64)
    if HAS_BIAS:
        acc += _acc(tl.load(bias_ptr + o, mask=o_ok, other=0.0), F64)[None, :]
    out_b = out_ptr + b.to(tl.int64) * O * L
    tl.store(out_b + (o * L)[None, :] + p[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=p_ok[:, None] & o_ok[None, :])


@triton.jit
def _bwd_data_kernel(
    gout_ptr,  # [B, O, Ho, Wo] contiguous, x's dtype
    x_ptr,  # [B, C, H, W] contiguous
    off_ptr,  # [B, 2*G*KH*KW, Ho, Wo] contiguous
    mask_ptr,  # [B, G*KH*KW, Ho, Wo] contiguous
    w_ptr,  # [O, C/groups, KH, KW] contiguous
    gx_ptr,  # [B, C, H, W] accumulator dtype, zero-initialised
    goff_ptr,  # [B, 2*G*KH*KW, Ho, Wo] accumulator dtype, zero-initialised
    gmask_ptr,  # [B, G*KH*KW, Ho, Wo] accumulator dtype, zero-initialised
    C, H, W, O, Ho, Wo,
    SH, SW, PH, PW, DH, DW,
    GROUPS,
    OG_CH,
    F64: tl.constexpr,
    OPERAND: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_M: tl.constexpr,  # output pixels per program
    BLOCK_N: tl.constexpr,  # input channels per program
    BLOCK_K: tl.constexpr,  # output channels per dot
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    KK: tl.constexpr = KH * KW
    t = pid_z % KK
    bg = pid_z // KK
    b = bg // GROUPS
    gi = bg % GROUPS
    i = t // KW
    j = t % KW
    CG = C // GROUPS
    COG = O // GROUPS
    G = C // OG_CH
    L = Ho * Wo
    HW = H * W
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_ok = p < L
    oh = p // Wo
    ow = p % Wo
    c_loc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c_loc < CG
    c = gi * CG + c_loc
    rk = tl.arange(0, BLOCK_K)
    gout_b = gout_ptr + b.to(tl.int64) * O * L
    if F64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for o0 in range(0, COG, BLOCK_K):
        o = gi * COG + o0 + rk
        o_ok = (o0 + rk) < COG
        a = tl.load(gout_b + (o * L)[None, :] + p[:, None], mask=p_ok[:, None] & o_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + (o * (CG * KK))[:, None] + (c_loc * KK + t)[None, :],
                     mask=o_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _dot(a, wt, acc, OPERAND, F64)
    x_b = x_ptr + b.to(tl.int64) * C * HW
    gx_b = gx_ptr + b.to(tl.int64) * C * HW
    c_first = gi * CG + pid_n * BLOCK_N
    c_last = tl.minimum(c_first + BLOCK_N, gi * CG + CG) - 1
    for og in range(c_first // OG_CH, c_last // OG_CH + 1):
        base = (b * G + og) * KK + t
        m, inside, ly, lx, i00, k00, k01, k10, k11 = _corners(
            off_ptr, mask_ptr, base, L, p, p_ok, oh, ow, i, j, H, W, SH, SW, PH, PW, DH, DW, F64)
        cm = (c_ok & ((c // OG_CH) == og))[None, :]
        hy = 1.0 - ly
        hx = 1.0 - lx
        g = tl.where(cm & inside[:, None], acc, 0.0)
        gm = g * m[:, None]
        off_c = (c * HW)[None, :] + i00[:, None]
        pl = x_b + off_c
        gpl = gx_b + off_c
        a00 = k00[:, None] & cm
        a01 = k01[:, None] & cm
        a10 = k10[:, None] & cm
        a11 = k11[:, None] & cm
        tl.atomic_add(gpl, gm * (hy * hx)[:, None], mask=a00)
        tl.atomic_add(gpl + 1, gm * (hy * lx)[:, None], mask=a01)
        tl.atomic_add(gpl + W, gm * (ly * hx)[:, None], mask=a10)
        tl.atomic_add(gpl + W + 1, gm * (ly * lx)[:, None], mask=a11)
        v00 = _acc(tl.load(pl, mask=a00, other=0.0), F64)
        v01 = _acc(tl.load(pl + 1, mask=a01, other=0.0), F64)
        v10 = _acc(tl.load(pl + W, mask=a10, other=0.0), F64)
        v11 = _acc(tl.load(pl + W + 1, mask=a11, other=0.0), F64)
        hy2 = hy[:, None]
        hx2 = hx[:, None]
        ly2 = ly[:, None]
        lx2 = lx[:, None]
        val = v00 * (hy2 * hx2) + v01 * (hy2 * lx2) + v10 * (ly2 * hx2) + v11 * (ly2 * lx2)
        dvy = (v10 - v00) * hx2 + (v11 - v01) * lx2
        dvx = (v01 - v00) * hy2 + (v11 - v10) * ly2
        tl.atomic_add(gmask_ptr + base * L + p, tl.sum(g * val, axis=1), mask=p_ok)
        tl.atomic_add(goff_ptr + (base * 2) * L + p, tl.sum(g * dvy, axis=1) * m, mask=p_ok)
        tl.atomic_add(goff_ptr + (base * 2 + 1) * L + p, tl.sum(g * dvx, axis=1) * m, mask=p_ok)


@triton.jit
def _bwd_weight_kernel(
    gout_ptr,  # [B, O, Ho, Wo] contiguous, x's dtype
    x_ptr,  # [B, C, H, W] contiguous
    off_ptr,  # [B, 2*G*KH*KW, Ho, Wo] contiguous
    mask_ptr,  # [B, G*KH*KW, Ho, Wo] contiguous
    gw_ptr,  # [O, C/groups, KH, KW] accumulator dtype, every element written
    B, C, H, W, O, Ho, Wo,
    SH, SW, PH, PW, DH, DW,
    GROUPS,
    OG_CH,
    F64: tl.constexpr,
    OPERAND: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_M: tl.constexpr,  # output channels per program
    BLOCK_N: tl.constexpr,  # input channels per program
    BLOCK_K: tl.constexpr,  # pixels per dot
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    KK: tl.constexpr = KH * KW
    t = pid_z % KK
    gi = pid_z // KK
    i = t // KW
    j = t % KW
    CG = C // GROUPS
    COG = O // GROUPS
    G = C // OG_CH
    L = Ho * Wo
    HW = H * W
    o_loc = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ok = o_loc < COG
    o = gi * COG + o_loc
    c_loc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c_loc < CG
    c = gi * CG + c_loc
    rk = tl.arange(0, BLOCK_K)
    c_first = gi * CG + pid_n * BLOCK_N
    c_last = tl.minimum(c_first + BLOCK_N, gi * CG + CG) - 1
    if F64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(0, B):
        # (b * O).to(...): the interpreter's loop counter is a Python int.
        gout_b = gout_ptr + (b * O).to(tl.int64) * L
        x_b = x_ptr + (b * C).to(tl.int64) * HW
        for og in range(c_first // OG_CH, c_last // OG_CH + 1):
            cm = (c_ok & ((c // OG_CH) == og))[None, :]
            base = (b * G + og) * KK + t
            for p0 in range(0, L, BLOCK_K):
                p = p0 + rk
                p_ok = p < L
                oh = p // Wo
                ow = p % Wo
                m, inside, ly, lx, i00, k00, k01, k10, k11 = _corners(
                    off_ptr, mask_ptr, base, L, p, p_ok, oh, ow, i, j, H, W, SH, SW, PH, PW, DH, DW, F64)
                hy = 1.0 - ly
                hx = 1.0 - lx
                pl = x_b + (c * HW)[None, :] + i00[:, None]
                v = _acc(tl.load(pl, mask=k00[:, None] & cm, other=0.0), F64) * (hy * hx)[:, None]
                v = v + _acc(tl.load(pl + 1, mask=k01[:, None] & cm, other=0.0), F64) * (hy * lx)[:, None]
                v = v + _acc(tl.load(pl + W, mask=k10[:, None] & cm, other=0.0), F64) * (ly * hx)[:, None]
                v = v + _acc(tl.load(pl + W + 1, mask=k11[:, None] & cm, other=0.0), F64) * (ly * lx)[:, None]
                col = v * m[:, None]  # [BLOCK_K pixels, BLOCK_N channels]
                a = tl.load(gout_b + (o * L)[:, None] + p[None, :], mask=o_ok[:, None] & p_ok[None, :], other=0.0)
                acc = _dot(a, col, acc, OPERAND, F64)
    tl.store(gw_ptr + (o * (CG * KK))[:, None] + (c_loc * KK + t)[None, :], acc,
             mask=o_ok[:, None] & c_ok[None, :])


# GPU tiles per kernel and operand class, checked by aot_specs() for spills on sm_80 and
# sm_90a (ptxas-blackwell -v; registers in brackets). The gathers of the column tile keep
# a 64-bit address per element live, so tiles are smaller than a plain GEMM's: the first
# fp16 forward tile, 64x64x32 with 4 warps, spilled 60 B on sm_90a (8 warps: 201
# registers, none); fp32 "ieee" dots run on FMA units and want fewer elements per
# thread (32x32x16 with 4 warps spilled 12 B on sm_80, 32x64x16 with 8 warps 12 B on
# sm_90a; 16x64x16 with 4 warps: 80-92, none).
# No software pipelining (num_stages=1): the gathers are not block loads.
def _cfg(m, n, k, warps):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=1)


_CONFIGS = {
    ("fwd", "tc"): _cfg(64, 64, 32, 8),
    ("fwd", "fp32"): _cfg(16, 64, 16, 4),
    ("fwd", "fp64"): _cfg(32, 32, 16, 8),
    ("data", "tc"): _cfg(64, 32, 32, 8),
    ("data", "fp32"): _cfg(32, 32, 16, 8),
    ("data", "fp64"): _cfg(32, 32, 16, 8),
    ("weight", "tc"): _cfg(64, 64, 32, 4),
    ("weight", "fp32"): _cfg(64, 32, 32, 4),
    ("weight", "fp64"): _cfg(32, 32, 16, 4),
}
# The interpreter runs each program as numpy ops; tile sizes change only summation order.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4)


def _operand(dtype: torch.dtype) -> int:
    if interpreting():
        return NATIVE.value
    return {torch.float16: FP16.value, torch.bfloat16: BF16.value}.get(dtype, NATIVE.value)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _operand_class(dtype: torch.dtype) -> str:
    return {torch.float64: "fp64", torch.float32: "fp32"}.get(dtype, "tc")


def _config(kind: str, dtype: torch.dtype):
    return _INTERPRETER_CONFIG if interpreting() else _CONFIGS[(kind, _operand_class(dtype))]


def _geometry(x, weight, offset, stride, padding, dilation, groups, offset_groups):
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = offset.shape[2], offset.shape[3]
    sizes = (c, h, w, o, ho, wo, int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]),
             int(dilation[0]), int(dilation[1]), int(groups), c // int(offset_groups))
    return b, c, h, w, o, kh, kw, ho, wo, sizes


def _check_int32(x: torch.Tensor, offset: torch.Tensor, out_channels: int) -> None:
    b, c, h, w = x.shape
    l = offset.shape[2] * offset.shape[3]
    if max(c * h * w, out_channels * l, offset.numel()) >= 2 ** 31:
        raise RuntimeError(
            f"deform_conv2d (triton): x {tuple(x.shape)} / offset {tuple(offset.shape)} exceed the kernels' int32 "
            "indexing (per-image x or output, or the whole offset tensor, >= 2**31 elements); split the batch"
        )


def launch_deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    offset_groups: int,
) -> torch.Tensor:
    """y [B, O, Ho, Wo] in x's dtype; every tensor of one dtype (mask is not optional here)."""
    b, c, h, w, o, kh, kw, ho, wo, sizes = _geometry(x, weight, offset, stride, padding, dilation, groups,
                                                     offset_groups)
    out = torch.empty((b, o, ho, wo), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _check_int32(x, offset, o)
    x, offset, mask, weight = x.contiguous(), offset.contiguous(), mask.contiguous(), weight.contiguous()
    cfg = _config("fwd", x.dtype)
    grid = (triton.cdiv(ho * wo, cfg.kwargs["BLOCK_M"]), triton.cdiv(o // groups, cfg.kwargs["BLOCK_N"]),
            b * groups)
    wrap_triton(_fwd_kernel)[grid](
        x, offset, mask, weight, bias if bias is not None else weight, out, *sizes,
        HAS_BIAS=bias is not None, F64=x.dtype == torch.float64, OPERAND=_operand(x.dtype), KH=kh, KW=kw,
        **launch_kwargs(cfg),
    )
    return out


def launch_deform_conv2d_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    offset_groups: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_offset, grad_mask, grad_weight) in the inputs' dtypes (grad_bias is grad.sum((0, 2, 3)))."""
    b, c, h, w, o, kh, kw, ho, wo, sizes = _geometry(x, weight, offset, stride, padding, dilation, groups,
                                                     offset_groups)
    acc = _acc_dtype(x.dtype)
    dev = x.device
    gx = torch.zeros(x.shape, dtype=acc, device=dev)
    goff = torch.zeros(offset.shape, dtype=acc, device=dev)
    gmask = torch.zeros(mask.shape, dtype=acc, device=dev)
    gw = torch.zeros(weight.shape, dtype=acc, device=dev)
    if b > 0:
        _check_int32(x, offset, o)
        grad, x, offset, mask, weight = (t.contiguous() for t in (grad, x, offset, mask, weight))
        common = dict(F64=x.dtype == torch.float64, OPERAND=_operand(x.dtype), KH=kh, KW=kw)
        cfg = _config("data", x.dtype)
        grid = (triton.cdiv(ho * wo, cfg.kwargs["BLOCK_M"]), triton.cdiv(c // groups, cfg.kwargs["BLOCK_N"]),
                b * groups * kh * kw)
        wrap_triton(_bwd_data_kernel)[grid](grad, x, offset, mask, weight, gx, goff, gmask, *sizes, **common,
                                            **launch_kwargs(cfg))
        cfg = _config("weight", x.dtype)
        grid = (triton.cdiv(o // groups, cfg.kwargs["BLOCK_M"]), triton.cdiv(c // groups, cfg.kwargs["BLOCK_N"]),
                groups * kh * kw)
        wrap_triton(_bwd_weight_kernel)[grid](grad, x, offset, mask, gw, b, *sizes, **common, **launch_kwargs(cfg))
    dt = x.dtype
    return gx.to(dt), goff.to(dt), gmask.to(dt), gw.to(dt)


def aot_specs() -> List[dict]:
    """Every compiled variant the launchers produce on a GPU, for ahead-of-time checks (DESIGN.md §5).

    3x3 kernels (the DCN layers of ResNet) for each operand class -- fp32 ("ieee" dots),
    fp16 and bf16 (tensor cores), fp64 -- with 16-aligned pointers (every torch
    allocation), for fp32/fp16 once more with every size divisible by 16 as well (a real
    launch specialises on it); and the forward with a 1x1 kernel, no bias, and sizes of 1
    (Triton turns int arguments equal to 1 into constants).
    """

    def types(fn, dt):
        acc_dt = "fp64" if dt == "fp64" else "fp32"
        t = dict.fromkeys(pointer_args(fn), f"*{dt}")
        for name in ("gx_ptr", "goff_ptr", "gmask_ptr", "gw_ptr"):
            if name in t:
                t[name] = f"*{acc_dt}"
        return t

    kernels = {"fwd": _fwd_kernel, "data": _bwd_data_kernel, "weight": _bwd_weight_kernel}
    operands = {"fp32": NATIVE, "fp16": FP16, "bf16": BF16, "fp64": NATIVE}
    sizes16 = ("C", "H", "W", "O", "Ho", "Wo", "OG_CH")
    specs = []
    for dt, op in operands.items():
        cls = {"fp32": "fp32", "fp64": "fp64"}.get(dt, "tc")
        for kind, fn in kernels.items():
            extra = {"HAS_BIAS": True} if kind == "fwd" else {}
            common = dict(tensor_cores=op != NATIVE, F64=dt == "fp64", OPERAND=op.value, KH=3, KW=3, **extra)
            ptrs = pointer_args(fn)
            specs.append(aot_spec(fn, _CONFIGS[(kind, cls)], types(fn, dt), aligned=ptrs, **common))
            if dt in ("fp32", "fp16"):
                specs.append(aot_spec(fn, _CONFIGS[(kind, cls)], types(fn, dt), aligned=ptrs + sizes16, **common))
    specs.append(aot_spec(_fwd_kernel, _CONFIGS[("fwd", "fp32")], types(_fwd_kernel, "fp32"),
                          aligned=pointer_args(_fwd_kernel), ones=("H", "W", "Ho", "Wo", "GROUPS", "OG_CH"),
                          F64=False, OPERAND=NATIVE.value, KH=1, KW=1, HAS_BIAS=False))
    return specs
