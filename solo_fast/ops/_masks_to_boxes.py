"""``masks_to_boxes`` (DESIGN.md §2): tight xyxy boxes ``(min col, min row, max col + 1,
max row + 1)`` of bool / uint8 masks [N, H, W], float32 [N, 4], zeros for an empty mask
(:func:`reference.masks_to_boxes`).

"cpu": ``torch.ops.solo_fast.masks_to_boxes`` (csrc/cpu/masks_to_boxes_kernel.cpp), one
pass over each mask that scans only the rows holding a pixel. The result is exact, so
the reference's boxes come out bit for bit. At 800x1333 it replaces two ``any()``
reductions over every mask, one of them strided.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend, _checks, _ext
from . import reference
from ._dispatch import always, resolve


def masks_to_boxes(masks: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Boxes of ``masks`` [N, H, W] (bool, uint8: nonzero is inside), float32 [N, 4] xyxy."""
    _checks.tensor("masks", masks, ndim=3, dtypes=_checks.MASK_DTYPES)
    _, fn = resolve("masks_to_boxes", backend, masks.device.type)
    return fn(masks)


_backend.register("masks_to_boxes", "reference", always)(reference.masks_to_boxes)


def _cpu_available(device_type: str) -> bool:
    return device_type == "cpu" and _ext.available() and hasattr(torch.ops.solo_fast, "masks_to_boxes")


@_backend.register("masks_to_boxes", "cpu", _cpu_available)
def masks_to_boxes_cpu(masks: torch.Tensor) -> torch.Tensor:
    return torch.ops.solo_fast.masks_to_boxes(masks)


if _ext.available() and hasattr(torch.ops.solo_fast, "masks_to_boxes"):
    @torch.library.register_fake("solo_fast::masks_to_boxes")
    def _fake(masks):
        return masks.new_empty((masks.shape[0], 4), dtype=torch.float32)
