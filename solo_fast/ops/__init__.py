"""Public ops of DESIGN.md §2.

Each op checks its inputs once, here, then dispatches to a backend:
``backend=None`` follows :func:`solo_fast.use_backend` / ``SOLO_FAST_BACKEND`` (default
``"auto"``); ``"auto"`` picks the fastest implementation registered for the tensors'
device and falls back to ``"reference"``. Fast implementations register themselves with
:func:`solo_fast._backend.register` from the modules imported at the bottom of this file.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import _backend
from . import _checks, reference
from .reference import Targets

__all__ = [
    "Targets",
    "matrix_nms",
    "center_region_assign",
    "center_region_assign_batch",
    "coord_conv2d",
    "mask_predict",
    "cell_masks",
    "cell_masks_are_dense",
    "available_backends",
]

_always = lambda device_type: True  # noqa: E731
for _name in ("matrix_nms", "center_region_assign", "coord_conv2d", "mask_predict", "cell_masks"):
    _backend.register(_name, "reference", _always)(getattr(reference, _name))


@torch.compiler.assume_constant_result
def _backend_at_trace_time(op: str, backend: Optional[str], device_type: str) -> str:
    return _backend.resolve(op, backend, device_type)[0]


def _resolve(op: str, backend: Optional[str], device_type: str):
    """:func:`solo_fast._backend.resolve`, readable by torch.compile.

    The active backend lives in a ContextVar, which TorchDynamo cannot trace (a graph
    break before every op); while compiling it is read once, when the graph is traced,
    and baked into the graph. A compiled model therefore keeps the backend it was traced
    with: call ``torch._dynamo.reset()`` after switching backends.
    """
    if torch.compiler.is_compiling():
        name = _backend_at_trace_time(op, backend, device_type)
        return name, _backend._REGISTRY[op][name][0]
    return _backend.resolve(op, backend, device_type)


def _autocast_off(device_type: str):
    """Ops whose contract is fp32 arithmetic (Matrix NMS intersections, mask logits, target
    downsampling) run with autocast off: under autocast a matmul would be silently
    rounded to bf16/fp16, e.g. intersections of more than 256 pixels in bf16."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def available_backends(op: str, device: Union[str, torch.device] = "cpu") -> Tuple[str, ...]:
    """Concrete backends of ``op`` usable for tensors on ``device`` on this machine."""
    return _backend.available_backends(op, torch.device(device).type)


# --------------------------------------------------------------------------------------
def _check_nms_values(masks, scores, mask_area) -> None:
    """Non-finite scores, negative or non-finite areas, uint8 masks other than 0/1: one
    device-to-host read for all of them; the culprit is named only when one is wrong."""
    if masks.shape[0] == 0:
        return
    flags = [~torch.isfinite(scores).all()]
    if mask_area is not None:
        flags.append((mask_area < 0).any() | ~torch.isfinite(mask_area).all())
    if masks.dtype == torch.uint8 and masks.numel():
        flags.append(masks.max() > 1)
    bad = torch.stack(flags).tolist()
    if bad[0]:
        raise ValueError("scores: expected finite values, got NaN or Inf")
    if mask_area is not None and bad[1]:
        raise ValueError("mask_area: expected finite, non-negative pixel counts")
    if bad[-1] and masks.dtype == torch.uint8 and masks.numel():
        raise ValueError(f"masks: expected 0/1 values, got a maximum of {int(masks.max())}")


