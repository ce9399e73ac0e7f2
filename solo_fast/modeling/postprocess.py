"""Inference post-processing shared by every SOLO head (DESIGN.md §1, "Inference")."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from .. import ops
from .transform import ImageMeta

# Candidates whose masks are computed at once; past this, post-processing takes two passes.
MASK_CHUNK = 512


def point_nms(probs: torch.Tensor) -> torch.Tensor:
    """Keep a class score only where it is the max of its 2×2 neighbourhood (stride 1, pad 1)."""
    local_max = F.max_pool2d(probs, 2, stride=1, padding=1)[..., :-1, :-1]
    return probs * (local_max == probs)


def flat_scores(cls_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-level [B, C, S, S] logits -> [B, ΣS², C] point-NMS'd probabilities (cells level by level)."""
    return torch.cat([point_nms(c.sigmoid()).flatten(2).transpose(1, 2) for c in cls_logits], 1)


def level_of_cells(num_grids: Sequence[int], device) -> torch.Tensor:
    """For every flat cell index over all levels, its level."""
    return torch.cat([torch.full((S * S,), i, dtype=torch.long, device=device) for i, S in enumerate(num_grids)])


def empty_result(ori_shape, device) -> Dict[str, torch.Tensor]:
    return {
        "masks": torch.zeros((0, *ori_shape), dtype=torch.bool, device=device),
        "scores": torch.zeros(0, device=device),
        "labels": torch.zeros(0, dtype=torch.long, device=device),
    }


def postprocess_image(head, out, b: int, scores: torch.Tensor, meta: ImageMeta, cfg: dict) -> Dict[str, torch.Tensor]:
    """Masks, scores and labels of image ``b`` from the head's raw outputs.

    ``scores`` is that image's [ΣS², C] point-NMS'd class probabilities.
    """
    device = scores.device
    num_grids = head.num_grids
    cand = torch.nonzero(scores > cfg["score_thr"])  # (cell, class) pairs, cell-major
    if cand.numel() == 0:
        return empty_result(meta.ori_shape, device)
    cells_global, labels = cand[:, 0], cand[:, 1]
    cand_scores = scores[cells_global, labels]
    levels = level_of_cells(num_grids, device)[cells_global]
    offsets = torch.tensor([0] + [S * S for S in num_grids], device=device).cumsum(0)
    cells = cells_global - offsets[levels]
    strides = torch.tensor(cfg["strides"], device=device, dtype=torch.float32)[levels]

    H, W = meta.pad_shape
    mask_size = (H // 4, W // 4)
    thr = cfg["mask_thr"]
    nms_pre = cfg["nms_pre"]
    chunk = cfg.get("mask_chunk", MASK_CHUNK)
    if cells.numel() <= chunk:
        soft, binary, area, maskness = head.candidate_masks(out, b, levels, cells, mask_size, thr)
    else:
        # Thousands of candidates (many classes): a first pass keeps only each mask's area
        # and maskness, chunk by chunk, so memory stays bounded; the masks of the few that
        # survive the filter and nms_pre are computed again below.
        stats = [head.candidate_masks(out, b, levels[i : i + chunk], cells[i : i + chunk], mask_size, thr)[2:]
                 for i in range(0, cells.numel(), chunk)]
        area = torch.cat([s[0] for s in stats])
        maskness = torch.cat([s[1] for s in stats])
        soft = binary = None
    keep = area.float() > strides
    if not bool(keep.any()):
        return empty_result(meta.ori_shape, device)
    area, maskness = area[keep], maskness[keep]
    cand_scores = cand_scores[keep] * maskness.to(cand_scores.dtype)
    labels = labels[keep]
    if soft is None:
        # The candidates Matrix NMS would keep after its own stable sort and nms_pre cut.
        top = torch.sort(cand_scores, descending=True, stable=True).indices[:nms_pre]
        top = top.sort().values  # back to candidate order, so Matrix NMS breaks ties as before
        levels, cells = levels[keep][top], cells[keep][top]
        cand_scores, labels, area = cand_scores[top], labels[top], area[top]
        soft, binary, _, _ = head.candidate_masks(out, b, levels, cells, mask_size, thr)
    else:
        soft, binary = soft[keep], binary[keep]

    nms_scores, nms_labels, _, keep_inds = ops.matrix_nms(
        binary, labels, cand_scores, mask_area=area, kernel=cfg["nms_kernel"], sigma=cfg["nms_sigma"],
        filter_thr=cfg["filter_thr"], nms_pre=nms_pre, max_num=cfg["max_per_img"],
    )
    if nms_scores.numel() == 0:
        return empty_result(meta.ori_shape, device)
    soft = soft[keep_inds].float()[None]
    # Soft masks: stride 4 -> padded input, crop the image, resize to the original size.
    soft = F.interpolate(soft, size=(H, W), mode="bilinear", align_corners=False)
    soft = soft[:, :, : meta.img_shape[0], : meta.img_shape[1]]
    soft = F.interpolate(soft, size=meta.ori_shape, mode="bilinear", align_corners=False)[0]
    return {"masks": soft > cfg["mask_thr"], "scores": nms_scores, "labels": nms_labels}


def postprocess(head, out, metas: List[ImageMeta], cfg: dict) -> List[Dict[str, torch.Tensor]]:
    scores = flat_scores(out["cls"])
    return [postprocess_image(head, out, b, scores[b], meta, cfg) for b, meta in enumerate(metas)]
