"""``coord_conv2d`` (DESIGN.md §2): the public op, and its fast paths -- CoordConv without
the concatenation ("reference" is :func:`reference.coord_conv2d`, by concatenation).

Both fast paths convolve only the C real channels and add the coordinate channels'
contribution separately. Each coordinate map is separable -- the x map is one vector over
the width repeated on every row, the y map one vector over the height -- and it stays
separable after a bilinear resize (``coord_src_size``), because bilinear interpolation is
itself separable. With zero padding, a coordinate channel with map ``r[i] * c[j]``
contributes

    sum_{kh, kw} w[o, kh, kw] * r_pad[h + kh - p] * c_pad[w + kw - p]

(x: ``r`` = 1 on the rows, ``c`` = the x coordinates; y: ``r`` = the y coordinates,
``c`` = 1 on the columns; ``_pad`` is zero outside the map), so no ``[B, 2, H, W]``
tensor is ever built: the "cpu" path adds it to the conv output with one in-place
batched GEMM of ``[Ho, taps]`` row factors and ``[O, taps, Wo]`` weighted column
factors, the "triton" path computes it per output pixel inside the kernel.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._triton_support import lazy_triton_op, opaque_under_interpreter
from .. import _backend, _checks
from . import reference
from ._dispatch import always, resolve


# --------------------------------------------------------------------------------------
# The public op
# --------------------------------------------------------------------------------------
def coord_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    padding: int = 1,
    coords: str = "xy",
    coord_src_size: Optional[Tuple[int, int]] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """CoordConv: ``conv2d(cat([x, xx, yy], 1), weight, bias, padding=padding)``.

    ``x``, ``weight`` and ``bias`` share one floating dtype (fp16, bf16, fp32 or fp64) and
    the output has it; under autocast they may differ and the output has the autocast
    dtype, exactly as ``F.conv2d``. NaN/Inf propagate as they do through ``F.conv2d``
    (nothing is checked: that would cost a device sync per layer).
    """
    _checks.tensor("x", x, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    if coords not in ("xy", "x", "y"):
        raise ValueError(f"coords: expected 'xy', 'x' or 'y', got {coords!r}")
    need = x.shape[1] + len(coords)
    if weight.shape[1] != need:
        raise ValueError(
            f"weight: expected {need} input channels (x has {x.shape[1]} plus {len(coords)} coordinate "
            f"channel(s) for coords={coords!r}), got {weight.shape[1]}"
        )
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=_checks.FLOAT_DTYPES)
        _checks.length("bias", bias, weight.shape[0], "output channel")
    if not torch.is_autocast_enabled(x.device.type):
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != x.dtype:
                raise ValueError(f"{name}: expected the dtype of x ({_checks.dtype_name(x.dtype)}) outside "
                                 f"autocast, got {_checks.dtype_name(t.dtype)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding: expected a non-negative int, got {padding!r}")
    if coord_src_size is not None:
        _checks.size_hw("coord_src_size", coord_src_size)
    for dim, k in ((2, weight.shape[2]), (3, weight.shape[3])):
        if x.shape[dim] < 1 or x.shape[dim] + 2 * padding < k:
            raise ValueError(f"x: spatial size {tuple(x.shape[2:])} with padding {padding} is smaller than "
                             f"the {tuple(weight.shape[2:])} kernel")
    _checks.same_device(x=x, weight=weight, bias=bias)
    _, fn = resolve("coord_conv2d", backend, x.device.type)
    return fn(x, weight, bias, padding=padding, coords=coords,
              coord_src_size=None if coord_src_size is None else tuple(coord_src_size))


_backend.register("coord_conv2d", "reference", always)(reference.coord_conv2d)


# --------------------------------------------------------------------------------------
# Separable coordinates, shared by both fast paths
# --------------------------------------------------------------------------------------
def coord_vectors(
    height: int,
    width: int,
    *,
    coord_src_size: Optional[Tuple[int, int]] = None,
    device=None,
    dtype=torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(xs [W], ys [H]): the x map of ``reference.coord_maps`` is ``xs`` on every row, the y map ``ys`` on every column."""
    h0, w0 = (height, width) if coord_src_size is None else (int(coord_src_size[0]), int(coord_src_size[1]))
    xs = torch.linspace(-1, 1, w0, device=device, dtype=dtype)
    ys = torch.linspace(-1, 1, h0, device=device, dtype=dtype)
    if w0 != width:
        # A 1-row bilinear resize is the 1-D half-pixel interpolation the 2-D resize does
        # along each axis (its weights along the other, constant axis sum to one).
        xs = F.interpolate(xs.view(1, 1, 1, w0), size=(1, width), mode="bilinear", align_corners=False).view(width)
    if h0 != height:
        ys = F.interpolate(ys.view(1, 1, 1, h0), size=(1, height), mode="bilinear", align_corners=False).view(height)
    return xs, ys


