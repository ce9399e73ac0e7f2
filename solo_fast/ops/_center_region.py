"""``center_region_assign`` and ``center_region_assign_batch`` (DESIGN.md §2): the public
ops and their backends.

Both are dispatched ops: "reference" is :func:`reference.center_region_assign` (the batch
image by image); "cpu" and "cuda" are the compiled op
``torch.ops.solo_fast.center_region_assign``, which is batched (lists of per-image
tensors, see csrc/solo_fast.cpp) so the CUDA kernel can treat a whole batch in a few
launches; its single-image entry point is the batch of one.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import _backend, _checks, _ext
from . import reference
from ._dispatch import always, autocast_off, resolve
from .reference import Targets


# --------------------------------------------------------------------------------------
# The public ops
# --------------------------------------------------------------------------------------
def _check_assign_config(pad_shape, num_grids, scale_ranges, pos_scale, num_classes, mask_stride):
    _checks.size_hw("pad_shape", pad_shape)
    if not isinstance(num_grids, (tuple, list)) or len(num_grids) == 0:
        raise ValueError(f"num_grids: expected a non-empty list of grid sizes, got {num_grids!r}")
    for s in num_grids:
        _checks.positive_int("num_grids", s)
    if not isinstance(scale_ranges, (tuple, list)) or len(scale_ranges) != len(num_grids):
        raise ValueError(
            f"scale_ranges: expected {len(num_grids)} (lo, hi) pairs (one per entry of num_grids), got {scale_ranges!r}"
        )
    for r in scale_ranges:
        if not isinstance(r, (tuple, list)) or len(r) != 2 or not r[0] <= r[1]:
            raise ValueError(f"scale_ranges: expected (lo, hi) pairs with lo <= hi, got {r!r}")
    if not isinstance(pos_scale, (int, float)) or not 0 <= pos_scale <= 1 or isinstance(pos_scale, bool):
        raise ValueError(f"pos_scale: expected a number in [0, 1], got {pos_scale!r}")
    _checks.positive_int("num_classes", num_classes)
    strides = [mask_stride] * len(num_grids) if isinstance(mask_stride, int) else mask_stride
    if not isinstance(strides, (tuple, list)) or len(strides) != len(num_grids):
        raise ValueError(
            f"mask_stride: expected an int or {len(num_grids)} ints (one per entry of num_grids), got {mask_stride!r}"
        )
    for s in strides:
        _checks.positive_int("mask_stride", s)
        if pad_shape[0] % s or pad_shape[1] % s:
            raise ValueError(f"mask_stride: {s} does not divide pad_shape {tuple(pad_shape)}")


def _check_assign_image(gt_masks, gt_labels, gt_boxes, pad_shape, num_classes, where=""):
    """Shapes, dtypes and devices only: nothing here reads tensor values (no host sync)."""
    _checks.tensor(f"gt_masks{where}", gt_masks, ndim=3, dtypes=_checks.MASK_DTYPES)
    if tuple(gt_masks.shape[1:]) != tuple(pad_shape):
        raise ValueError(f"gt_masks{where}: expected masks of pad_shape {tuple(pad_shape)}, got {tuple(gt_masks.shape[1:])}")
    _checks.tensor(f"gt_labels{where}", gt_labels, ndim=1, dtypes=(torch.int64, torch.int32))
    _checks.length(f"gt_labels{where}", gt_labels, gt_masks.shape[0], "mask")
    if gt_boxes is not None:
        _checks.tensor(f"gt_boxes{where}", gt_boxes, ndim=2, dtypes=_checks.FLOAT_DTYPES)
        if gt_boxes.shape[1] != 4:
            raise ValueError(f"gt_boxes{where}: expected shape [M, 4] (xyxy), got {tuple(gt_boxes.shape)}")
        _checks.length(f"gt_boxes{where}", gt_boxes, gt_masks.shape[0], "mask")
    _checks.same_device(gt_masks=gt_masks, gt_labels=gt_labels, gt_boxes=gt_boxes)


def _check_assign_values(gt_labels, gt_boxes, num_classes, wheres) -> None:
    """Label ranges and box values of a whole batch with a single device-to-host read;
    only when something is wrong are the images looked at one by one to name the culprit."""
    flags = []
    for labels, boxes in zip(gt_labels, gt_boxes):
        flags.append(((labels < 0) | (labels >= num_classes)).any())
        if boxes is not None:
            flags.append(~torch.isfinite(boxes).all())
            flags.append((boxes[:, 2] < boxes[:, 0]).any() | (boxes[:, 3] < boxes[:, 1]).any())
    if not flags or not any(torch.stack(flags).tolist()):
        return
    for labels, boxes, where in zip(gt_labels, gt_boxes, wheres):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"gt_labels{where}: expected values in [0, {num_classes}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        if boxes is not None:
            _checks.finite(f"gt_boxes{where}", boxes)
            if bool((boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any()):
                raise ValueError(f"gt_boxes{where}: expected x2 >= x1 and y2 >= y1 for every box")


def center_region_assign(
    gt_masks: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_boxes: Optional[torch.Tensor] = None,
    *,
    pad_shape: Tuple[int, int],
    num_grids: Sequence[int],
    scale_ranges: Sequence[Tuple[float, float]],
    pos_scale: float = 0.2,
    num_classes: int,
    mask_stride: Union[int, Sequence[int]],
    backend: Optional[str] = None,
) -> Targets:
    """SOLO's center-region label assignment for one image; returns :class:`Targets`.

    ``gt_boxes`` may be any float dtype (read in float64) and must be finite; autocast is
    switched off inside, so the downsampled mask targets never depend on it.
    """
    pad_shape = tuple(pad_shape) if isinstance(pad_shape, (tuple, list)) else pad_shape
    _check_assign_config(pad_shape, num_grids, scale_ranges, pos_scale, num_classes, mask_stride)
    _check_assign_image(gt_masks, gt_labels, gt_boxes, pad_shape, num_classes)
    _check_assign_values([gt_labels], [gt_boxes], num_classes, [""])
    _, fn = resolve("center_region_assign", backend, gt_masks.device.type)
    with autocast_off(gt_masks.device.type):
        return fn(
            gt_masks, gt_labels.long(), gt_boxes, pad_shape=pad_shape, num_grids=list(num_grids),
            scale_ranges=[tuple(r) for r in scale_ranges], pos_scale=float(pos_scale),
            num_classes=num_classes, mask_stride=mask_stride,
        )


def center_region_assign_batch(
    gt_masks: Sequence[torch.Tensor],
    gt_labels: Sequence[torch.Tensor],
    gt_boxes: Optional[Sequence[Optional[torch.Tensor]]] = None,
    *,
    pad_shape: Tuple[int, int],
    num_grids: Sequence[int],
    scale_ranges: Sequence[Tuple[float, float]],
    pos_scale: float = 0.2,
    num_classes: int,
    mask_stride: Union[int, Sequence[int]],
    backend: Optional[str] = None,
) -> List[Targets]:
    """:func:`center_region_assign` over a list of images (all padded to ``pad_shape``).

    A backend with a batched implementation (the compiled op) gets the whole batch in
    one call; the others run image by image.
    """
    if not isinstance(gt_masks, (list, tuple)) or not isinstance(gt_labels, (list, tuple)):
        raise ValueError("gt_masks, gt_labels: expected lists with one tensor per image")
    if len(gt_masks) != len(gt_labels):
        raise ValueError(f"gt_labels: expected {len(gt_masks)} tensors (one per image), got {len(gt_labels)}")
    if gt_boxes is not None and not isinstance(gt_boxes, (list, tuple)):
        raise ValueError("gt_boxes: expected None or a list with one tensor (or None) per image")
    boxes = [None] * len(gt_masks) if gt_boxes is None else list(gt_boxes)
    if len(boxes) != len(gt_masks):
        raise ValueError(f"gt_boxes: expected {len(gt_masks)} entries (one per image), got {len(boxes)}")
    pad_shape = tuple(pad_shape) if isinstance(pad_shape, (tuple, list)) else pad_shape
    _check_assign_config(pad_shape, num_grids, scale_ranges, pos_scale, num_classes, mask_stride)
    if not gt_masks:
        return []
    for i, (masks, labels, box) in enumerate(zip(gt_masks, gt_labels, boxes)):
        _check_assign_image(masks, labels, box, pad_shape, num_classes, where=f"[{i}]")
    devices = {m.device for m in gt_masks}
    if len(devices) > 1:
        raise ValueError(f"gt_masks: expected all images on one device, got {sorted(map(str, devices))}")
    _check_assign_values(gt_labels, boxes, num_classes, [f"[{i}]" for i in range(len(gt_masks))])
    # One backend choice for both entry points of the assignment (what use_backend and
    # "auto" see is "center_region_assign"), then that backend's batch implementation.
    name, _ = resolve("center_region_assign", backend, gt_masks[0].device.type)
    fn = _backend.implementation("center_region_assign_batch", name)
    with autocast_off(gt_masks[0].device.type):
        return fn(
            list(gt_masks), [labels.long() for labels in gt_labels], boxes, pad_shape=pad_shape,
            num_grids=list(num_grids), scale_ranges=[tuple(r) for r in scale_ranges],
            pos_scale=float(pos_scale), num_classes=num_classes, mask_stride=mask_stride,
        )


# --------------------------------------------------------------------------------------
# "reference": the oracle, image by image
# --------------------------------------------------------------------------------------
def _reference_batch(
    gt_masks: Sequence[torch.Tensor],
    gt_labels: Sequence[torch.Tensor],
    gt_boxes: Sequence[Optional[torch.Tensor]],
    **config,
) -> List[Targets]:
    return [reference.center_region_assign(*image, **config) for image in zip(gt_masks, gt_labels, gt_boxes)]


_backend.register("center_region_assign", "reference", always)(reference.center_region_assign)
_backend.register("center_region_assign_batch", "reference", always)(_reference_batch)


# --------------------------------------------------------------------------------------
# "cpu" and "cuda": the compiled op
# --------------------------------------------------------------------------------------
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


def assign_batch_compiled(
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


def assign_compiled(
    gt_masks: torch.Tensor, gt_labels: torch.Tensor, gt_boxes: Optional[torch.Tensor] = None, **config
) -> Targets:
    return assign_batch_compiled([gt_masks], [gt_labels], [gt_boxes], **config)[0]


for _device, _available in (("cpu", _cpu_available), ("cuda", _cuda_available)):
    _backend.register("center_region_assign", _device, _available)(assign_compiled)
    _backend.register("center_region_assign_batch", _device, _available)(assign_batch_compiled)


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
