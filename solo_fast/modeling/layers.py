"""Small building blocks shared by the backbone, the neck and the heads."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops.reference import with_coords

# Deformable convolution types, by mmcv's registry names (``conv_cfg=dict(type=...)``):
# "DCNv2" = ModulatedDeformConv2dPack (offsets and a sigmoid mask per tap), "DCN" =
# DeformConv2dPack (offsets only; DCNv1, mmdetection 1.x's default "DCN" in the original
# SOLO repository's light models).
DCN_TYPES = ("DCNv2", "DCN")


class DeformConv2d(nn.Module):
    """A deformable conv that predicts its own offsets, as mmcv's ``ModulatedDeformConv2dPack``
    (``modulated=True``, "DCNv2") or ``DeformConv2dPack`` (``modulated=False``, "DCN").

    Parameter names are mmcv's, so checkpoints load unchanged: ``weight`` [O, C/groups, k, k],
    ``bias`` [O] (or none), and ``conv_offset``, a plain conv with the same kernel, stride,
    padding and dilation to ``offset_groups * 3 * k * k`` channels (``2 * k * k`` unmodulated).
    Forward (mmcv's): ``o1, o2, m = chunk(conv_offset(x), 3)``, ``offset = cat(o1, o2)``,
    ``mask = sigmoid(m)``, then :func:`solo_fast.ops.deform_conv2d`; unmodulated, the whole
    ``conv_offset`` output is the offset and the mask is all ones.

    Initialisation is mmcv's ``init_weights``: ``weight`` uniform in ``±1/sqrt(C·k·k)``,
    ``bias`` 0, ``conv_offset`` all zeros (a DCN starts as the plain conv).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, offset_groups: int = 1, bias: bool = True,
                 modulated: bool = True):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: expected a divisor of in_channels {in_channels} and out_channels "
                             f"{out_channels}, got {groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.groups, self.offset_groups, self.modulated = groups, offset_groups, modulated
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.conv_offset = nn.Conv2d(in_channels, offset_groups * (3 if modulated else 2) * kernel_size**2,
                                     kernel_size, stride, padding, dilation, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size**2)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.reset_offset()

    def reset_offset(self) -> None:
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_offset(x)
        if self.modulated:
            # mmcv's chunk(3) -> cat(o1, o2), sigmoid(m) is the first two thirds and the last
            # third of the channels: views, not a copy.
            k2 = out.shape[1] // 3 * 2
            offset, mask = out[:, :k2], torch.sigmoid(out[:, k2:])
        else:
            offset, mask = out, None
        return ops.deform_conv2d(x, offset, mask, self.weight, self.bias, stride=self.stride, padding=self.padding,
                                 dilation=self.dilation, groups=self.groups, offset_groups=self.offset_groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, offset_groups={self.offset_groups}, "
                f"bias={self.bias is not None}, modulated={self.modulated}")


class ConvModule(nn.Module):
    """conv -> GroupNorm(32) -> ReLU; parameter names as mmdetection's ConvModule (conv, gn).

    ``coords`` ("xy", "x" or "y") makes it a CoordConv layer: the weight has that many extra
    input channels and the coordinate maps are supplied by :func:`solo_fast.ops.coord_conv2d`
    (with ``coord_src_size`` when the features were resized from another map).

    ``dcn`` ("DCNv2" or "DCN", mmdetection's ``conv_cfg=dict(type=...)``) makes the conv a
    :class:`DeformConv2d` (``conv.weight``, ``conv.conv_offset.*``; no bias before the norm,
    as mmcv's ``bias="auto"``). With ``coords`` too, the coordinate maps are concatenated to
    the input of both the offset conv and the deformable conv, as mmdetection concatenates
    them before the layer (SOLOv2's first kernel conv and coarsest mask-feature conv).
    Initialised as mmdetection's heads (``Normal(std=0.01)`` on every ``nn.Conv2d``): a plain
    conv's weight, or a DCN's ``conv_offset`` weight (bias 0), its own weight keeping mmcv's
    initialisation.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, norm: bool = True,
                 act: bool = True, coords: str | None = None, dcn: Optional[str] = None):
        super().__init__()
        if dcn is not None and dcn not in DCN_TYPES:
            raise ValueError(f"dcn: expected None or one of {DCN_TYPES}, got {dcn!r}")
        self.coords = coords
        extra = len(coords) if coords else 0
        if dcn is None:
            self.conv = nn.Conv2d(in_channels + extra, out_channels, kernel_size, padding=kernel_size // 2,
                                  bias=not norm)
            init = self.conv
        else:
            self.conv = DeformConv2d(in_channels + extra, out_channels, kernel_size, padding=kernel_size // 2,
                                     bias=not norm, modulated=dcn == "DCNv2")
            init = self.conv.conv_offset
        self.gn = nn.GroupNorm(32, out_channels) if norm else None
        self.act = nn.ReLU(inplace=True) if act else None
        nn.init.normal_(init.weight, std=0.01)
        if init.bias is not None:
            nn.init.zeros_(init.bias)

    def forward(self, x: torch.Tensor, coord_src_size=None) -> torch.Tensor:
        if isinstance(self.conv, DeformConv2d):
            x = self.conv(with_coords(x, self.coords, coord_src_size) if self.coords else x)
        elif self.coords:
            x = ops.coord_conv2d(x, self.conv.weight, self.conv.bias, padding=self.conv.padding[0],
                                 coords=self.coords, coord_src_size=coord_src_size)
        else:
            x = self.conv(x)
        if self.gn is not None:
            x = self.gn(x)
        if self.act is not None:
            x = self.act(x)
        return x


def focal_prior_bias(prior: float = 0.01) -> float:
    """Bias so that every class starts at probability ``prior`` (RetinaNet / SOLO init)."""
    return -math.log((1 - prior) / prior)
