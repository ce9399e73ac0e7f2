"""The mask heads of SOLO, Decoupled SOLO (and Light) and SOLOv2.

Every head follows the same protocol, used by :mod:`solo_fast.modeling.solo`:

- ``forward(feats)`` -> a dict of raw per-level predictions, with ``"cls"``: list of
  class logits ``[B, C, S, S]``;
- ``positive_mask_probs(out, b, level, cells)`` -> mask probabilities ``[P, h, w]`` of the
  given cells of image ``b``, at the resolution of that level's mask targets (training);
- ``candidate_masks(out, b, level_of_cell, cells, mask_size, mask_thr)`` -> ``(soft, binary,
  area, maskness)`` of the candidate cells at stride 4 (inference);
- ``masks_are_dense()`` -> whether ``candidate_masks`` computes every cell's mask anyway
  (then post-processing does not split the candidates into chunks).

Only the cells that are needed have their masks computed (positive cells in training,
candidates at inference), except on the reference backend, where SOLO's mask branch runs
densely over all S² cells as published.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend, ops
from ..ops.reference import mask_stats
from .layers import ConvModule, focal_prior_bias


def resize_feats(feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """P2 down to P3's size and P6 up to P5's size (level strides become 8, 8, 16, 32, 32)."""
    out = list(feats)
    out[0] = F.interpolate(feats[0], size=feats[1].shape[-2:], mode="bilinear", align_corners=False)
    out[-1] = F.interpolate(feats[-1], size=feats[-2].shape[-2:], mode="bilinear", align_corners=False)
    return out


def _upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(x.shape[-2] * 2, x.shape[-1] * 2), mode="bilinear", align_corners=False)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def per_level(levels: torch.Tensor, cells: torch.Tensor, num_levels: int, fn, empty):
    """``fn(level, cells_of_that_level)`` for each level -- a tensor, or a tuple of tensors
    with one row per cell -- joined in the input order (``empty`` when no cells).

    ``levels`` must be non-decreasing, as post-processing passes its cells (ascending flat
    cell index, level by level): each level is then a slice, and the parts are joined as
    they come, with no copy at all when every cell is in one level."""
    # The level counts and the order check in one device-to-host read.
    counts = torch.cat([torch.bincount(levels, minlength=num_levels),
                        (levels[1:] < levels[:-1]).sum().reshape(1)]).tolist()
    if counts.pop():
        raise ValueError("levels: expected non-decreasing levels (cells in flat cell order)")
    parts, start = [], 0
    for lvl, n in enumerate(counts):
        part = fn(lvl, cells[start : start + n])
        start += n
        part = part if isinstance(part, tuple) else (part,)
        if part[0].shape[0]:
            parts.append(part)
    if not parts:
        return empty
    fields = [field[0] if len(field) == 1 else torch.cat(field) for field in zip(*parts)]
    return tuple(fields) if len(fields) > 1 else fields[0]


def _tower(in_channels: int, feat_channels: int, n: int, coords: str | None) -> nn.ModuleList:
    return nn.ModuleList(
        ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3, coords=coords if i == 0 else None)
        for i in range(n)
    )


def _run_tower(tower: nn.ModuleList, x: torch.Tensor, coord_src_size=None) -> torch.Tensor:
    for i, layer in enumerate(tower):
        x = layer(x, coord_src_size) if i == 0 else layer(x)
    return x


def _init_normal(conv: nn.Conv2d, prior: float | None) -> nn.Conv2d:
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, focal_prior_bias(prior) if prior else 0.0)
    return conv


class _GridHead(nn.Module):
    """What all SOLO heads share: the class branch (resize to S×S, convs, 3×3 conv to C)."""

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int, stacked_convs: int,
                 num_grids: Sequence[int]):
        super().__init__()
        self.num_classes = num_classes
        self.num_grids = list(num_grids)
        self.cls_convs = _tower(in_channels, feat_channels, stacked_convs, None)
        self.conv_cls = _init_normal(nn.Conv2d(feat_channels, num_classes, 3, padding=1), 0.01)

    def masks_are_dense(self) -> bool:
        """Whether candidate_masks computes every cell's mask whatever cells it is asked for;
        post-processing then asks once rather than chunk by chunk."""
        return False

    def class_logits(self, x: torch.Tensor, level: int) -> torch.Tensor:
        S = self.num_grids[level]
        return self.conv_cls(_run_tower(self.cls_convs, _resize(x, (S, S))))


class SOLOHead(_GridHead):
    """SOLO: CoordConv mask tower, ×2 upsample, 1×1 conv to S² masks per level."""

    mask_upsampled = True

    def __init__(self, num_classes, in_channels=256, feat_channels=256, stacked_convs=7,
                 num_grids=(40, 36, 24, 16, 12)):
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, num_grids)
        self.mask_convs = _tower(in_channels, feat_channels, stacked_convs, "xy")
        self.conv_mask_list = nn.ModuleList(
            _init_normal(nn.Conv2d(feat_channels, S * S, 1), 0.01) for S in self.num_grids
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> Dict[str, List[torch.Tensor]]:
        feats = resize_feats(feats)
        return {
            "mask_feat": [_upsample2(_run_tower(self.mask_convs, x)) for x in feats],
            "cls": [self.class_logits(x, i) for i, x in enumerate(feats)],
        }

    def _cell_logits(self, feat: torch.Tensor, level: int, cells: torch.Tensor) -> torch.Tensor:
        # Rows ``cells`` of the level's 1×1 mask conv: the same logits as the dense conv's
        # channels ``cells``, without building all S² of them.
        conv = self.conv_mask_list[level]
        w = conv.weight[cells, :, 0, 0]
        c, h, wd = feat.shape
        return (w @ feat.reshape(c, h * wd)).reshape(-1, h, wd) + conv.bias[cells, None, None]

    def positive_mask_probs(self, out, b: int, level: int, cells: torch.Tensor) -> torch.Tensor:
        return self._cell_logits(out["mask_feat"][level][b], level, cells).sigmoid()

    def masks_are_dense(self) -> bool:
        """On the reference backend every cell's mask is computed, as published: chunking the
        candidates would save no memory there and would compute the same dense maps again
        for every chunk, so post-processing does not chunk them."""
        return _backend.current_backend() == "reference"

    def candidate_masks(self, out, b: int, levels: torch.Tensor, cells: torch.Tensor, mask_size, mask_thr: float):
        dense = self.masks_are_dense()
        empty = mask_stats(out["mask_feat"][0].new_zeros((0, *mask_size)), mask_thr)

        def level_stats(level, sel):
            if sel.numel() == 0:
                return empty
            feat = out["mask_feat"][level][b]
            conv = self.conv_mask_list[level]
            if dense:  # as published: all S² masks, sigmoid, upsampled, then gathered
                soft = self.conv_mask_list[level](feat[None]).sigmoid()
                return mask_stats(_resize(soft, mask_size)[0][sel], mask_thr)
            if tuple(feat.shape[-2:]) == tuple(mask_size):  # levels 0-1: already at stride 4
                return ops.mask_predict(feat, conv.weight[sel, :, 0, 0], conv.bias[sel],
                                        mask_thr=mask_thr, out_dtype=torch.float32)
            # Coarser levels: the statistics belong to the masks resized to stride 4, so only
            # the soft masks are computed at the level's size (mask_predict's would be discarded).
            soft = self._cell_logits(feat, level, sel).sigmoid()
            return mask_stats(_resize(soft[None], mask_size)[0], mask_thr)

        return per_level(levels, cells, len(self.num_grids), level_stats, empty)


class DecoupledSOLOHead(_GridHead):
    """Decoupled SOLO: S x-maps and S y-maps per level; mask(i, j) = sigmoid(y_i)·sigmoid(x_j)."""

    def __init__(self, num_classes, in_channels=256, feat_channels=256, stacked_convs=7,
                 num_grids=(40, 36, 24, 16, 12), light: bool = False):
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, num_grids)
        self.light = light
        if light:  # one shared tower that sees both coordinates
            self.mask_convs = _tower(in_channels, feat_channels, stacked_convs, "xy")
        else:
            self.mask_convs_x = _tower(in_channels, feat_channels, stacked_convs, "x")
            self.mask_convs_y = _tower(in_channels, feat_channels, stacked_convs, "y")
        self.conv_mask_list_x = nn.ModuleList(
            _init_normal(nn.Conv2d(feat_channels, S, 3, padding=1), 0.01) for S in self.num_grids)
        self.conv_mask_list_y = nn.ModuleList(
            _init_normal(nn.Conv2d(feat_channels, S, 3, padding=1), 0.01) for S in self.num_grids)

    def forward(self, feats):
        feats = resize_feats(feats)
        xs, ys = [], []
        for i, x in enumerate(feats):
            if self.light:
                fx = fy = _upsample2(_run_tower(self.mask_convs, x))
            else:
                fx = _upsample2(_run_tower(self.mask_convs_x, x))
                fy = _upsample2(_run_tower(self.mask_convs_y, x))
            xs.append(self.conv_mask_list_x[i](fx))
            ys.append(self.conv_mask_list_y[i](fy))
        return {"mask_x": xs, "mask_y": ys, "cls": [self.class_logits(x, i) for i, x in enumerate(feats)]}

    def positive_mask_probs(self, out, b, level, cells):
        S = self.num_grids[level]
        py = out["mask_y"][level][b][cells // S].sigmoid()
        px = out["mask_x"][level][b][cells % S].sigmoid()
        return py * px

    def candidate_masks(self, out, b, levels, cells, mask_size, mask_thr):
        def level_soft(level, sel):
            if sel.numel() == 0:
                return out["mask_x"][level].new_zeros((0, *mask_size))
            S = self.num_grids[level]
            # As published: each factor is upsampled to stride 4, then multiplied.
            sy = _resize(out["mask_y"][level][b : b + 1].sigmoid(), mask_size)[0]
            sx = _resize(out["mask_x"][level][b : b + 1].sigmoid(), mask_size)[0]
            return sy[sel // S] * sx[sel % S]

        empty = out["mask_x"][0].new_zeros((0, *mask_size))
        return mask_stats(per_level(levels, cells, len(self.num_grids), level_soft, empty), mask_thr)


class _MaskFeatLevel(nn.Module):
    """One level of SOLOv2's mask-feature branch: ``level`` × (conv, ×2 upsample), or one conv."""

    def __init__(self, in_channels: int, feat_channels: int, level: int, coords: bool):
        super().__init__()
        n = max(level, 1)
        for j in range(n):
            cin = in_channels if j == 0 else feat_channels
            self.add_module(f"conv{j}", ConvModule(cin, feat_channels, 3, coords="xy" if (coords and j == 0) else None))
        self.num_up = level

    def forward(self, x):
        for j in range(max(self.num_up, 1)):
            x = getattr(self, f"conv{j}")(x)
            if j < self.num_up:
                x = _upsample2(x)
        return x


