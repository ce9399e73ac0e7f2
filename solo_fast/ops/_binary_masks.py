"""``binary_masks_x4`` (DESIGN.md §2): ``soft`` [N, h, w] resized by 4 with bilinear
interpolation (half-pixel centres, ``align_corners=False``), cropped to ``crop`` = (H', W')
from the top left, resized again (bilinear) to ``size`` = (H, W) where that differs from
the crop, and thresholded ``> mask_thr``. Returns bool [N, H, W] (``size`` defaults to the
crop). This is the last step of post-processing: stride-4 masks of the padded input (a
multiple of 32) to the padded size, cropped to the resized image, resized to the original
image. The reference is :func:`reference.binary_masks_x4`: ``F.interpolate``, crop,
``F.interpolate``, ``>``.

"cpu": ``torch.ops.solo_fast.binary_masks_x4`` (csrc/cpu/binary_masks_x4_kernel.cpp). It
uses torch's own arithmetic for a one-channel map with an output of H + W > 128: along W,
then along H, each ``fma(v0, w0, v1 * w1)``, with source positions ``fma(scale, d + 0.5,
-0.5)``. Where either resize has a smaller output, which torch computes with another
kernel, the op runs the reference. So the masks are the reference's bit for bit. There is
no fp32 map at full size; the reference needs 430 MB for 100 masks at 800x1344, or a loop
over small chunks. Its first use in a process compares it with the reference on random
maps, one resize and two, at thresholds that see a one-ulp difference
(:func:`probe_thresholds`); where they differ (another torch kernel or build) it is not
used.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch

from .. import _backend, _checks, _ext
from . import reference
from ._dispatch import always, resolve


def _size_pair(name, value):
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in value)):
        raise ValueError(f"{name}: expected (height, width) ints, got {value!r}")


def _check(soft, crop, mask_thr, size=None) -> None:
    _checks.tensor("soft", soft, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _size_pair("crop", crop)
    h, w = soft.shape[1:]
    if not (0 <= crop[0] <= 4 * h and 0 <= crop[1] <= 4 * w):
        raise ValueError(f"crop: expected within the resized size ({4 * h}, {4 * w}), got {tuple(crop)}")
    if size is not None:
        _size_pair("size", size)
        if tuple(size) != tuple(crop) and (min(size) < 1 or min(crop) < 1):
            raise ValueError(f"size: resizing the crop {tuple(crop)} to {tuple(size)} needs both non-empty")
    if isinstance(mask_thr, bool) or not isinstance(mask_thr, (int, float)):
        raise ValueError(f"mask_thr: expected a number, got {mask_thr!r}")


def binary_masks_x4(soft: torch.Tensor, crop: Sequence[int], mask_thr: float, size: Optional[Sequence[int]] = None,
                    *, backend: Optional[str] = None) -> torch.Tensor:
    """``F.interpolate(soft[None], size=(4h, 4w), mode="bilinear")[:, :, :H', :W']``, then
    ``F.interpolate(..., size=size, mode="bilinear")`` unless ``size`` is the crop's, ``> mask_thr``."""
    _check(soft, crop, mask_thr, size)
    _, fn = resolve("binary_masks_x4", backend, soft.device.type)
    crop = (int(crop[0]), int(crop[1]))
    return fn(soft, crop, float(mask_thr), crop if size is None else (int(size[0]), int(size[1])))


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


def _soft_values(soft, crop, size):
    """The reference's resized values before its threshold."""
    s = torch.nn.functional.interpolate(soft[:, None], size=(4 * soft.shape[1], 4 * soft.shape[2]), mode="bilinear",
                                        align_corners=False)[:, :, : crop[0], : crop[1]]
    if tuple(size) != tuple(crop):
        s = torch.nn.functional.interpolate(s, size=tuple(size), mode="bilinear", align_corners=False)
    return s[:, 0]


@functools.lru_cache(maxsize=None)
def _matches_torch() -> bool:
    """The kernel against the reference on random maps, once per process: one resize, a
    second one up and one down, the masks at thresholds taken from the reference's own
    values, bit for bit."""
    g = torch.Generator().manual_seed(0)
    soft = torch.rand(2, 13, 21, generator=g)
    for crop, size in (((50, 81), (50, 81)), ((50, 81), (97, 154)), ((50, 81), (41, 90))):
        values = _soft_values(soft, crop, size)
        for t in probe_thresholds(values):
            got = torch.ops.solo_fast.binary_masks_x4(soft, crop[0], crop[1], size[0], size[1], float(t))
            if not torch.equal(got, values > t):
                return False
    return True


def _cpu_available(device_type: str) -> bool:
    if device_type != "cpu" or not _ext.available() or not hasattr(torch.ops.solo_fast, "binary_masks_x4"):
        return False
    try:
        return _matches_torch()
    except RuntimeError:  # no FMA on this CPU
        return False


@_backend.register("binary_masks_x4", "cpu", _cpu_available)
def binary_masks_x4_cpu(soft: torch.Tensor, crop, mask_thr: float, size) -> torch.Tensor:
    h, w = soft.shape[1:]
    # torch resizes to small outputs (H + W <= 128) with another kernel: its own.
    if 4 * (h + w) <= 128 or (tuple(size) != tuple(crop) and size[0] + size[1] <= 128):
        return reference.binary_masks_x4(soft, crop, mask_thr, size)
    if soft.dtype != torch.float32:  # the reference resizes in fp32 too
        soft = soft.float()
    return torch.ops.solo_fast.binary_masks_x4(soft, crop[0], crop[1], size[0], size[1], mask_thr)


if _ext.available() and hasattr(torch.ops.solo_fast, "binary_masks_x4"):
    @torch.library.register_fake("solo_fast::binary_masks_x4")
    def _fake(soft, crop_h, crop_w, out_h, out_w, thr):
        return soft.new_empty((soft.shape[0], out_h, out_w), dtype=torch.bool)
