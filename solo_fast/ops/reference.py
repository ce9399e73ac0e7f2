"""The reference path: every op of DESIGN.md §2 in plain PyTorch.

This module is the single oracle that the fast paths (C++, CUDA, Triton) are tested
against. It favours the obvious formulation over speed. Inputs are assumed to be
validated by the public wrappers in :mod:`solo_fast.ops`. Matrix NMS is represented by
its kernel boundary, :func:`matrix_decay`: its sorting and filtering are the same
PyTorch code on every backend (:func:`solo_fast.ops.matrix_nms`).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F


class Targets(NamedTuple):
    """Per-level training targets of one image (see DESIGN.md §2)."""

    labels: List[torch.Tensor]  # [S, S] int64, background = num_classes
    pos_cells: List[torch.Tensor]  # [P] int64 flat cell indices i*S+j, ascending
    pos_instance: List[torch.Tensor]  # [P] int64 instance of each positive cell
    mask_targets: List[torch.Tensor]  # [M, H/stride, W/stride] uint8, shared between same-stride levels


# --------------------------------------------------------------------------------------
# Matrix NMS
# --------------------------------------------------------------------------------------
def matrix_decay(
    masks: torch.Tensor, labels: torch.Tensor, areas: Optional[torch.Tensor], kernel: str, sigma: float
) -> torch.Tensor:
    """Decay factor of each of N masks already sorted by descending score.

    ``masks`` [N, H, W] bool/uint8, ``labels`` [N], ``areas`` [N] (None: the masks' pixel
    counts). Returns float32 [N]. This is the part of Matrix NMS each backend implements
    (the op ``matrix_decay``); the sorting and filtering around it are one function for
    every backend, :func:`solo_fast.ops.matrix_nms`.
    """
    n = masks.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=masks.device)
    if areas is None:
        areas = masks.flatten(1).sum(1)
    flat = masks.flatten(1).float()
    # 0/1 products summed in fp32 are exact up to 2**24 pixels per mask.
    inter = flat @ flat.t()
    areas = areas.float()
    union = areas[:, None] + areas[None, :] - inter
    # Two empty masks have union 0; their IoU is defined as 0 rather than NaN.
    iou = (inter / union.clamp(min=1.0)).triu(diagonal=1)
    same = (labels[:, None] == labels[None, :]).triu(diagonal=1)
    iou = iou * same
    comp = iou.max(dim=0).values  # comp[i]: largest IoU of mask i with any higher-scored mask
    comp = comp[:, None].expand(n, n)  # row i holds comp[i]
    if kernel == "gaussian":
        ratio = torch.exp(-sigma * iou**2) / torch.exp(-sigma * comp**2)
    else:  # linear; clamp so duplicates (IoU 1) give a decay of 0 instead of 0/0
        ratio = (1.0 - iou) / (1.0 - comp).clamp(min=1e-6)
    return ratio.min(dim=0).values


# --------------------------------------------------------------------------------------
# Center-region label assignment
# --------------------------------------------------------------------------------------
def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes ``(min col, min row, max col + 1, max row + 1)``; zeros for empty masks."""
    m = masks.shape[0]
    if m == 0:
        return torch.zeros(0, 4, dtype=torch.float32, device=masks.device)
    rows = masks.bool().any(dim=2)  # [M, H]
    cols = masks.bool().any(dim=1)  # [M, W]
    h, w = rows.shape[1], cols.shape[1]
    r_idx = torch.arange(h, device=masks.device)
    c_idx = torch.arange(w, device=masks.device)
    big = max(h, w) + 1
    y1 = torch.where(rows, r_idx, big).min(1).values
    y2 = torch.where(rows, r_idx, -1).max(1).values + 1
    x1 = torch.where(cols, c_idx, big).min(1).values
    x2 = torch.where(cols, c_idx, -1).max(1).values + 1
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    return torch.where(rows.any(1, keepdim=True), boxes, torch.zeros_like(boxes))