class MaskFeatModule(nn.Module):
    """SOLOv2's unified mask features: P2..P5 each brought to stride 4, summed, 1×1 conv to E."""

    def __init__(self, in_channels=256, feat_channels=128, out_channels=256, num_levels=4):
        super().__init__()
        self.convs_all_levels = nn.ModuleList(
            _MaskFeatLevel(in_channels, feat_channels, i, coords=(i == num_levels - 1)) for i in range(num_levels)
        )
        self.conv_pred = ConvModule(feat_channels, out_channels, 1)

    def forward(self, feats):
        total = self.convs_all_levels[0](feats[0])
        for i in range(1, len(self.convs_all_levels)):
            total = total + self.convs_all_levels[i](feats[i])
        return self.conv_pred(total)


class SOLOV2Head(_GridHead):
    """SOLOv2: dynamic 1×1 kernels per cell applied to unified stride-4 mask features."""

    def __init__(self, num_classes, in_channels=256, feat_channels=512, stacked_convs=4,
                 num_grids=(40, 36, 24, 16, 12), mask_feat_channels=128, mask_out_channels=256):
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, num_grids)
        self.mask_feature_head = MaskFeatModule(in_channels, mask_feat_channels, mask_out_channels)
        self.kernel_convs = _tower(in_channels, feat_channels, stacked_convs, "xy")
        self.conv_kernel = _init_normal(nn.Conv2d(feat_channels, mask_out_channels, 3, padding=1), None)

    def forward(self, feats):
        mask_feats = self.mask_feature_head(feats[:4])
        feats = resize_feats(feats)
        kernels, cls = [], []
        for i, x in enumerate(feats):
            S = self.num_grids[i]
            xs = _resize(x, (S, S))
            # The coordinates are those of the level's map, resized to S×S with the features.
            kernels.append(self.conv_kernel(_run_tower(self.kernel_convs, xs, coord_src_size=tuple(x.shape[-2:]))))
            cls.append(self.conv_cls(_run_tower(self.cls_convs, xs)))
        return {"mask_feats": mask_feats, "kernels": kernels, "cls": cls}

    def _kernels(self, out, b, level, cells):
        k = out["kernels"][level][b]  # [E, S, S]
        return k.reshape(k.shape[0], -1)[:, cells].t()  # [P, E]

    def positive_mask_probs(self, out, b, level, cells):
        feats = out["mask_feats"][b]
        e, h, w = feats.shape
        return (self._kernels(out, b, level, cells) @ feats.reshape(e, h * w)).reshape(-1, h, w).sigmoid()

    def candidate_masks(self, out, b, levels, cells, mask_size, mask_thr):
        feats = out["mask_feats"][b]
        kernels = per_level(levels, cells, len(self.num_grids), lambda lvl, sel: self._kernels(out, b, lvl, sel),
                            feats.new_zeros((0, feats.shape[0])))
        return ops.mask_predict(feats, kernels, mask_thr=mask_thr)


def build_head(cfg: dict) -> nn.Module:
    common = dict(num_classes=cfg["num_classes"], in_channels=cfg["fpn_channels"], feat_channels=cfg["feat_channels"],
                  stacked_convs=cfg["stacked_convs"], num_grids=cfg["num_grids"])
    kind = cfg["head"]
    if kind == "solo":
        return SOLOHead(**common)
    if kind in ("decoupled", "decoupled_light"):
        return DecoupledSOLOHead(**common, light=kind == "decoupled_light")
    if kind == "solov2":
        return SOLOV2Head(**common, mask_feat_channels=cfg["mask_feat_channels"],
                          mask_out_channels=cfg["mask_out_channels"])
    raise ValueError(f"head: expected 'solo', 'decoupled', 'decoupled_light' or 'solov2', got {kind!r}")