def _windows(v: torch.Tensor, padding: int, k: int, n_out: int) -> torch.Tensor:
    """[k, n_out]: row t holds the zero-padded ``v`` seen by tap t of every output position."""
    vp = F.pad(v, (padding, padding))
    return vp.unfold(0, n_out, 1)[:k]


def _factors(xs, ys, coords: str) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Row and column factors ``r``, ``c`` of each coordinate channel, in channel order."""
    rows, cols = [], []
    if "x" in coords:
        rows.append(torch.ones_like(ys))
        cols.append(xs)
    if "y" in coords:
        rows.append(ys)
        cols.append(torch.ones_like(xs))
    return rows, cols


def coord_factors(
    w_coord: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    padding: int,
    coords: str,
    out_size: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(r [Ho, T], t [O, T, Wo]) with ``r @ t`` (batched over O) the coordinate channels' term [O, Ho, Wo].

    ``w_coord`` [O, n, KH, KW] is the coordinate part of the weight and T = n*KH*KW
    indexes the taps: ``r[h, tap]`` is the tap's row factor at output row h (0 in the
    zero padding), ``t[o, tap, w] = w_coord[o, tap] * column factor``. ``t`` is a single
    broadcast product rather than a small GEMM: with 2 threads on a shared machine each
    tiny MKL call cost ~30 ms of waiting (torch.profiler), far more than its arithmetic.
    Differentiable in ``w_coord`` through plain torch ops.
    """
    o, n, kh, kw = w_coord.shape
    ho, wo = out_size
    rows, cols = _factors(xs, ys, coords)
    # [n, KH, Ho] -> [Ho, n, KH, KW] -> [Ho, T]
    r = torch.stack([_windows(v, padding, kh, ho) for v in rows])
    r = r.permute(2, 0, 1)[..., None].expand(ho, n, kh, kw).reshape(ho, n * kh * kw)
    # [n, KW, Wo] -> [n, KH, KW, Wo] -> [T, Wo]
    c = torch.stack([_windows(v, padding, kw, wo) for v in cols])
    c = c[:, None].expand(n, kh, kw, wo).reshape(n * kh * kw, wo)
    return r, w_coord.reshape(o, n * kh * kw, 1) * c


def coord_weight_grad(
    grad_out: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, *, padding: int, coords: str, kernel_size: Tuple[int, int]
) -> torch.Tensor:
    """[O, n, KH, KW]: d loss / d w_coord given d loss / d out [B, O, Ho, Wo] (the separable transpose of :func:`coord_factors`)."""
    kh, kw = kernel_size
    ho, wo = grad_out.shape[-2:]
    g = grad_out.sum(0)  # [O, Ho, Wo]: the coordinate maps are the same for every image
    rows, cols = _factors(xs.to(g.dtype), ys.to(g.dtype), coords)
    r = torch.stack([_windows(v, padding, kh, ho) for v in rows])  # [n, KH, Ho]
    c = torch.stack([_windows(v, padding, kw, wo) for v in cols])  # [n, KW, Wo]
    # sum_{h, w} g[o, h, w] r[n, a, h] c[n, b, w]
    gc = torch.einsum("ohw,nbw->onhb", g, c)  # [O, n, Ho, KW]
    return torch.einsum("nah,onhb->onab", r, gc)


