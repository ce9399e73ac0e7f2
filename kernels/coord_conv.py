"""CoordConv's coordinate channels as an epilogue pass over the real channels' convolution.

``launch_coord_term`` writes ``out = conv + coord_term + bias`` in one read and one write
of the conv output: the coordinate values of every tap are rebuilt in registers from two
1-D vectors (x over the input width, y over the input height), with the zero padding as
a row/column validity mask, so no coordinate map exists in memory (DESIGN.md §2).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import aot_spec, interpreting, launch_kwargs, pointer_args


@triton.jit
def _inside(pos, size, ACC: tl.constexpr):
    """1 where a tap's position lies inside the map, 0 in the zero padding."""
    return tl.where((pos >= 0) & (pos < size), 1.0, 0.0).to(ACC)


@triton.jit
def _tap_sum(v_ptr, pos, size, w_ptr, w_step, PAD, TAPS: tl.constexpr, ACC: tl.constexpr):
    """``sum_t w[t * w_step] * v_pad[pos + t - PAD]``: the taps of one axis, on a 1-D vector."""
    s = tl.zeros(pos.shape, dtype=ACC)
    for t in tl.static_range(TAPS):
        p = pos + (t - PAD)
        s += tl.load(w_ptr + t * w_step).to(ACC) * tl.load(v_ptr + p, mask=(p >= 0) & (p < size), other=0.0)
    return s


@triton.jit
def _coord_term_kernel(
    conv_ptr,  # [B, O, Ho, Wo] conv of the real channels, contiguous, fp16/bf16/fp32/fp64
    wc_ptr,  # [O, HAS_X + HAS_Y, KH, KW] coordinate part of the weight, contiguous, any float
    bias_ptr,  # [O] any float (unused without HAS_BIAS)
    xs_ptr,  # [W] x coordinate of each input column, fp32 (fp64 for fp64 conv): the accumulator's dtype
    ys_ptr,  # [H] y coordinate of each input row, xs_ptr's dtype
    out_ptr,  # [B, O, Ho, Wo] contiguous, conv's dtype
    O,  # int32 output channels
    H,  # int32 input height
    W,  # int32 input width
    Ho,  # int32 output height
    Wo,  # int32 output width
    PAD,  # int32 zero padding on every side
    HAS_X: tl.constexpr,  # 0/1: weight channel 0 is the x coordinate
    HAS_Y: tl.constexpr,  # 0/1: the next weight channel is the y coordinate
    HAS_BIAS: tl.constexpr,  # bool
    KH: tl.constexpr,  # kernel height
    KW: tl.constexpr,  # kernel width
    BLOCK_H: tl.constexpr,  # output rows per program
    BLOCK_W: tl.constexpr,  # output columns per program
):
    pid_bo = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_w = tl.program_id(2)
    o = pid_bo % O
    NC: tl.constexpr = HAS_X + HAS_Y
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    ws = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)

    ACC: tl.constexpr = xs_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=ACC)
    # Separable: the x channel gives sum_kh row_ok_kh[h] * (sum_kw w[kh, kw] x_pad[w + kw]),
    # the y channel sum_kw col_ok_kw[w] * (sum_kh w[kh, kw] y_pad[h + kh]); the taps are
    # summed on 1-D vectors and only KH + KW outer products touch the 2-D tile (instead
    # of 2 * KH * KW).
    if HAS_X:
        for kh in tl.static_range(KH):
            row_one = _inside(hs + (kh - PAD), H, ACC)
            xk = _tap_sum(xs_ptr, ws, W, wc_ptr + (o * NC * KH + kh) * KW, 1, PAD, KW, ACC)
            acc += row_one[:, None] * xk[None, :]
    if HAS_Y:
        for kw in tl.static_range(KW):
            col_one = _inside(ws + (kw - PAD), W, ACC)
            yk = _tap_sum(ys_ptr, hs, H, wc_ptr + (o * NC + HAS_X) * KH * KW + kw, KW, PAD, KH, ACC)
            acc += yk[:, None] * col_one[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o).to(ACC)

    # int64 plane offset: B * O * Ho * Wo passes 2**31 at batch 8 with 256 channels at 1344x800 / 4.
    plane = pid_bo.to(tl.int64) * Ho * Wo
    offs = hs[:, None] * Wo + ws[None, :]
    ok = (hs < Ho)[:, None] & (ws < Wo)[None, :]
    conv = tl.load(conv_ptr + plane + offs, mask=ok, other=0.0).to(ACC)
    tl.store(out_ptr + plane + offs, (conv + acc).to(out_ptr.dtype.element_ty), mask=ok)


