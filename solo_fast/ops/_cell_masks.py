"""``cell_masks`` (DESIGN.md §2, SOLO's sparse inference and training): the public op, and
its fast path ("reference" is :func:`reference.cell_masks`, all maps then gathered).

Only the rows ``cells`` of the 1x1 mask conv are evaluated -- one GEMM of the gathered
weights -- instead of all S^2 maps the reference computes and then gathers (105 GFLOP and
412 MB of output for SOLO R50 at 800x1344). At the feature map's own size, with
statistics wanted, it is ``mask_predict`` (the fused GEMM + sigmoid + reductions). The
same function runs on every device: its arithmetic is a plain matmul either way.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import _backend, _checks
from . import reference
from ._dispatch import always, resolve
from ._mask_predict import mask_predict


# --------------------------------------------------------------------------------------
# The public op
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
    if size is not None:
        _checks.size_hw("size", size)
    if mask_thr is not None and (isinstance(mask_thr, bool) or not isinstance(mask_thr, (int, float))
                                 or not 0 <= mask_thr <= 1):
        raise ValueError(f"mask_thr: expected a number in [0, 1], got {mask_thr!r}")
    _checks.same_device(feat=feat, weight=weight, bias=bias, cells=cells)
    _, fn = resolve("cell_masks", backend, feat.device.type)
    return fn(feat, weight, bias, cells, size=None if size is None else tuple(size),
              mask_thr=None if mask_thr is None else float(mask_thr))


def cell_masks_are_dense(device: Union[str, torch.device] = "cpu", backend: Optional[str] = None) -> bool:
    """Whether :func:`cell_masks` computes every cell's map whichever cells it is given (the
    reference): a caller that would ask chunk by chunk then asks once, rather than
    computing the same dense maps for every chunk."""
    return resolve("cell_masks", backend, torch.device(device).type)[0] == "reference"


_backend.register("cell_masks", "reference", always)(reference.cell_masks)


# --------------------------------------------------------------------------------------
# "cpu" and "cuda": only the K rows
# --------------------------------------------------------------------------------------
def cell_masks_sparse(
    feat: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    cells: torch.Tensor,
    *,
    size: Optional[Sequence[int]] = None,
    mask_thr: Optional[float] = None,
):
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
    return soft if mask_thr is None else reference.mask_stats(soft, mask_thr)


for _device in ("cpu", "cuda"):
    _backend.register("cell_masks", _device, lambda device_type, d=_device: device_type == d)(cell_masks_sparse)
