"""``winograd_conv3x3`` (DESIGN.md §2): a 3x3 convolution with stride 1, padding 1,
dilation 1 and groups 1, computed by Winograd's F(2x2, 3x3) on the CPU.

It is the same function as ``F.conv2d(x, weight, bias, padding=1)``, which is its
reference. The arithmetic differs: F(2x2, 3x3) takes 16 products per 2x2 outputs and
input channel instead of 36, and sums them in another order.

- fp32: relative errors about those of the direct convolution (~1e-6 of the output's
  magnitude).
- bf16: the transformed input and weights are rounded to bf16 once each, the products
  are summed in fp32, and the output is rounded once. That is about 1.5x the direct bf16
  convolution's error.

The kernel is ``csrc/cpu/winograd_conv_kernel.cpp``. Its GEMMs are torch's brgemm
micro-kernel, which needs AVX-512 for fp32 and AVX512-BF16 for bf16, or for fp32 without
AVX-512 solo_fast's AVX2 + FMA micro-kernel (``ops._brgemm``).
:func:`winograd_usable` says whether this CPU runs it, after a check on a small GEMM.
Where oneDNN would need its own weight packing (AMX), it says no, and the caller keeps
oneDNN's direct convolution. Inference only: the op has no gradient.

Only the CPU fast form of the network (``modeling/fast_network.py``) uses it, through
:class:`WinogradConv2d`: the 3x3 convolutions that :func:`winograd_profitable` picks.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _checks, _ext
from . import _brgemm

WINOGRAD_DTYPES = (torch.float32, torch.bfloat16)
_OP = "solo_fast::winograd_conv3x3"


def winograd_usable(dtype: torch.dtype) -> bool:
    """Whether the CPU fast network uses :func:`winograd_conv3x3` in ``dtype``: the extension
    is built and a GEMM micro-kernel runs its layout here (``_brgemm.usable``), unless
    ``SOLO_FAST_CPU_WINOGRAD=0``. Read when a model's fast copy is built: set it before the
    first ``predict`` (or change a weight) for it to take effect."""
    if os.environ.get("SOLO_FAST_CPU_WINOGRAD", "1") == "0":
        return False
    return _brgemm.usable(dtype)


def winograd_profitable(in_channels: int, out_channels: int, dtype: torch.dtype) -> bool:
    """Whether F(2x2, 3x3) beats oneDNN's direct convolution here, by channels.

    Measured on an AMD EPYC Zen 5, 2 threads, weights cycled so that each call finds them
    out of cache as in a model (benchmarks/RESULTS.md): 1.3-1.75x from 128 channels on,
    fp32 and bf16 alike. At 64 -> 64 channels (ResNet's first stage) it loses, 0.91x fp32
    and 0.74x bf16, because its transforms cost as much per channel and the GEMMs are
    short."""
    return min(in_channels, out_channels) >= 128


def _check_packed(packed: torch.Tensor, channels: int, dtype: torch.dtype) -> None:
    cp = channels + (channels % 2 if dtype == torch.bfloat16 else 0)
    if packed.dim() != 3 or packed.shape[0] != 16 or packed.shape[1] != cp or packed.dtype != dtype:
        raise ValueError(f"packed: expected winograd_pack(weight, {dtype}) of a weight with {channels} input "
                         f"channels ([16, {cp}, O] {dtype}), got {tuple(packed.shape)} {packed.dtype}")


def winograd_pack(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [O, C, 3, 3] transformed and laid out for :func:`winograd_conv3x3` in ``dtype``.

    U = G g G^T is computed in fp64 from the weight as given, then rounded to fp32 (and, for
    bf16, that to bf16). Pack the fp32 weight for bf16 too, not a bf16 copy of it: the
    weight would be rounded to bf16 before the transform as well. Returns
    [16, C', O], where C' is C rounded up to even for bf16. For bf16 the memory holds the
    GEMM's pairs of input channels (VNNI)."""
    _checks.tensor("weight", weight, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    if tuple(weight.shape[2:]) != (3, 3) or weight.shape[1] == 0:
        raise ValueError(f"weight: expected a 3x3 kernel [O, C, 3, 3] with C > 0, got {tuple(weight.shape)}")
    if dtype not in WINOGRAD_DTYPES:
        raise ValueError(f"dtype: expected torch.float32 or torch.bfloat16, got {dtype!r}")
    if not _brgemm.usable(dtype):
        raise ValueError(f"dtype: this CPU or build has no Winograd kernel for {dtype} (winograd_usable is False)")
    if weight.device.type != "cpu":
        raise ValueError(f"weight: expected a CPU tensor, got one on {weight.device}")
    return torch.ops.solo_fast.winograd_pack(weight.detach(), dtype)


def winograd_conv3x3(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for ``packed = winograd_pack(weight, x.dtype)``.

    ``x`` is [N, C, H, W], fp32 or bf16, on the CPU, in any layout (channels-last is read
    in place). ``bias`` is [O] in any float dtype and is added in fp32. Returns [N, O, H, W]
    in channels-last, in x's dtype."""
    _checks.tensor("x", x, ndim=4, dtypes=WINOGRAD_DTYPES)
    if x.device.type != "cpu":
        raise ValueError(f"x: expected a CPU tensor, got one on {x.device}")
    _check_packed(packed, x.shape[1], x.dtype)
    out_channels = packed.shape[2]
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=_checks.FLOAT_DTYPES)
        _checks.length("bias", bias, out_channels, "output channel")
    if torch.is_grad_enabled():
        for name, t in (("x", x), ("bias", bias)):
            if t is not None and t.requires_grad:
                raise ValueError(f"{name}: winograd_conv3x3 is inference only (no gradient), got a tensor that "
                                 "requires grad; call it under torch.no_grad()")
    return torch.ops.solo_fast.winograd_conv3x3(x, packed, bias, out_channels)


def _register_fake() -> None:
    if _ext.available() and hasattr(torch.ops.solo_fast, "winograd_conv3x3"):
        @torch.library.register_fake(_OP)
        def _fake(x, packed, bias, out_channels):
            n, _, h, w = x.shape
            return x.new_empty((n, out_channels, h, w)).contiguous(memory_format=torch.channels_last)


_register_fake()


class WinogradConv2d(nn.Module):
    """A 3x3 / stride 1 / padding 1 ``nn.Conv2d`` of the fast form, computed by
    :func:`winograd_conv3x3` from weights packed once for ``dtype``.

    It keeps the conv's ``weight``, ``bias`` and geometry, which the fast form casts as it
    casts every module. :func:`ops.coord_conv2d` reads them directly, and an input of
    another dtype or device uses them in ``F.conv2d``. The packed weights are a plain
    attribute, not a buffer: ``.to()`` must not cast their layout. They are a snapshot:
    the fast network rebuilds its copy (and these modules) when the model's weights
    change."""

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.dtype = dtype
        with torch.no_grad():
            self.packed = winograd_pack(conv.weight.float(), dtype)
            self.bias_fp32 = None if conv.bias is None else conv.bias.detach().float().clone()

    @staticmethod
    def eligible(module: nn.Module) -> bool:
        return (type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.stride == (1, 1)
                and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1
                and module.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.dtype and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
            return torch.ops.solo_fast.winograd_conv3x3(x, self.packed, self.bias_fp32, self.out_channels)
        return F.conv2d(x, self.weight, self.bias, padding=1)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), padding=(1, 1), winograd={self.dtype}"