def binary_masks_x4(soft: torch.Tensor, crop, mask_thr: float, size=None) -> torch.Tensor:
    """[N, h, w] -> bool [N, *size]: bilinear x4 (half-pixel centres) in fp32, the top-left
    ``crop``, bilinear again to ``size`` where that differs from the crop (default: the
    crop), ``> mask_thr``. Post-processing's last step: soft masks at stride 4 to the padded
    input, cropped to the resized image, resized to the original image."""
    n, h, w = soft.shape
    s = F.interpolate(soft[:, None].float(), size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
    s = s[:, :, : crop[0], : crop[1]]
    if size is not None and tuple(size) != tuple(crop):
        s = F.interpolate(s, size=tuple(size), mode="bilinear", align_corners=False)
    return s[:, 0] > mask_thr


def downsample_masks(masks: torch.Tensor, stride: int) -> torch.Tensor:
    """[M, H, W] 0/1 -> [M, H/stride, W/stride] uint8: bilinear (half-pixel centres), then >= 0.5."""
    m, h, w = masks.shape
    if m == 0:
        return torch.zeros(0, h // stride, w // stride, dtype=torch.uint8, device=masks.device)
    small = F.interpolate(masks[None].float(), size=(h // stride, w // stride), mode="bilinear", align_corners=False)
    return (small[0] >= 0.5).to(torch.uint8)


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
) -> Targets:
    """SOLO's center-region label assignment for one image (DESIGN.md §2)."""
    device = gt_masks.device
    num_levels = len(num_grids)
    strides = [int(mask_stride)] * num_levels if isinstance(mask_stride, int) else [int(s) for s in mask_stride]
    H, W = int(pad_shape[0]), int(pad_shape[1])
    M = gt_masks.shape[0]
    masks = gt_masks.to(torch.uint8)
    boxes = masks_to_boxes(masks) if gt_boxes is None else gt_boxes
    boxes = boxes.double().cpu()

    # Exact integer moments; the centre of mass is their float64 quotient.
    rows = torch.arange(H, device=device, dtype=torch.int64)
    cols = torch.arange(W, device=device, dtype=torch.int64)
    m64 = masks.to(torch.int64)
    area = m64.sum((1, 2)).cpu()
    sum_r = (m64.sum(2) * rows).sum(1).cpu()
    sum_c = (m64.sum(1) * cols).sum(1).cpu()

    per_stride = {s: downsample_masks(masks, s) for s in dict.fromkeys(strides)}

    labels_out, cells_out, inst_out, targets_out = [], [], [], []
    for S, (lo, hi), stride in zip(num_grids, scale_ranges, strides):
        S = int(S)
        owner = [[-1] * S for _ in range(S)]
        for m in range(M):
            if int(area[m]) == 0:
                continue
            w = float(boxes[m, 2] - boxes[m, 0])
            h = float(boxes[m, 3] - boxes[m, 1])
            scale = math.sqrt(w * h)
            if not (lo <= scale <= hi):
                continue
            cy = float(sum_r[m]) / float(area[m])
            cx = float(sum_c[m]) / float(area[m])
            ci = math.floor(cy / H * S)
            cj = math.floor(cx / W * S)
            top = max(0, math.floor((cy - 0.5 * h * pos_scale) / H * S), ci - 1)
            down = min(S - 1, math.floor((cy + 0.5 * h * pos_scale) / H * S), ci + 1)
            left = max(0, math.floor((cx - 0.5 * w * pos_scale) / W * S), cj - 1)
            right = min(S - 1, math.floor((cx + 0.5 * w * pos_scale) / W * S), cj + 1)
            for i in range(top, down + 1):
                for j in range(left, right + 1):
                    owner[i][j] = m  # later instances overwrite earlier ones
        owner_t = torch.tensor(owner, dtype=torch.int64).reshape(-1)
        pos = torch.nonzero(owner_t >= 0).reshape(-1)
        inst = owner_t[pos]
        lab = torch.full((S * S,), num_classes, dtype=torch.int64)
        lab[pos] = gt_labels.cpu()[inst]
        labels_out.append(lab.reshape(S, S).to(device))
        cells_out.append(pos.to(device))
        inst_out.append(inst.to(device))
        targets_out.append(per_stride[stride])
    return Targets(labels_out, cells_out, inst_out, targets_out)


# --------------------------------------------------------------------------------------
# CoordConv
# --------------------------------------------------------------------------------------
def coord_maps(
    height: int,
    width: int,
    *,
    coord_src_size: Optional[Tuple[int, int]] = None,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """[1, 2, H, W] x then y coordinates in [-1, 1] (resized from ``coord_src_size`` if given)."""
    h0, w0 = (height, width) if coord_src_size is None else (int(coord_src_size[0]), int(coord_src_size[1]))
    xs = torch.linspace(-1, 1, w0, device=device, dtype=dtype)
    ys = torch.linspace(-1, 1, h0, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    maps = torch.stack([xx, yy])[None]
    if (h0, w0) != (height, width):
        maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
    return maps


def coord_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    padding: int = 1,
    coords: str = "xy",
    coord_src_size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """``conv2d(cat([x, xx, yy]), weight, bias)``: CoordConv by concatenation."""
    return F.conv2d(with_coords(x, coords, coord_src_size), weight, bias, padding=padding)


def with_coords(x: torch.Tensor, coords: str = "xy", coord_src_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """``x`` with the coordinate maps ``coords`` ("xy", "x" or "y") concatenated as its last
    channels (:func:`coord_maps`): CoordConv's input."""
    b, _, h, w = x.shape
    maps = coord_maps(h, w, coord_src_size=coord_src_size, device=x.device, dtype=x.dtype)
    sel = {"xy": maps, "x": maps[:, :1], "y": maps[:, 1:]}[coords]
    return torch.cat([x, sel.expand(b, -1, -1, -1)], 1)


# --------------------------------------------------------------------------------------
# Mask prediction (SOLOv2 dynamic kernels, SOLO sparse inference)
# --------------------------------------------------------------------------------------
def mask_stats(soft: torch.Tensor, mask_thr: float):
    """(soft, binary, area, maskness) of soft masks [K, h, w]: the binary mask ``soft >
    mask_thr``, its pixel count, and the mean soft value inside it (0 where it is empty).

    NaN soft values are never in the binary mask (``NaN > thr`` is false), so they count
    neither in the area nor in the maskness (a select, not ``soft * binary``: NaN * 0 is NaN)."""
    binary = soft > mask_thr
    area = binary.sum((1, 2))
    maskness = torch.where(binary, soft, 0.0).sum((1, 2)) / area.clamp(min=1)
    return soft, binary, area, maskness


def mask_predict(
    features: torch.Tensor,
    kernels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    mask_thr: float = 0.5,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``soft = sigmoid(kernels @ features + bias)`` with its binary mask, area and maskness."""
    e, h, w = features.shape
    logits = kernels.float() @ features.reshape(e, h * w).float()
    if bias is not None:
        logits = logits + bias.float()[:, None]
    soft, binary, area, maskness = mask_stats(logits.sigmoid().reshape(-1, h, w), mask_thr)
    if out_dtype is None:
        out_dtype = torch.float16 if features.is_cuda else torch.float32
    return soft.to(out_dtype), binary, area, maskness


def cell_masks(
    feat: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    cells: torch.Tensor,
    *,
    size: Optional[Sequence[int]] = None,
    mask_thr: Optional[float] = None,
):
    """SOLO's mask branch as published: all N maps of the 1x1 conv (``weight`` [N, C, 1, 1]
    or [N, C]) over ``feat`` [C, h, w], sigmoid, bilinearly resized to ``size``, then the
    rows ``cells``; with ``mask_thr``, also their binary masks, areas and maskness."""
    n, c = weight.shape[:2]
    soft = F.conv2d(feat[None], weight.reshape(n, c, 1, 1), bias).sigmoid()
    if size is not None and tuple(size) != tuple(soft.shape[-2:]):
        soft = F.interpolate(soft, size=tuple(size), mode="bilinear", align_corners=False)
    soft = soft[0][cells]
    return soft if mask_thr is None else mask_stats(soft, mask_thr)



# --------------------------------------------------------------------------------------
# Modulated deformable convolution (DCNv2)
# --------------------------------------------------------------------------------------
def deform_sample_positions(
    offset: torch.Tensor,
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    offset_groups: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(py, px) [B, G, KH*KW, Ho, Wo]: where tap (i, j) of output pixel (ho, wo) samples,
    ``ho*sh - ph + i*dh + dy`` and ``wo*sw - pw + j*dw + dx`` with (dy, dx) the tap's pair of
    ``offset`` [B, 2*G*KH*KW, Ho, Wo] (dy first)."""
    b, _, ho, wo = offset.shape
    kh, kw = kernel_size
    off = offset.reshape(b, offset_groups, kh * kw, 2, ho, wo)
    dev, dt = offset.device, offset.dtype
    i = torch.arange(kh, device=dev, dtype=dt).repeat_interleave(kw) * dilation[0]  # [K]
    j = torch.arange(kw, device=dev, dtype=dt).repeat(kh) * dilation[1]
    oh = torch.arange(ho, device=dev, dtype=dt) * stride[0] - padding[0]  # [Ho]
    ow = torch.arange(wo, device=dev, dtype=dt) * stride[1] - padding[1]  # [Wo]
    py = off[:, :, :, 0] + i.view(kh * kw, 1, 1) + oh.view(1, ho, 1)
    px = off[:, :, :, 1] + j.view(kh * kw, 1, 1) + ow.view(1, 1, wo)
    return py, px


def deform_bilinear(x: torch.Tensor, py: torch.Tensor, px: torch.Tensor, offset_groups: int) -> torch.Tensor:
    """[B, C, K, Ho, Wo]: ``x`` [B, C, H, W] sampled bilinearly at ``py``/``px`` [B, G, K, Ho, Wo]
    (channel c uses group c // (C / G)), mmcv's ``dmcn_im2col_bilinear`` border rule: a
    sample with ``py <= -1``, ``py >= H``, ``px <= -1`` or ``px >= W`` is 0; otherwise each of
    its four corners outside the image contributes 0."""
    b, c, h, w = x.shape
    g = offset_groups
    _, _, k, ho, wo = py.shape
    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    y0 = torch.floor(py)
    x0 = torch.floor(px)
    ly, lx = py - y0, px - x0
    hy, hx = 1 - ly, 1 - lx
    y0i, x0i = y0.long(), x0.long()
    xg = x.reshape(b, g, c // g, h * w)
    out = x.new_zeros(b, g, c // g, k * ho * wo)
    for dy, dx, wgt in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        yy, xx = y0i + dy, x0i + dx
        valid = inside & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).reshape(b, g, 1, k * ho * wo)
        vals = xg.gather(3, idx.expand(b, g, c // g, k * ho * wo))
        out = out + vals * (wgt * valid).reshape(b, g, 1, k * ho * wo)
    return out.reshape(b, c, k, ho, wo)


def deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    stride: Tuple[int, int] = (1, 1),
    padding: Tuple[int, int] = (0, 0),
    dilation: Tuple[int, int] = (1, 1),
    groups: int = 1,
    offset_groups: int = 1,
) -> torch.Tensor:
    """Modulated deformable convolution (DCNv2, mmcv's ``ModulatedDeformConv2d``): the
    columns ``x`` sampled at the offset taps (:func:`deform_bilinear`) times ``mask``
    [B, G*KH*KW, Ho, Wo] (None: ones, DCNv1), then one grouped matmul with ``weight``
    [O, C/groups, KH, KW], plus ``bias``. fp16/bf16 are computed in fp32 and rounded once.
    Differentiable in every input by autograd."""
    dtype = x.dtype
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x, offset, weight = x.to(acc), offset.to(acc), weight.to(acc)
    b, c, _, _ = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = offset.shape[-2:]
    py, px = deform_sample_positions(offset, (kh, kw), stride, padding, dilation, offset_groups)
    cols = deform_bilinear(x, py, px, offset_groups)  # [B, C, K, Ho, Wo]
    if mask is not None:
        m = mask.to(acc).reshape(b, offset_groups, 1, kh * kw, ho, wo)
        cols = (cols.reshape(b, offset_groups, c // offset_groups, kh * kw, ho, wo) * m).reshape(cols.shape)
    cols = cols.reshape(b, groups, (c // groups) * kh * kw, ho * wo)
    out = weight.reshape(1, groups, o // groups, (c // groups) * kh * kw) @ cols  # [B, groups, O/groups, L]
    out = out.reshape(b, o, ho, wo)
    if bias is not None:
        out = out + bias.to(acc).view(1, o, 1, 1)
    return out.to(dtype)
