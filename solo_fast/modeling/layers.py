"""Small building blocks shared by the neck and the heads."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops


class ConvModule(nn.Module):
    """conv -> GroupNorm(32) -> ReLU; parameter names as mmdetection's ConvModule (conv, gn).

    ``coords`` ("xy", "x" or "y") makes it a CoordConv layer: the weight has that many extra
    input channels and the coordinate maps are supplied by :func:`solo_fast.ops.coord_conv2d`
    (with ``coord_src_size`` when the features were resized from another map).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, norm: bool = True,
                 act: bool = True, coords: str | None = None):
        super().__init__()
        self.coords = coords
        extra = len(coords) if coords else 0
        self.conv = nn.Conv2d(in_channels + extra, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.gn = nn.GroupNorm(32, out_channels) if norm else None
        self.act = nn.ReLU(inplace=True) if act else None
        nn.init.normal_(self.conv.weight, std=0.01)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, coord_src_size=None) -> torch.Tensor:
        if self.coords:
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
