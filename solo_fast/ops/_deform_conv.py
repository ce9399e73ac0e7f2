"""``deform_conv2d``: modulated deformable convolution (DCNv2), the public op and its fast paths.

Contract (the semantics of mmcv's ``ModulatedDeformConv2d`` and torchvision's
``deform_conv2d``)::

    deform_conv2d(x, offset, mask, weight, bias=None, *, stride=1, padding=0, dilation=1,
                  groups=1, offset_groups=1, backend=None) -> y [B, O, Ho, Wo]

``x`` [B, C, H, W]; ``weight`` [O, C/groups, KH, KW]; ``bias`` [O] or None;
``Ho = (H + 2*ph - dh*(KH-1) - 1) // sh + 1`` (likewise Wo), both >= 1; ``offset``
[B, 2*G*KH*KW, Ho, Wo] with G = ``offset_groups``: for group g and tap t = i*KW + j, channel
``2*(g*KH*KW + t)`` is dy and the next one dx; ``mask`` [B, G*KH*KW, Ho, Wo] (channel
``g*KH*KW + t``), or None for all ones (DCNv1). Input channel c uses offset group
c // (C/G). Tap (i, j) of output pixel (ho, wo) samples x at
``(ho*sh - ph + i*dh + dy, wo*sw - pw + j*dw + dx)`` bilinearly, mmcv's
``dmcn_im2col_bilinear`` border rule: a sample at h <= -1, h >= H, w <= -1 or w >= W is
0; inside, each corner outside the image contributes 0. Each sample is multiplied by its
mask, then ``y[b, o] = sum_{c in o's group, i, j} weight[o, c, i, j] * sample + bias[o]``.
``stride``/``padding``/``dilation`` are an int or an (h, w) pair: stride and dilation
positive, padding non-negative; C and O divisible by ``groups``, C by ``offset_groups``.
x, offset, mask, weight and bias share one floating dtype (fp16, bf16, fp32, fp64) and
the output has it; fp16/bf16 are computed in fp32 and rounded once (reference, "cpu", the
Triton interpreter), except that on a GPU the Triton kernels feed the sampled columns to
tensor cores in the input dtype (fp32 accumulation), so those are rounded too. Under
autocast all floating inputs are cast to the autocast dtype, as ``F.conv2d``'s are.
B = 0 gives an empty [0, O, Ho, Wo]. Differentiable in x, offset, mask, weight and bias
(the derivative of ``floor`` is taken as 0, so at integer sample positions the offset
gradient is the one-sided difference towards the upper corner, as in mmcv).

Backends: "reference" (:func:`reference.deform_conv2d`: gather the whole column tensor,
one matmul), "cpu" (the C++ ops ``solo_fast::deform_conv2d_forward`` / ``_backward``: columns sampled
in chunks of output pixels sized by :func:`column_chunk`, one GEMM per chunk and conv
group; the backward in C++ too, without atomics),
"triton" (``kernels/deform_conv.py``: an implicit GEMM that samples each column tile in
registers and never stores the column matrix).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from .. import _backend, _checks, _ext
from . import reference
from ._dispatch import always, autocast_off, resolve
from ._triton_support import lazy_triton_op, opaque_under_interpreter

OP = "deform_conv2d"

# The "cpu" path's working set for sampled columns (bytes, per chunk); see column_chunk.
# On the 2-core reference CPU the c4 forward (256 -> 256, 3x3, 50x84: 38.7 MB of columns)
# took 236 ms with 4 MiB chunks (455 pixels: more parallel regions and thinner GEMMs),
# 144 ms with 16 MiB, 114 ms with 32 MiB and 117 ms unchunked; backward 416 / 344 / 293 / 314 ms.
COLUMN_BUDGET_BYTES = 32 << 20


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------
def _pair(name: str, value, *, minimum: int) -> Tuple[int, int]:
    what = "positive" if minimum > 0 else "non-negative"
    if _checks.is_int(value):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_checks.is_int(v) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name}: expected a {what} int or a pair of them, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name}: expected a {what} int or a pair of them, got {value!r}")
    return pair


def output_size(
    in_size: Tuple[int, int],
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> Tuple[int, int]:
    """(Ho, Wo) of the convolution arithmetic (may be < 1 for a too-small input)."""
    return tuple(
        (in_size[d] + 2 * padding[d] - dilation[d] * (kernel_size[d] - 1) - 1) // stride[d] + 1 for d in (0, 1)
    )


def table_bytes(element_size: int) -> int:
    """Bytes per (tap, pixel) of the "cpu" path's corner table: ``deform_conv::Corners<T>``
    (4 int64 indices and 12 coefficients), the tap's mask and an inside flag."""
    return 4 * 8 + 12 * element_size + element_size + 1