def matrix_nms(
    masks: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    *,
    mask_area: Optional[torch.Tensor] = None,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    filter_thr: float = -1.0,
    nms_pre: int = -1,
    max_num: int = -1,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Matrix NMS over ``masks`` [N, H, W] (bool/uint8); returns (scores, labels, masks, keep_inds).

    See DESIGN.md §2 for the exact function. ``keep_inds`` index the inputs. ``scores``
    may be any float dtype (the returned scores keep it) and must be finite; uint8 masks
    must be 0/1 and ``mask_area`` finite and non-negative (else ValueError). Intersections
    are exact whatever the dtypes, and autocast is switched off inside.
    """
    _checks.tensor("masks", masks, ndim=3, dtypes=_checks.MASK_DTYPES)
    _checks.tensor("labels", labels, ndim=1)
    _checks.tensor("scores", scores, ndim=1, dtypes=_checks.FLOAT_DTYPES)
    n = masks.shape[0]
    _checks.length("labels", labels, n, "mask")
    _checks.length("scores", scores, n, "mask")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels: expected an integer dtype, got {labels.dtype}")
    if mask_area is not None:
        _checks.tensor("mask_area", mask_area, ndim=1)
        _checks.length("mask_area", mask_area, n, "mask")
        if mask_area.dtype == torch.bool or mask_area.is_complex():
            raise ValueError(f"mask_area: expected an integer or floating dtype, got {mask_area.dtype}")
    if isinstance(filter_thr, bool) or not isinstance(filter_thr, (int, float)) or math.isnan(filter_thr):
        raise ValueError(f"filter_thr: expected a number (<= 0 disables it), got {filter_thr!r}")
    _check_nms_values(masks, scores, mask_area)
    if kernel not in ("gaussian", "linear"):
        raise ValueError(f"kernel: expected 'gaussian' or 'linear', got {kernel!r}")
    if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma: expected a positive finite number, got {sigma!r}")
    for name, v in (("nms_pre", nms_pre), ("max_num", max_num)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}: expected an int (<= 0 disables it), got {v!r}")
    _checks.same_device(masks=masks, labels=labels, scores=scores, mask_area=mask_area)
    _, fn = _resolve("matrix_nms", backend, masks.device.type)
    with _autocast_off(masks.device.type):
        return fn(
            masks, labels, scores, mask_area=mask_area, kernel=kernel, sigma=float(sigma),
            filter_thr=float(filter_thr), nms_pre=nms_pre, max_num=max_num,
        )


# --------------------------------------------------------------------------------------
def _check_assign_config(pad_shape, num_grids, scale_ranges, pos_scale, num_classes, mask_stride):
    if (
        not isinstance(pad_shape, (tuple, list))
        or len(pad_shape) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pad_shape)
    ):
        raise ValueError(f"pad_shape: expected (height, width) of positive ints, got {pad_shape!r}")
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
    _, fn = _resolve("center_region_assign", backend, gt_masks.device.type)
    with _autocast_off(gt_masks.device.type):
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
    _, fn = _resolve("center_region_assign", backend, gt_masks[0].device.type)
    config = dict(
        pad_shape=pad_shape, num_grids=list(num_grids), scale_ranges=[tuple(r) for r in scale_ranges],
        pos_scale=float(pos_scale), num_classes=num_classes, mask_stride=mask_stride,
    )
    labels64 = [labels.long() for labels in gt_labels]
    batched = getattr(fn, "batched", None)
    with _autocast_off(gt_masks[0].device.type):
        if batched is not None:
            return batched(list(gt_masks), labels64, boxes, **config)
        return [fn(*image, **config) for image in zip(gt_masks, labels64, boxes)]


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
    if coord_src_size is not None and (
        not isinstance(coord_src_size, (tuple, list)) or len(coord_src_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in coord_src_size)
    ):
        raise ValueError(f"coord_src_size: expected (height, width) of positive ints, got {coord_src_size!r}")
    for dim, k in ((2, weight.shape[2]), (3, weight.shape[3])):
        if x.shape[dim] < 1 or x.shape[dim] + 2 * padding < k:
            raise ValueError(f"x: spatial size {tuple(x.shape[2:])} with padding {padding} is smaller than "
                             f"the {tuple(weight.shape[2:])} kernel")
    _checks.same_device(x=x, weight=weight, bias=bias)
    _, fn = _resolve("coord_conv2d", backend, x.device.type)
    return fn(x, weight, bias, padding=padding, coords=coords,
              coord_src_size=None if coord_src_size is None else tuple(coord_src_size))


# --------------------------------------------------------------------------------------
def mask_predict(
    features: torch.Tensor,
    kernels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    mask_thr: float = 0.5,
    out_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``soft = sigmoid(kernels @ features + bias)``; returns (soft, binary, area, maskness).

    Inputs of any float dtype (fp16/bf16 included, mixed too); the logits are fp32 (autocast
    is switched off inside) and ``binary`` (bool), ``area`` (int64) and ``maskness`` (fp32)
    come from them; ``soft`` is returned in ``out_dtype`` (default fp16 on the GPU, fp32
    on the CPU). NaN logits give NaN soft values, which are outside the binary mask and
    count in neither ``area`` nor ``maskness``.
    """
    _checks.tensor("features", features, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("kernels", kernels, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    if kernels.shape[1] != features.shape[0]:
        raise ValueError(
            f"kernels: expected {features.shape[0]} columns (the channels of features), got {kernels.shape[1]}"
        )
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        _checks.length("bias", bias, kernels.shape[0], "kernel")
    if isinstance(mask_thr, bool) or not isinstance(mask_thr, (int, float)) or not 0 <= mask_thr <= 1:
        raise ValueError(f"mask_thr: expected a number in [0, 1], got {mask_thr!r}")
    if out_dtype is not None and out_dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"out_dtype: expected a floating dtype, got {out_dtype!r}")
    _checks.same_device(features=features, kernels=kernels, bias=bias)
    _, fn = _resolve("mask_predict", backend, features.device.type)
    with _autocast_off(features.device.type):
        return fn(features, kernels, bias, mask_thr=float(mask_thr), out_dtype=out_dtype)


# --------------------------------------------------------------------------------------
def cell_masks(
    feat: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    cells: torch.Tensor,
    *,
    size: Optional[Sequence[int]] = None,
    mask_thr: Optional[float] = None,
    backend: Optional[str] = None,
):
    """SOLO's masks of the cells ``cells``: ``sigmoid(conv1x1(feat))[cells]``, bilinearly
    resized to ``size`` (h, w) when given; with ``mask_thr``, ``(soft, binary, area,
    maskness)`` of the resized masks (``mask_predict``'s statistics), else the soft masks.

    ``feat`` [C, h, w], ``weight`` [N, C, 1, 1] or [N, C], ``bias`` [N], ``cells`` integer
    [K] in [0, N). The reference computes all N maps and gathers (as published); the fast
    paths evaluate only the K rows. Differentiable (training's positive cells).
    """
    _checks.tensor("feat", feat, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, dtypes=_checks.FLOAT_DTYPES)
    if weight.dim() not in (2, 4) or (weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1)) \
            or weight.shape[1] != feat.shape[0]:
        raise ValueError(f"weight: expected [N, {feat.shape[0]}, 1, 1] or [N, {feat.shape[0]}] (a 1x1 conv over "
                         f"feat's channels), got shape {tuple(weight.shape)}")
    _checks.tensor("bias", bias, ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.length("bias", bias, weight.shape[0], "output channel of weight")
    _checks.tensor("cells", cells, ndim=1)
    if cells.is_floating_point() or cells.is_complex() or cells.dtype == torch.bool:
        raise ValueError(f"cells: expected an integer dtype, got {_checks.dtype_name(cells.dtype)}")
    if cells.numel() and not torch.compiler.is_compiling():  # a host read: not while tracing (export)
        lo, hi = torch.stack([cells.min(), cells.max()]).tolist()
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"cells: expected indices in [0, {weight.shape[0]}), got [{lo}, {hi}]")
    if size is not None and (not isinstance(size, (tuple, list)) or len(size) != 2
                             or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"size: expected (height, width) of positive ints, got {size!r}")
    if mask_thr is not None and (isinstance(mask_thr, bool) or not isinstance(mask_thr, (int, float))
                                 or not 0 <= mask_thr <= 1):
        raise ValueError(f"mask_thr: expected a number in [0, 1], got {mask_thr!r}")
    _checks.same_device(feat=feat, weight=weight, bias=bias, cells=cells)
    _, fn = _resolve("cell_masks", backend, feat.device.type)
    return fn(feat, weight, bias, cells, size=None if size is None else tuple(size),
              mask_thr=None if mask_thr is None else float(mask_thr))


def cell_masks_are_dense(device: Union[str, torch.device] = "cpu", backend: Optional[str] = None) -> bool:
    """Whether :func:`cell_masks` computes every cell's map whichever cells it is given (the
    reference): a caller that would ask chunk by chunk then asks once, rather than
    computing the same dense maps for every chunk."""
    return _resolve("cell_masks", backend, torch.device(device).type)[0] == "reference"


# Fast implementations register themselves on import; each module guards its own
# optional dependency (the compiled extension, triton) and stays silent when absent.
from . import _fast  # noqa: E402,F401