# Memory-bound elementwise pass: 16x64 tiles, 8 outputs per thread with 4 warps, rows of
# 64 fp32 = 256 B coalesced lines. ptxas-blackwell -v: 40-96 registers on sm_80/sm_90a
# and no spills; 32x64 tiles needed 64-174.
_CONFIG = triton.Config({"BLOCK_H": 16, "BLOCK_W": 64}, num_warps=4)
# The interpreter runs each program as numpy ops: bigger tiles mean fewer Python-level
# programs, and tile shape does not change the result.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_H": 64, "BLOCK_W": 64}, num_warps=4)


def launch_coord_term(
    conv: torch.Tensor,
    w_coord: torch.Tensor,
    bias: Optional[torch.Tensor],
    xs: torch.Tensor,
    ys: torch.Tensor,
    padding: int,
    coords: str,
) -> torch.Tensor:
    """``conv`` [B, O, Ho, Wo] + the coordinate term of ``w_coord`` [O, n, KH, KW] + ``bias`` [O], contiguous."""
    out = torch.empty_like(conv, memory_format=torch.contiguous_format)
    b, o, ho, wo = conv.shape
    if conv.numel() == 0:
        return out
    w_coord = w_coord.contiguous()
    cfg = _INTERPRETER_CONFIG if interpreting() else _CONFIG
    grid = (b * o, triton.cdiv(ho, cfg.kwargs["BLOCK_H"]), triton.cdiv(wo, cfg.kwargs["BLOCK_W"]))
    wrap_triton(_coord_term_kernel)[grid](
        conv.contiguous(),
        w_coord,
        bias if bias is not None else w_coord,
        xs.contiguous(),
        ys.contiguous(),
        out,
        o,
        ys.numel(),
        xs.numel(),
        ho,
        wo,
        padding,
        HAS_X=int("x" in coords),
        HAS_Y=int("y" in coords),
        HAS_BIAS=bias is not None,
        KH=int(w_coord.shape[2]),
        KW=int(w_coord.shape[3]),
        **launch_kwargs(cfg),
    )
    return out


def aot_specs() -> List[dict]:
    """Every compiled variant the launcher can produce on a GPU, for ahead-of-time checks (DESIGN.md §5).

    3x3 kernels of the SOLO heads, each coordinate set, with and without bias, fp32 /
    fp16 / bf16 activations, 16-aligned pointers (every torch allocation); plus, for
    "xy" with bias, map sizes divisible by 16 (vectorised loads and stores), and one
    output channel of a 1x1 map (Triton turns int arguments equal to 1 into constants).
    """
    kernel, ptrs = _coord_term_kernel, pointer_args(_coord_term_kernel)
    dtypes = ("fp32", "fp16", "bf16")
    types = {dt: {**dict.fromkeys(ptrs, f"*{dt}"), "xs_ptr": "*fp32", "ys_ptr": "*fp32"} for dt in dtypes}
    xy = dict(HAS_X=1, HAS_Y=1, HAS_BIAS=True, KH=3, KW=3)
    specs = [
        aot_spec(kernel, _CONFIG, types[dt], aligned=ptrs, HAS_X=hx, HAS_Y=hy, HAS_BIAS=hb, KH=3, KW=3)
        for dt in dtypes for hx, hy in ((1, 1), (1, 0), (0, 1)) for hb in (True, False)
    ]
    specs += [aot_spec(kernel, _CONFIG, types[dt], aligned=ptrs + ("H", "W", "Ho", "Wo"), **xy) for dt in dtypes]
    specs.append(aot_spec(kernel, _CONFIG, types["fp32"], aligned=ptrs, ones=("O", "H", "W", "Ho", "Wo", "PAD"), **xy))
    return specs