def column_chunk(channels: int, taps: int, pixels: int, element_size: int, budget: Optional[int] = None) -> int:
    """Output pixels per chunk of the "cpu" path: the largest count whose sampled columns
    ``[channels*taps, chunk]`` (``element_size`` bytes each) and corner table
    (``taps * chunk`` entries of :func:`table_bytes`) fit ``budget`` bytes together, at
    least one and at most ``pixels``. The C++ forward's working set beyond its inputs and
    output is then <= budget, plus one [O/groups, chunk] GEMM result when the image takes
    more than one chunk; the backward adds one more column-sized buffer (the column
    gradients), <= 2 * budget. (fp16/bf16 inputs are computed on fp32 copies, which come on
    top.) ``budget`` defaults to :data:`COLUMN_BUDGET_BYTES`, read at call time."""
    if budget is None:
        budget = COLUMN_BUDGET_BYTES
    per_pixel = taps * (channels * element_size + table_bytes(element_size))
    return int(max(1, min(max(pixels, 1), budget // per_pixel)))


# --------------------------------------------------------------------------------------
# The public op
# --------------------------------------------------------------------------------------
def deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    offset_groups: int = 1,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Modulated deformable convolution (DCNv2); the contract is this module's docstring."""
    _checks.tensor("x", x, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("offset", offset, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    if mask is not None:
        _checks.tensor("mask", mask, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=_checks.FLOAT_DTYPES)
    st = _pair("stride", stride, minimum=1)
    pd = _pair("padding", padding, minimum=0)
    dl = _pair("dilation", dilation, minimum=1)
    _checks.positive_int("groups", groups)
    _checks.positive_int("offset_groups", offset_groups)
    b, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    if kh < 1 or kw < 1:
        raise ValueError(f"weight: expected a kernel of at least 1x1, got shape {tuple(weight.shape)}")
    if c % groups:
        raise ValueError(f"groups: expected a divisor of x's {c} channels, got {groups}")
    if o % groups:
        raise ValueError(f"groups: expected a divisor of weight's {o} output channels, got {groups}")
    if cg * groups != c:
        raise ValueError(
            f"weight: expected {c // groups} input channels per group (x has {c} channels, groups={groups}), "
            f"got shape {tuple(weight.shape)}"
        )
    if c % offset_groups:
        raise ValueError(f"offset_groups: expected a divisor of x's {c} channels, got {offset_groups}")
    if bias is not None:
        _checks.length("bias", bias, o, "output channel")
    ho, wo = output_size((h, w), (kh, kw), st, pd, dl)
    if h < 1 or w < 1 or ho < 1 or wo < 1:
        raise ValueError(
            f"x: spatial size {(h, w)} with padding {pd}, dilation {dl} and stride {st} gives no output "
            f"pixel for the {(kh, kw)} kernel (output size {(ho, wo)})"
        )
    taps = kh * kw
    want = (b, 2 * offset_groups * taps, ho, wo)
    if tuple(offset.shape) != want:
        raise ValueError(
            f"offset: expected shape {want} (B, 2*offset_groups*KH*KW, Ho, Wo), got {tuple(offset.shape)}"
        )
    if mask is not None and tuple(mask.shape) != (b, offset_groups * taps, ho, wo):
        raise ValueError(
            f"mask: expected shape {(b, offset_groups * taps, ho, wo)} (B, offset_groups*KH*KW, Ho, Wo), "
            f"got {tuple(mask.shape)}"
        )
    _checks.same_device(x=x, offset=offset, mask=mask, weight=weight, bias=bias)
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype != torch.float64:  # autocast leaves fp64 alone, as F.conv2d's
        dt = torch.get_autocast_dtype(dev)
        x, offset, weight = x.to(dt), offset.to(dt), weight.to(dt)
        mask = None if mask is None else mask.to(dt)
        bias = None if bias is None else bias.to(dt)
    else:
        for name, t in (("offset", offset), ("mask", mask), ("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != x.dtype:
                raise ValueError(
                    f"{name}: expected the dtype of x ({_checks.dtype_name(x.dtype)}) outside autocast, "
                    f"got {_checks.dtype_name(t.dtype)}"
                )
    _, fn = resolve(OP, backend, dev)
    with autocast_off(dev):  # the inputs are in the autocast dtype already
        return fn(x, offset, mask, weight, bias, stride=st, padding=pd, dilation=dl, groups=groups,
                  offset_groups=offset_groups)


_backend.register(OP, "reference", always)(reference.deform_conv2d)


# --------------------------------------------------------------------------------------
# "cpu": the compiled C++ ops, columns sampled in chunks of output pixels
# --------------------------------------------------------------------------------------
_CPP_FWD = "solo_fast::deform_conv2d_forward"
_CPP_BWD = "solo_fast::deform_conv2d_backward"


def _cpp_loaded() -> bool:
    return _ext.available() and hasattr(torch.ops.solo_fast, "deform_conv2d_forward")


def cpu_available(device_type: str) -> bool:
    return device_type == "cpu" and _cpp_loaded()


def _acc_size(dtype: torch.dtype) -> int:
    """Bytes per element of the C++ op's arithmetic (fp16/bf16 are computed in fp32)."""
    return 8 if dtype == torch.float64 else 4


def _ones_mask(offset: torch.Tensor) -> torch.Tensor:
    b, c2, ho, wo = offset.shape
    return offset.new_ones((b, c2 // 2, ho, wo))


def _compiled(call):
    """A backend implementation with the reference's signature around a compiled op that
    takes a mask tensor (DCNv1's None becomes ones) and the geometry as lists:
    ``call(x, offset, mask, weight, bias, stride, padding, dilation, groups, offset_groups)``."""
    def implementation(x, offset, mask, weight, bias=None, *, stride, padding, dilation, groups, offset_groups):
        if mask is None:
            mask = _ones_mask(offset)
        return call(x, offset, mask, weight, bias, list(stride), list(padding), list(dilation), groups, offset_groups)

    return implementation


def _cpp_forward(x, offset, mask, weight, bias, *geometry):
    """:func:`reference.deform_conv2d` on the C++ op (forward and backward in C++), columns
    sampled ``column_chunk`` output pixels at a time."""
    chunk = column_chunk(x.shape[1], weight.shape[2] * weight.shape[3], offset.shape[2] * offset.shape[3],
                         _acc_size(x.dtype))
    return torch.ops.solo_fast.deform_conv2d_forward(x, offset, mask, weight, bias, *geometry, chunk)


deform_conv2d_cpu = _compiled(_cpp_forward)


# What the C++ and the Triton ops share: both forwards take (x, offset, mask, weight, bias,
# *geometry) and both backwards (grad, x, offset, mask, weight, *geometry) -> the four
# input gradients (the bias gradient is a sum, here).
def _autograd(backward_op):
    """``(setup_context, backward)`` for a forward op whose backward op is ``backward_op``."""
    def setup_context(ctx, inputs, output):
        x, offset, mask, weight, bias, *geometry = inputs
        ctx.save_for_backward(x, offset, mask, weight)
        ctx.geometry, ctx.has_bias = geometry, bias is not None

    def backward(ctx, grad):
        gx, goff, gmask, gw = backward_op(grad, *ctx.saved_tensors, *ctx.geometry)
        gb = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return (gx, goff, gmask, gw, gb) + (None,) * len(ctx.geometry)

    return setup_context, backward


def _output_fake(x, offset, mask, weight, bias, *geometry):
    return x.new_empty((x.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))


def _grads_fake(grad, x, offset, mask, weight, *geometry):
    return torch.empty_like(x), torch.empty_like(offset), torch.empty_like(mask), torch.empty_like(weight)


if _cpp_loaded():
    torch.library.register_fake(_CPP_FWD)(_output_fake)
    torch.library.register_fake(_CPP_BWD)(_grads_fake)
    _cpp_setup, _cpp_backward = _autograd(torch.ops.solo_fast.deform_conv2d_backward)
    torch.library.register_autograd(_CPP_FWD, _cpp_backward, setup_context=_cpp_setup)


_backend.register(OP, "cpu", cpu_available)(deform_conv2d_cpu)


# --------------------------------------------------------------------------------------
# "triton": implicit-GEMM kernels (kernels/deform_conv.py), forward and backward
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _triton_op():
    """Defines ``solo_fast::deform_conv2d_triton`` (and its backward) on first use, so
    importing solo_fast never imports triton."""
    from torch.library import triton_op

    from solo_fast.kernels import deform_conv as kern

    @triton_op("solo_fast::deform_conv2d_triton_backward", mutates_args=())
    def deform_conv2d_triton_backward(
        grad: torch.Tensor,
        x: torch.Tensor,
        offset: torch.Tensor,
        mask: torch.Tensor,
        weight: torch.Tensor,
        stride: List[int],
        padding: List[int],
        dilation: List[int],
        groups: int,
        offset_groups: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grad_x, grad_offset, grad_mask, grad_weight)."""
        return kern.launch_deform_conv2d_backward(grad, x, offset, mask, weight, stride, padding, dilation, groups,
                                                  offset_groups)

    bwd = opaque_under_interpreter(deform_conv2d_triton_backward, _grads_fake)

    @triton_op("solo_fast::deform_conv2d_triton", mutates_args=())
    def deform_conv2d_triton(
        x: torch.Tensor,
        offset: torch.Tensor,
        mask: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        stride: List[int],
        padding: List[int],
        dilation: List[int],
        groups: int,
        offset_groups: int,
    ) -> torch.Tensor:
        return kern.launch_deform_conv2d(x, offset, mask, weight, bias, stride, padding, dilation, groups,
                                         offset_groups)

    setup_context, backward = _autograd(bwd)
    deform_conv2d_triton.register_autograd(backward, setup_context=setup_context)
    return opaque_under_interpreter(deform_conv2d_triton, _output_fake)


# :func:`reference.deform_conv2d` on the Triton kernels.
deform_conv2d_triton = _compiled(lambda *args: _get_op()(*args))


_triton_ready, _get_op = lazy_triton_op(_triton_op, "deform_conv2d_triton")
_backend.register(OP, "triton", _triton_ready)(deform_conv2d_triton)