# --------------------------------------------------------------------------------------
# "cpu": real-channel conv + the separable term, all torch ops (autograd for free)
# --------------------------------------------------------------------------------------
def coord_conv2d_cpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    padding: int = 1,
    coords: str = "xy",
    coord_src_size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    c = x.shape[1]
    out = F.conv2d(x, weight[:, :c], bias, padding=padding)
    b, o, ho, wo = out.shape
    # A channels-last output (the fast network's layout) stays channels-last: its [B, Ho,
    # Wo * O] view takes the same term as a GEMM with the factors transposed.
    nhwc = not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)
    if not nhwc and not out.is_contiguous():
        out = out.contiguous()
    xs, ys = coord_vectors(x.shape[2], x.shape[3], coord_src_size=coord_src_size, device=x.device, dtype=x.dtype)
    r, t = coord_factors(weight[:, c:], xs, ys, padding=padding, coords=coords, out_size=(ho, wo))
    # Under autocast the conv output is in the autocast dtype (bf16/fp16) while the
    # coordinates follow x and the weight stays fp32, and the in-place GEMM below is not
    # autocast: its factors are rounded to the output's dtype, as the reference's
    # autocast conv rounds the concatenated coordinate channels and the weight.
    r, t = r.to(out.dtype), t.to(out.dtype)
    if nhwc:  # out[b, h, (w, o)] += sum_tap r[h, tap] * t[o, tap, w]
        t = t.permute(1, 2, 0).reshape(1, r.shape[1], wo * o).expand(b, -1, -1)
        out.permute(0, 2, 3, 1).view(b, ho, wo * o).baddbmm_(r.expand(b, ho, r.shape[1]), t)
        return out
    if b > 1:
        t = t.repeat(b, 1, 1)
    # One in-place batched GEMM adds the term to the conv output: no [O, Ho, Wo] term
    # tensor and one parallel region (on the busy reference CPU, benchmarks/RESULTS.md, every extra op costs a
    # scheduler time slice, ~4-16 ms, more than its arithmetic). conv2d's backward
    # needs its inputs, not its output, so updating it in place is safe for autograd.
    out.view(b * o, ho, wo).baddbmm_(r.expand(b * o, ho, r.shape[1]), t)
    return out


_backend.register("coord_conv2d", "cpu", lambda device_type: device_type == "cpu")(coord_conv2d_cpu)


# --------------------------------------------------------------------------------------
# "triton": real-channel conv + one Triton pass adding the coordinate term and the bias
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _triton_op():
    """Defines ``solo_fast::coord_conv2d_coords`` on first use, so importing solo_fast never imports triton."""
    from torch.library import triton_op

    from solo_fast.kernels import coord_conv as kern

    @triton_op("solo_fast::coord_conv2d_coords", mutates_args=())
    def coord_conv2d_coords(
        conv: torch.Tensor,
        w_coord: torch.Tensor,
        bias: Optional[torch.Tensor],
        xs: torch.Tensor,
        ys: torch.Tensor,
        padding: int,
        coords: str,
    ) -> torch.Tensor:
        """``conv`` [B, O, Ho, Wo] + the coordinate term of ``w_coord`` [O, n, KH, KW] + ``bias`` [O]."""
        return kern.launch_coord_term(conv, w_coord, bias, xs, ys, padding, coords)

    def setup_context(ctx, inputs, output):
        conv, w_coord, bias, xs, ys, padding, coords = inputs
        ctx.save_for_backward(xs, ys)
        ctx.padding, ctx.coords = padding, coords
        ctx.kernel_size = tuple(w_coord.shape[-2:])
        ctx.w_dtype = w_coord.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward(ctx, grad):
        xs, ys = ctx.saved_tensors
        g_w = None
        if ctx.needs_input_grad[1]:
            g_w = coord_weight_grad(
                grad, xs, ys, padding=ctx.padding, coords=ctx.coords, kernel_size=ctx.kernel_size
            ).to(ctx.w_dtype)
        g_b = grad.sum((0, 2, 3)).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad, g_w, g_b, None, None, None, None

    def fake(conv, w_coord, bias, xs, ys, padding, coords):
        return torch.empty_like(conv, memory_format=torch.contiguous_format)

    coord_conv2d_coords.register_autograd(backward, setup_context=setup_context)
    return opaque_under_interpreter(coord_conv2d_coords, fake)


def coord_conv2d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    padding: int = 1,
    coords: str = "xy",
    coord_src_size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    c = x.shape[1]
    conv = F.conv2d(x, weight[:, :c], None, padding=padding)
    # The coordinates' dtype is the kernel's accumulator: fp32 for fp16/bf16/fp32 inputs
    # (the term is rounded once, when added to the conv output), fp64 for fp64.
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs, ys = coord_vectors(x.shape[2], x.shape[3], coord_src_size=coord_src_size, device=x.device, dtype=acc)
    return _get_op()(conv, weight[:, c:], bias, xs, ys, padding, coords)


_triton_ready, _get_op = lazy_triton_op(_triton_op, "coord_conv2d_coords")
_backend.register("coord_conv2d", "triton", _triton_ready)(coord_conv2d_triton)
