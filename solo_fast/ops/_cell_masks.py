"""Fast path of ``cell_masks`` (DESIGN.md §2, SOLO's sparse inference and training).

Only the rows ``cells`` of the 1x1 mask conv are evaluated -- one GEMM of the gathered
weights -- instead of all S^2 maps the reference computes and then gathers (105 GFLOP and
412 MB of output for SOLO R50 at 800x1344). At the feature map's own size, with
statistics wanted, it is ``mask_predict`` (the fused GEMM + sigmoid + reductions). The
same function runs on every device: its arithmetic is a plain matmul either way.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _backend
from .reference import mask_stats


def cell_masks_sparse(
    feat: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    cells: torch.Tensor,
    *,
    size: Optional[Sequence[int]] = None,
    mask_thr: Optional[float] = None,
):
    from . import mask_predict

    c, h, w = feat.shape
    rows = weight.reshape(weight.shape[0], -1)[cells]  # [K, C]
    at_size = size is None or tuple(size) == (h, w)
    if mask_thr is not None and at_size:
        return mask_predict(feat, rows, bias[cells], mask_thr=mask_thr, out_dtype=torch.float32)
    soft = ((rows @ feat.reshape(c, h * w)).reshape(-1, h, w) + bias[cells, None, None]).sigmoid()
    if not at_size and soft.shape[0]:  # (interpolate refuses zero channels)
        soft = F.interpolate(soft[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    elif not at_size:
        soft = soft.new_zeros((0, *size))
    return soft if mask_thr is None else mask_stats(soft, mask_thr)


for _device in ("cpu", "cuda"):
    _backend.register("cell_masks", _device, lambda device_type, d=_device: device_type == d)(cell_masks_sparse)
