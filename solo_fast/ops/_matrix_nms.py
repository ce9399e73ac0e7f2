"""``matrix_nms`` (DESIGN.md §2): the public op, and the backends of its kernel boundary.

Matrix NMS is one function on every backend -- sort by score, ``nms_pre``, the decay
factors, ``filter_thr``, sort again, ``max_num``, in PyTorch. Only the decay of the masks
already sorted by score is dispatched per backend, as the op ``matrix_decay`` (masks,
labels, areas or None, kernel, sigma -> float32 [N]; :func:`reference.matrix_decay`):

- "reference": :func:`reference.matrix_decay`, dense fp32 intersections.
- "cpu": ``torch.ops.solo_fast.matrix_nms_decay_popcount`` (csrc/cpu/matrix_nms_kernel.cpp),
  bit-packed masks and popcounts, and ``matrix_nms_mask_area`` for the default areas.
- "triton": ``torch.ops.solo_fast.matrix_nms_decay``, a ``torch.library.triton_op`` over
  kernels/matrix_nms.py: int8 tensor-core intersections. It runs on CUDA tensors, and on
  CPU tensors under ``TRITON_INTERPRET=1`` (DESIGN.md §5).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

from ._triton_support import lazy_triton_op, opaque_under_interpreter
from .. import _backend, _checks, _ext
from . import reference
from ._dispatch import always, autocast_off, resolve


# --------------------------------------------------------------------------------------
# The public op
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


def _check_args(masks, labels, scores, mask_area, kernel, sigma, filter_thr, nms_pre, max_num) -> None:
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
    _check_args(masks, labels, scores, mask_area, kernel, sigma, filter_thr, nms_pre, max_num)
    _, matrix_decay = resolve("matrix_decay", backend, masks.device.type)
    sigma, filter_thr = float(sigma), float(filter_thr)
    with autocast_off(masks.device.type):
        # mmdetection's ``mask_matrix_nms`` semantics.
        empty = (
            scores.new_zeros(0),
            labels.new_zeros(0),
            masks.new_zeros((0,) + tuple(masks.shape[1:])),
            torch.zeros(0, dtype=torch.long, device=scores.device),
        )
        if masks.shape[0] == 0:
            return empty
        # Stable sort: ties keep the lower input index first.
        order = torch.sort(scores, descending=True, stable=True).indices
        if nms_pre > 0:
            order = order[:nms_pre]
        sorted_scores = scores[order]
        sorted_labels = labels[order]
        sorted_masks = masks[order]
        areas = None if mask_area is None else mask_area[order]
        decay = matrix_decay(sorted_masks, sorted_labels, areas, kernel, sigma)
        new_scores = sorted_scores * decay.to(sorted_scores.dtype)
        if filter_thr > 0:
            keep = new_scores >= filter_thr
            if not bool(keep.any()):
                return empty
            order, new_scores = order[keep], new_scores[keep]
            sorted_labels, sorted_masks = sorted_labels[keep], sorted_masks[keep]
        resort = torch.sort(new_scores, descending=True, stable=True).indices
        if max_num > 0:
            resort = resort[:max_num]
        return new_scores[resort], sorted_labels[resort], sorted_masks[resort], order[resort]


# --------------------------------------------------------------------------------------
# "reference": the oracle
# --------------------------------------------------------------------------------------
_backend.register("matrix_decay", "reference", always)(reference.matrix_decay)


# --------------------------------------------------------------------------------------
# "cpu": the compiled C++ op
# --------------------------------------------------------------------------------------
_CPP_OP = "solo_fast::matrix_nms_decay_popcount"


def _cpp_loaded() -> bool:
    return _ext.available() and hasattr(torch.ops.solo_fast, "matrix_nms_decay_popcount")


def cpu_available(device_type: str) -> bool:
    return device_type == "cpu" and _cpp_loaded()


def decay_cpu(
    masks: torch.Tensor, labels: torch.Tensor, areas: Optional[torch.Tensor], kernel: str, sigma: float
) -> torch.Tensor:
    """:func:`reference.matrix_decay` on the C++ op.

    Without ``areas`` they are counted by the C++ op too (nonzero pixels, which is the
    reference's sum for 0/1 masks): torch's ``sum`` over a bool [500, 200 * 336] tensor
    alone took 120-220 ms on the reference CPU (benchmarks/RESULTS.md), ten times the whole C++ decay.
    """
    if areas is None:
        areas = torch.ops.solo_fast.matrix_nms_mask_area(masks)
    return torch.ops.solo_fast.matrix_nms_decay_popcount(masks, labels, areas, kernel, float(sigma))


if _cpp_loaded():

    @torch.library.register_fake(_CPP_OP)
    def _decay_popcount_fake(masks, labels, areas, kernel, sigma):
        return masks.new_empty((masks.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("solo_fast::matrix_nms_mask_area")
    def _mask_area_fake(masks):
        return masks.new_empty((masks.shape[0],), dtype=torch.int64)


_backend.register("matrix_decay", "cpu", cpu_available)(decay_cpu)


# --------------------------------------------------------------------------------------
# "triton": the triton_op
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _triton_op():
    """Defines ``solo_fast::matrix_nms_decay`` on first use, so importing solo_fast never imports triton."""
    from torch.library import triton_op

    from solo_fast.kernels import matrix_nms as kernels

    @triton_op("solo_fast::matrix_nms_decay", mutates_args=())
    def matrix_nms_decay(
        masks: torch.Tensor, labels: torch.Tensor, areas: torch.Tensor, kernel: str, sigma: float
    ) -> torch.Tensor:
        return kernels.launch_decay(masks, labels, areas, kernel, sigma)

    def fake(masks, labels, areas, kernel, sigma):
        return masks.new_empty((masks.shape[0],), dtype=torch.float32)

    return opaque_under_interpreter(matrix_nms_decay, fake)


def decay_triton(
    masks: torch.Tensor, labels: torch.Tensor, areas: Optional[torch.Tensor], kernel: str, sigma: float
) -> torch.Tensor:
    """:func:`reference.matrix_decay` on the Triton kernels."""
    if areas is None:
        areas = masks.flatten(1).sum(1)
    return _get_op()(masks, labels, areas, kernel, float(sigma))


_triton_ready, _get_op = lazy_triton_op(_triton_op, "matrix_nms_decay")
_backend.register("matrix_decay", "triton", _triton_ready)(decay_triton)
