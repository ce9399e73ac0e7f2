"""Inference post-processing shared by every SOLO head (DESIGN.md §1, "Inference")."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from .. import ops
from .configs import InferenceSettings
from .heads import level_of_cells
from .transform import ImageMeta

def point_nms(probs: torch.Tensor) -> torch.Tensor:
    """Keep a class score only where it is the max of its 2×2 neighbourhood (stride 1, pad 1)."""
    local_max = F.max_pool2d(probs, 2, stride=1, padding=1)[..., :-1, :-1]
    return probs * (local_max == probs)


def flat_scores(cls_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-level [B, C, S, S] logits -> [B, ΣS², C] point-NMS'd probabilities (cells level by level).

    In fp32 whatever the logits' dtype: under autocast (bf16/fp16 logits) scores rounded to
    8 bits tie often, and ties would reorder Matrix NMS and the results."""
    return torch.cat([point_nms(c.float().sigmoid()).flatten(2).transpose(1, 2) for c in cls_logits], 1)


def empty_result(ori_shape, device) -> Dict[str, torch.Tensor]:
    return {
        "masks": torch.zeros((0, *ori_shape), dtype=torch.bool, device=device),
        "scores": torch.zeros(0, device=device),
        "labels": torch.zeros(0, dtype=torch.long, device=device),
    }


# Elements of the float buffer that :func:`final_masks` resizes into at once: 8 MB on the
# CPU, where a buffer that stays in cache and needs no fresh pages is what saves time;
# 512 MB on a GPU, where what costs is the number of kernel launches.
RESIZE_CHUNK_ELEMS = 1 << 21
RESIZE_CHUNK_ELEMS_GPU = 1 << 27


