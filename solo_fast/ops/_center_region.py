"""``center_region_assign`` on the compiled op ``torch.ops.solo_fast.center_region_assign``.

The C++ op is batched (lists of per-image tensors, see csrc/solo_fast.cpp) so the CUDA
kernel can treat a whole batch in a few launches; the single-image entry point is the
batch of one. Inputs arrive validated by :mod:`solo_fast.ops`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import _backend, _ext
from .reference import Targets

_OP = "solo_fast::center_region_assign"


def _op_loaded() -> bool:
    return _ext.available() and hasattr(torch.ops.solo_fast, "center_region_assign")


def _cpu_available(device_type: str) -> bool:
    return device_type == "cpu" and _op_loaded()


def _cuda_available(device_type: str) -> bool:
    return (
        device_type == "cuda"
        and _op_loaded()
        and torch._C._dispatch_has_kernel_for_dispatch_key(_OP, "CUDA")
    )


def center_region_assign_batch(
    gt_masks: Sequence[torch.Tensor],
    gt_labels: Sequence[torch.Tensor],
    gt_boxes: Sequence[Optional[torch.Tensor]],
    *,
    pad_shape: Tuple[int, int],
    num_grids: Sequence[int],
    scale_ranges: Sequence[Tuple[float, float]],
    pos_scale: float,
    num_classes: int,
    mask_stride: Union[int, Sequence[int]],
) -> List[Targets]:
    num_levels = len(num_grids)
    strides = [int(mask_stride)] * num_levels if isinstance(mask_stride, int) else [int(s) for s in mask_stride]
    # One downsampled tensor per distinct stride, shared by the levels that use it.
    distinct = list(dict.fromkeys(strides))
    which = [distinct.index(s) for s in strides]
    # The reference takes box widths and heights in float64, after converting the boxes.
    boxes = [None if b is None else b.to(torch.float64) for b in gt_boxes]
    labels, cells, inst, targets = torch.ops.solo_fast.center_region_assign(
        list(gt_masks),
        [lab.to(torch.int64) for lab in gt_labels],
        boxes,
        [int(s) for s in num_grids],
        [float(r[0]) for r in scale_ranges],
        [float(r[1]) for r in scale_ranges],
        float(pos_scale),
        int(num_classes),
        distinct,
    )
    n_d = len(distinct)
    out = []
    for b in range(len(gt_masks)):
        lv = slice(b * num_levels, (b + 1) * num_levels)
        out.append(
            Targets(
                list(labels[lv]),
                list(cells[lv]),
                list(inst[lv]),
                [targets[b * n_d + k] for k in which],
            )
        )
    return out


def center_region_assign(
    gt_masks: torch.Tensor, gt_labels: torch.Tensor, gt_boxes: Optional[torch.Tensor] = None, **config
) -> Targets:
    return center_region_assign_batch([gt_masks], [gt_labels], [gt_boxes], **config)[0]


# solo_fast.ops.center_region_assign_batch hands a whole batch to this when it is set.
center_region_assign.batched = center_region_assign_batch

_backend.register("center_region_assign", "cpu", _cpu_available)(center_region_assign)
_backend.register("center_region_assign", "cuda", _cuda_available)(center_region_assign)


if _op_loaded():

    @torch.library.register_fake(_OP)
    def _center_region_assign_fake(
        gt_masks, gt_labels, gt_boxes, num_grids, scale_lo, scale_hi, pos_scale, num_classes, mask_strides
    ):
        ctx = torch.library.get_ctx()
        labels, cells, inst, targets = [], [], [], []
        for masks in gt_masks:
            h, w = masks.shape[1], masks.shape[2]
            for s in num_grids:
                labels.append(masks.new_empty((s, s), dtype=torch.int64))
                npos = ctx.new_dynamic_size(max=s * s)
                cells.append(masks.new_empty((npos,), dtype=torch.int64))
                inst.append(masks.new_empty((npos,), dtype=torch.int64))
            for s in mask_strides:
                targets.append(masks.new_empty((masks.shape[0], h // s, w // s), dtype=torch.uint8))
        return labels, cells, inst, targets
