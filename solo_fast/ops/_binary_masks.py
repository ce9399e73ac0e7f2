"""``binary_masks_x4`` (DESIGN.md §2): ``soft`` [N, h, w] resized by 4 with bilinear
interpolation (half-pixel centres, ``align_corners=False``), cropped to ``crop`` = (H', W')
from the top left, and thresholded ``> mask_thr``. Returns bool [N, H', W']. This is the
last step of post-processing at the padded input's size (stride-4 masks of a padded input
whose size is a multiple of 32). The reference is
:func:`reference.binary_masks_x4`: ``F.interpolate`` then ``>``.

"cpu": ``torch.ops.solo_fast.binary_masks_x4`` (csrc/cpu/binary_masks_x4_kernel.cpp). It
uses torch's own arithmetic for a one-channel map with an output of H + W > 128 (along W,
then along H, each ``fma(v0, w0, v1 * w1)``; smaller outputs, which torch resizes with
another kernel, go to the reference), so the masks are the reference's bit for bit. There is no fp32
map at full size; the reference needs 430 MB for 100 masks at 800x1344, or a loop over
small chunks. Its first use in a process compares it with ``F.interpolate`` on a random
map at thresholds that see a one-ulp difference (:func:`probe_thresholds`); where they
differ (another torch kernel or build) it is not used.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch

from .. import _backend, _checks, _ext
from . import reference
from ._dispatch import always, resolve


def _check(soft, crop, mask_thr) -> None:
    _checks.tensor("soft", soft, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    if (not isinstance(crop, (tuple, list)) or len(crop) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in crop)):
        raise ValueError(f"crop: expected (height, width) ints, got {crop!r}")
    h, w = soft.shape[1:]
    if not (0 <= crop[0] <= 4 * h and 0 <= crop[1] <= 4 * w):
        raise ValueError(f"crop: expected within the resized size ({4 * h}, {4 * w}), got {tuple(crop)}")
    if isinstance(mask_thr, bool) or not isinstance(mask_thr, (int, float)):
        raise ValueError(f"mask_thr: expected a number, got {mask_thr!r}")


def binary_masks_x4(soft: torch.Tensor, crop: Sequence[int], mask_thr: float, *,
                    backend: Optional[str] = None) -> torch.Tensor:
    """``F.interpolate(soft[None], size=(4h, 4w), mode="bilinear")[0, :, :H', :W'] > mask_thr``."""
    _check(soft, crop, mask_thr)
    _, fn = resolve("binary_masks_x4", backend, soft.device.type)
    return fn(soft, (int(crop[0]), int(crop[1])), float(mask_thr))


def binary_masks_x4_is_fast(device: Union[str, torch.device] = "cpu", backend: Optional[str] = None) -> bool:
    """Whether :func:`binary_masks_x4` runs a kernel here rather than the reference.
    Post-processing calls the op only then, and otherwise resizes chunk by chunk."""
    return resolve("binary_masks_x4", backend, torch.device(device).type)[0] != "reference"


_backend.register("binary_masks_x4", "reference", always)(reference.binary_masks_x4)


def probe_thresholds(values: torch.Tensor, count: int = 64) -> torch.Tensor:
    """Thresholds that see one ulp: ``count`` of the reference's own resized values. At
    ``thr`` = a pixel's value that pixel is outside; a kernel that rounds it one ulp up puts
    it inside."""
    flat = values.flatten()
    return flat[torch.linspace(0, flat.numel() - 1, count).long()].unique()


@functools.lru_cache(maxsize=None)
def _matches_torch() -> bool:
    """The kernel against F.interpolate on a random map, once per process: the masks at
    thresholds taken from the reference's own values, bit for bit."""
    g = torch.Generator().manual_seed(0)
    soft = torch.rand(2, 13, 21, generator=g)
    want = torch.nn.functional.interpolate(soft[:, None], size=(52, 84), mode="bilinear", align_corners=False)[:, 0]
    return all(torch.equal(torch.ops.solo_fast.binary_masks_x4(soft, 50, 81, float(t)), want[:, :50, :81] > t)
               for t in probe_thresholds(want[:, :50, :81]))


def _cpu_available(device_type: str) -> bool:
    if device_type != "cpu" or not _ext.available() or not hasattr(torch.ops.solo_fast, "binary_masks_x4"):
        return False
    try:
        return _matches_torch()
    except RuntimeError:  # no FMA on this CPU
        return False


@_backend.register("binary_masks_x4", "cpu", _cpu_available)
def binary_masks_x4_cpu(soft: torch.Tensor, crop, mask_thr: float) -> torch.Tensor:
    h, w = soft.shape[1:]
    if 4 * (h + w) <= 128:  # torch resizes such small outputs with another kernel: its own
        return reference.binary_masks_x4(soft, crop, mask_thr)
    if soft.dtype != torch.float32:  # the reference resizes in fp32 too
        soft = soft.float()
    return torch.ops.solo_fast.binary_masks_x4(soft, crop[0], crop[1], mask_thr)


if _ext.available() and hasattr(torch.ops.solo_fast, "binary_masks_x4"):
    @torch.library.register_fake("solo_fast::binary_masks_x4")
    def _fake(soft, crop_h, crop_w, thr):
        return soft.new_empty((soft.shape[0], crop_h, crop_w), dtype=torch.bool)