def final_masks(soft: torch.Tensor, pad_shape, img_shape, ori_shape, mask_thr: float) -> torch.Tensor:
    """Binary masks at the original image size from soft masks [N, h, w] at stride 4: resized
    to the padded input, cropped to the image, resized to the original size, thresholded.

    A few masks at a time: each mask is resized exactly as in one call over all of them
    (bilinear interpolation treats every channel alone), but the float masks at full size
    -- 430 MB for 100 masks at 800x1344, written once and read once -- never exist at
    once; a small buffer stays in cache and needs no fresh pages."""
    n, h, w = soft.shape
    if (tuple(pad_shape) == (4 * h, 4 * w) and not torch.compiler.is_compiling()
            and ops.binary_masks_x4_is_fast(soft.device)):
        # Both resizes and the threshold in one kernel pass: the same masks bit for bit, no
        # fp32 map at full size.
        return ops.binary_masks_x4(soft, tuple(img_shape), mask_thr, tuple(ori_shape))
    out = torch.empty((n, *ori_shape), dtype=torch.bool, device=soft.device)
    budget = RESIZE_CHUNK_ELEMS if soft.device.type == "cpu" else RESIZE_CHUNK_ELEMS_GPU
    step = max(1, budget // max(1, pad_shape[0] * pad_shape[1]))
    for i in range(0, n, step):
        # Soft masks: stride 4 -> padded input, crop the image, resize to the original size.
        s = F.interpolate(soft[None, i : i + step].float(), size=tuple(pad_shape), mode="bilinear", align_corners=False)
        s = s[:, :, : img_shape[0], : img_shape[1]]
        if tuple(s.shape[-2:]) != tuple(ori_shape):  # a same-size bilinear resize is the identity
            s = F.interpolate(s, size=tuple(ori_shape), mode="bilinear", align_corners=False)
        torch.gt(s[0], mask_thr, out=out[i : i + step])
    return out


class _HeldSoftMasks:
    """The soft masks of the cells that the best candidates use, left in the chunks that
    computed them: only binary masks reach Matrix NMS, and soft masks are needed only for
    the few detections it keeps, so copying every kept soft mask out of every chunk (about
    270 MB at 800x1344) would be wasted. A chunk is let go once no best candidate uses
    it; past ``limit`` held masks, those still used are gathered into one tensor, so at
    most ``limit`` masks are held."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts = []  # (cells of the rows ascending, soft masks [rows, h, w])

    def add(self, cells: torch.Tensor, soft: torch.Tensor, need: torch.Tensor) -> None:
        self.parts.append((cells, soft))
        self.parts = [(c, m) for c, m in self.parts if bool(torch.isin(need, c).any())]
        if sum(m.shape[0] for _, m in self.parts) > self.limit:
            self.parts = [(need, self.gather(need))]

    def gather(self, cells: torch.Tensor) -> torch.Tensor:
        """Soft masks of ``cells`` (each held), in that order."""
        _, first = self.parts[0]
        out = first.new_empty((cells.numel(), *first.shape[1:]))
        for part_cells, soft in self.parts:
            here = torch.isin(cells, part_cells)
            out[here] = soft[torch.searchsorted(part_cells, cells[here])]
        return out


def _stream_top_masks(head, out, b, cells, inv, cand_scores, strides, mask_size, thr, nms_pre, chunk):
    """Masks of thousands of cells, ``chunk`` at a time, keeping only those of the cells
    that the best ``nms_pre`` candidates so far use: memory stays bounded by
    ``nms_pre + 2 * chunk`` masks and no mask is computed twice.

    Returns every cell's area and maskness, the binary masks of the cells of the final
    best candidates (ascending cell order), and a function from positions in those cells
    to their soft masks. The selection rule is :func:`postprocess_image`'s own -- valid
    candidates (area > stride), score x maskness, stable descending sort, first
    ``nms_pre`` -- applied chunk by chunk; a top-k of a union is the top-k of the partial
    top-ks, and candidates are cell-major, so each chunk's candidates come after the
    earlier ones, as in the one-pass order.
    """
    areas, masknesses = [], []
    best = inv.new_zeros(0)  # candidate indices, ascending
    best_scores = cand_scores.new_zeros(0)
    kept_cells = inv.new_zeros(0)
    kept_binary = None
    held = _HeldSoftMasks(limit=nms_pre + chunk)
    for i in range(0, cells.numel(), chunk):
        soft_c, binary_c, area_c, maskness_c = head.candidate_masks(out, b, cells[i : i + chunk], mask_size, thr)
        areas.append(area_c)
        masknesses.append(maskness_c)
        new = torch.nonzero((inv >= i) & (inv < i + chunk)).flatten()
        local = inv[new] - i
        valid = area_c[local].float() > strides[new]
        new, local = new[valid], local[valid]
        scores = torch.cat([best_scores, cand_scores[new] * maskness_c[local].to(cand_scores.dtype)])
        order = torch.sort(scores, descending=True, stable=True).indices[:nms_pre].sort().values
        best, best_scores = torch.cat([best, new])[order], scores[order]
        need = torch.unique(inv[best])  # the cells the best candidates use, ascending
        # Earlier cells come from the kept masks, the others from this chunk: two gathers,
        # in cell order, without concatenating the two sets of masks first.
        old = need < i
        pos_old = torch.searchsorted(kept_cells, need[old])
        pos_new = need[~old] - i
        if kept_binary is None:
            kept_binary = binary_c[pos_new]
        else:
            kept_binary = torch.cat([kept_binary[pos_old], binary_c[pos_new]])
        kept_cells = need
        held.add(torch.arange(i, i + soft_c.shape[0], device=inv.device), soft_c, need)
    return (lambda pos: held.gather(kept_cells[pos])), kept_binary, torch.cat(areas), torch.cat(masknesses)


def postprocess_image(head, out, b: int, scores: torch.Tensor, meta: ImageMeta, settings: InferenceSettings,
                      strides: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Masks, scores and labels of image ``b`` from the head's raw outputs.

    ``scores`` is that image's [ΣS², C] point-NMS'd class probabilities; ``strides`` the
    levels' strides (the "area > stride" rule). Past ``settings.mask_chunk`` distinct
    candidate cells, masks are computed chunk by chunk, keeping only those the best
    ``nms_pre`` candidates need.
    """
    cfg = settings
    device = scores.device
    num_grids = head.num_grids
    cand = torch.nonzero(scores > cfg.score_thr)  # (cell, class) pairs, cell-major
    if cand.numel() == 0:
        return empty_result(meta.ori_shape, device)
    cells_global, labels = cand[:, 0], cand[:, 1]
    cand_scores = scores[cells_global, labels]
    # A cell's mask does not depend on the class: masks are computed once per distinct
    # cell (``inv`` maps each candidate to its cell) and gathered only for the few
    # candidates that reach Matrix NMS.
    cells, inv = torch.unique(cells_global, return_inverse=True)
    strides = torch.tensor(strides, device=device, dtype=torch.float32)[level_of_cells(num_grids, device)[cells]][inv]

    H, W = meta.pad_shape
    mask_size = (H // 4, W // 4)
    thr = cfg.mask_thr
    nms_pre = cfg.nms_pre
    chunk = cfg.mask_chunk
    # Where the ops compute every cell's map anyway (SOLO's reference), chunking would only
    # compute the same dense maps once per chunk.
    streamed = cells.numel() > chunk and not ops.cell_masks_are_dense(device)
    if not streamed:
        soft_u, binary_u, area_u, maskness_u = head.candidate_masks(out, b, cells, mask_size, thr)
        soft_of = soft_u.__getitem__
    else:
        soft_of, binary_u, area_u, maskness_u = _stream_top_masks(
            head, out, b, cells, inv, cand_scores, strides, mask_size, thr, nms_pre, chunk)
    area = area_u[inv]
    keep = area.float() > strides
    if not bool(keep.any()):
        return empty_result(meta.ori_shape, device)
    inv, area, labels = inv[keep], area[keep], labels[keep]
    cand_scores = cand_scores[keep] * maskness_u[inv].to(cand_scores.dtype)
    # The candidates Matrix NMS keeps after its own stable sort and nms_pre cut, back in
    # candidate order so that it breaks ties exactly as it would on all of them.
    top = torch.sort(cand_scores, descending=True, stable=True).indices[:nms_pre].sort().values
    inv, area, labels, cand_scores = inv[top], area[top], labels[top], cand_scores[top]
    if streamed:  # binary_u (and soft_of) hold the masks of exactly these cells, in ascending order
        inv = torch.unique(inv, return_inverse=True)[1]

    nms_scores, nms_labels, _, keep_inds = ops.matrix_nms(
        binary_u[inv], labels, cand_scores, mask_area=area, kernel=cfg.nms_kernel, sigma=cfg.nms_sigma,
        filter_thr=cfg.filter_thr, nms_pre=nms_pre, max_num=cfg.max_per_img,
    )
    if nms_scores.numel() == 0:
        return empty_result(meta.ori_shape, device)
    masks = final_masks(soft_of(inv[keep_inds]), (H, W), meta.img_shape, meta.ori_shape, cfg.mask_thr)
    return {"masks": masks, "scores": nms_scores, "labels": nms_labels}


def postprocess(head, out, metas: List[ImageMeta], settings: InferenceSettings,
                strides: Sequence[int]) -> List[Dict[str, torch.Tensor]]:
    scores = flat_scores(out["cls"])
    return [postprocess_image(head, out, b, scores[b], meta, settings, strides) for b, meta in enumerate(metas)]
