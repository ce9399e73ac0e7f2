"""CoordConv's coordinate channels as an epilogue pass over the real channels' convolution.

``add_coord_term`` writes ``out = conv + coord_term + bias`` in one read and one write of
the conv output: the coordinate values of every tap are rebuilt in registers from two
1-D vectors (x over the input width, y over the input height), with the zero padding as
a row/column validity mask, so no coordinate map exists in memory (DESIGN.md §2).
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _coord_term_kernel(
    conv_ptr,  # [B, O, Ho, Wo] conv of the real channels, contiguous, fp16/bf16/fp32
    wc_ptr,  # [O, NC, KH, KW] coordinate part of the weight, contiguous
    bias_ptr,  # [O] (unused without HAS_BIAS)
    xs_ptr,  # [W] fp32 (fp64 for fp64 conv), x coordinate of each input column; its dtype is the accumulator's
    ys_ptr,  # [H] same dtype as xs_ptr, y coordinate of each input row
    out_ptr,  # [B, O, Ho, Wo], conv's dtype
    O,
    H,
    W,
    Ho,
    Wo,
    PAD,
    HAS_X: tl.constexpr,
    HAS_Y: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
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
            ii = hs + (kh - PAD)
            row_one = tl.where((ii >= 0) & (ii < H), 1.0, 0.0).to(ACC)
            xk = tl.zeros((BLOCK_W,), dtype=ACC)
            for kw in tl.static_range(KW):
                jj = ws + (kw - PAD)
                wx = tl.load(wc_ptr + (o * NC * KH + kh) * KW + kw).to(ACC)
                xk += wx * tl.load(xs_ptr + jj, mask=(jj >= 0) & (jj < W), other=0.0)
            acc += row_one[:, None] * xk[None, :]
    if HAS_Y:
        for kw in tl.static_range(KW):
            jj = ws + (kw - PAD)
            col_one = tl.where((jj >= 0) & (jj < W), 1.0, 0.0).to(ACC)
            yk = tl.zeros((BLOCK_H,), dtype=ACC)
            for kh in tl.static_range(KH):
                ii = hs + (kh - PAD)
                wy = tl.load(wc_ptr + ((o * NC + HAS_X) * KH + kh) * KW + kw).to(ACC)
                yk += wy * tl.load(ys_ptr + ii, mask=(ii >= 0) & (ii < H), other=0.0)
            acc += yk[:, None] * col_one[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o).to(ACC)

    # int64 plane offset: B * O * Ho * Wo passes 2**31 at batch 8 with 256 channels at 1344x800 / 4.
    plane = pid_bo.to(tl.int64) * Ho * Wo
    offs = hs[:, None] * Wo + ws[None, :]
    ok = (hs < Ho)[:, None] & (ws < Wo)[None, :]
    conv = tl.load(conv_ptr + plane + offs, mask=ok, other=0.0).to(ACC)
    tl.store(out_ptr + plane + offs, (conv + acc).to(out_ptr.dtype.element_ty), mask=ok)


# Block shape per launch. Memory-bound elementwise pass: 16x64 tiles, 8 outputs per
# thread with 4 warps, rows of 64 fp32 = 256 B coalesced lines. ptxas-blackwell -v: 40-96
# registers on sm_80/sm_90a and no spills; 32x64 tiles needed 64-174.
BLOCK_H = 16
BLOCK_W = 64
NUM_WARPS = 4
# The interpreter runs each program as numpy ops: bigger tiles mean fewer Python-level
# programs, and tile shape does not change the result.
_INTERP_BLOCK = (64, 64)


def add_coord_term(
    conv: torch.Tensor,
    w_coord: torch.Tensor,
    bias: Optional[torch.Tensor],
    xs: torch.Tensor,
    ys: torch.Tensor,
    out: torch.Tensor,
    *,
    padding: int,
    has_x: bool,
    has_y: bool,
) -> torch.Tensor:
    """``out[b, o] = conv[b, o] + coord term of w_coord[o] + bias[o]``; ``out`` contiguous like ``conv``."""
    b, o, ho, wo = conv.shape
    if conv.numel() == 0:
        return out
    conv = conv.contiguous()
    w_coord = w_coord.contiguous()
    kh, kw = int(w_coord.shape[2]), int(w_coord.shape[3])
    bh, bw = _INTERP_BLOCK if os.environ.get("TRITON_INTERPRET") == "1" else (BLOCK_H, BLOCK_W)
    grid = (b * o, triton.cdiv(ho, bh), triton.cdiv(wo, bw))
    wrap_triton(_coord_term_kernel)[grid](
        conv,
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
        HAS_X=int(bool(has_x)),
        HAS_Y=int(bool(has_y)),
        HAS_BIAS=bias is not None,
        KH=kh,
        KW=kw,
        BLOCK_H=bh,
        BLOCK_W=bw,
        num_warps=NUM_WARPS,
    )
    return out


def aot_specs() -> List[dict]:
    """Every compiled variant the launcher can produce on a GPU, for ahead-of-time checks (DESIGN.md §5).

    3x3 kernels of the SOLO heads, each coordinate set, with and without bias, fp32 /
    fp16 / bf16 activations, 16-aligned pointers (every torch allocation); plus, for
    "xy" with bias, map sizes divisible by 16 (vectorised loads and stores).
    """
    ptrs = ("conv_ptr", "wc_ptr", "bias_ptr", "xs_ptr", "ys_ptr", "out_ptr")
    div16 = [["tt.divisibility", 16]]
    variants = [(dt, hx, hy, hb, False) for dt in ("fp32", "fp16", "bf16")
                for hx, hy in ((1, 1), (1, 0), (0, 1)) for hb in (True, False)]
    variants += [(dt, 1, 1, True, True) for dt in ("fp32", "fp16", "bf16")]
    specs = []
    for dt, has_x, has_y, has_bias, even in variants:
        sig = {
            "conv_ptr": f"*{dt}",
            "wc_ptr": f"*{dt}",
            "bias_ptr": f"*{dt}",
            "xs_ptr": "*fp32",
            "ys_ptr": "*fp32",
            "out_ptr": f"*{dt}",
            "O": "i32",
            "H": "i32",
            "W": "i32",
            "Ho": "i32",
            "Wo": "i32",
            "PAD": "i32",
        }
        constexprs = {
            "HAS_X": has_x,
            "HAS_Y": has_y,
            "HAS_BIAS": has_bias,
            "KH": 3,
            "KW": 3,
            "BLOCK_H": BLOCK_H,
            "BLOCK_W": BLOCK_W,
        }
        for k in constexprs:
            sig[k] = "constexpr"
        attrs = {name: div16 for name in ptrs}
        if even:
            attrs.update({name: div16 for name in ("H", "W", "Ho", "Wo")})
        specs.append(
            {
                "fn": _coord_term_kernel,
                "signature": sig,
                "constexprs": constexprs,
                "attrs": attrs,
                "num_warps": NUM_WARPS,
                "num_stages": 1,
                "tensor_cores": False,
            }
        )
    # Triton turns int arguments equal to 1 into constants: one output channel, 1x1 maps.
    ones = dict(specs[0], signature=dict(specs[0]["signature"]), constexprs=dict(specs[0]["constexprs"]))
    for name in ("O", "H", "W", "Ho", "Wo", "PAD"):
        ones["signature"][name] = "constexpr"
        ones["constexprs"][name] = 1
    specs.append(ones)
    return specs
