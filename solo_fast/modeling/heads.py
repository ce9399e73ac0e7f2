"""The mask heads of SOLO, Decoupled SOLO (and Light) and SOLOv2.

Every head follows the same protocol, used by :mod:`solo_fast.modeling.solo` (training),
:mod:`solo_fast.modeling.postprocess` (inference) and :mod:`solo_fast.export`:

- ``forward(feats)`` -> a dict of raw per-level predictions, with ``"cls"``: list of
  class logits ``[B, C, S, S]``;
- ``positive_mask_probs(out, b, level, cells)`` -> mask probabilities ``[P, h, w]`` of the
  given cells of image ``b``, at the resolution of that level's mask targets (training);
- ``candidate_masks(out, b, cells, mask_size, mask_thr, static=False)`` -> ``(soft,
  binary, area, maskness)`` at stride 4 of the flat cells ``cells`` (indices over all
  levels, level by level; ascending unless ``static``). ``static=True`` computes them in
  static shapes (no data-dependent split by level), for export.

Only the cells that are needed have their masks computed where the ops allow it: which
formulation runs (SOLO's dense S² maps as published, or only the selected rows) is the
ops' choice (:func:`solo_fast.ops.cell_masks`), not the heads'.

Deformable convs (mmdetection's ``dcn_cfg`` / ``dcn_apply_to_all_conv`` and the
mask-feature branch's ``conv_cfg``): ``head_dcn="all"`` makes every conv of the towers
(class tower and kernel / mask towers) a DCN, ``"last"`` only the last conv of each tower
(the Light heads), ``"none"`` none; ``mask_feat_dcn`` every conv of SOLOv2's mask-feature
branch, its 1×1 ``conv_pred`` included. ``dcn_type`` is "DCNv2" or "DCN" (DCNv1).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
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


def level_of_cells(num_grids: Sequence[int], device) -> torch.Tensor:
    """For every flat cell index over all levels, its level."""
    return torch.cat([torch.full((S * S,), i, dtype=torch.long, device=device) for i, S in enumerate(num_grids)])


HEAD_DCN = ("none", "all", "last")


def _tower_dcn(head_dcn: str, dcn_type: str, i: int, n: int) -> Optional[str]:
    """The DCN type of conv ``i`` of a tower of ``n`` convs (None: a plain conv)."""
    if head_dcn not in HEAD_DCN:
        raise ValueError(f"head_dcn: expected one of {HEAD_DCN}, got {head_dcn!r}")
    return dcn_type if head_dcn == "all" or (head_dcn == "last" and i == n - 1) else None


def _tower(in_channels: int, feat_channels: int, n: int, coords: str | None, head_dcn: str = "none",
           dcn_type: str = "DCNv2") -> nn.ModuleList:
    return nn.ModuleList(
        ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3, coords=coords if i == 0 else None,
                   dcn=_tower_dcn(head_dcn, dcn_type, i, n))
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
                 num_grids: Sequence[int], head_dcn: str = "none", dcn_type: str = "DCNv2"):
        super().__init__()
        self.num_classes = num_classes
        self.num_grids = list(num_grids)
        self.head_dcn, self.dcn_type = head_dcn, dcn_type
        self.cls_convs = _tower(in_channels, feat_channels, stacked_convs, None, head_dcn, dcn_type)
        self.conv_cls = _init_normal(nn.Conv2d(feat_channels, num_classes, 3, padding=1), 0.01)

    def split_cells(self, cells: torch.Tensor):
        """Flat cells over all levels -> (level, cell within the level) of each."""
        levels = level_of_cells(self.num_grids, cells.device)[cells]
        offsets = torch.tensor([0] + [S * S for S in self.num_grids], device=cells.device).cumsum(0)
        return levels, cells - offsets[levels]

    def class_logits(self, x: torch.Tensor, level: int) -> torch.Tensor:
        S = self.num_grids[level]
        return self.conv_cls(_run_tower(self.cls_convs, _resize(x, (S, S))))


class SOLOHead(_GridHead):
    """SOLO: CoordConv mask tower, ×2 upsample, 1×1 conv to S² masks per level."""

    # Towers whose output is upsampled x2 and read by post-processing in NCHW: the network's
    # fast form converts the layout at their last layer, before the upsample (a quarter of
    # the bytes).
    nchw_towers = ("mask_convs",)

    def __init__(self, num_classes, in_channels=256, feat_channels=256, stacked_convs=7,
                 num_grids=(40, 36, 24, 16, 12), head_dcn="none", dcn_type="DCNv2"):
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, num_grids, head_dcn, dcn_type)
        self.mask_convs = _tower(in_channels, feat_channels, stacked_convs, "xy", head_dcn, dcn_type)
        self.conv_mask_list = nn.ModuleList(
            _init_normal(nn.Conv2d(feat_channels, S * S, 1), 0.01) for S in self.num_grids
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> Dict[str, List[torch.Tensor]]:
        feats = resize_feats(feats)
        return {
            "mask_feat": [_upsample2(_run_tower(self.mask_convs, x)) for x in feats],
            "cls": [self.class_logits(x, i) for i, x in enumerate(feats)],
        }

    def _cell_masks(self, out, b: int, level: int, cells: torch.Tensor, **kw):
        conv = self.conv_mask_list[level]
        return ops.cell_masks(out["mask_feat"][level][b], conv.weight, conv.bias, cells, **kw)

    def positive_mask_probs(self, out, b: int, level: int, cells: torch.Tensor) -> torch.Tensor:
        return self._cell_masks(out, b, level, cells)

    def candidate_masks(self, out, b: int, cells: torch.Tensor, mask_size, mask_thr: float, static: bool = False):
        levels, local = self.split_cells(cells)
        if static:
            # Every level's masks of every cell (clamped into the level), each cell keeping
            # its own level's: no shape depends on how the cells fall into levels.
            soft = None
            for lvl, S in enumerate(self.num_grids):
                lvl_soft = self._cell_masks(out, b, lvl, local.clamp(max=S * S - 1), size=mask_size)
                mine = (levels == lvl)[:, None, None]
                soft = torch.where(mine, lvl_soft, 0.0) if soft is None else torch.where(mine, lvl_soft, soft)
            return mask_stats(soft, mask_thr)
        empty = mask_stats(out["mask_feat"][0].new_zeros((0, *mask_size)), mask_thr)

        def level_stats(level, sel):
            if sel.numel() == 0:
                return empty
            return self._cell_masks(out, b, level, sel, size=mask_size, mask_thr=mask_thr)

        return per_level(levels, local, len(self.num_grids), level_stats, empty)


class DecoupledSOLOHead(_GridHead):
    """Decoupled SOLO: S x-maps and S y-maps per level; mask(i, j) = sigmoid(y_i)·sigmoid(x_j)."""

    nchw_towers = ("mask_convs", "mask_convs_x", "mask_convs_y")  # as SOLOHead's (the light one has one)

    def __init__(self, num_classes, in_channels=256, feat_channels=256, stacked_convs=7,
                 num_grids=(40, 36, 24, 16, 12), light: bool = False, head_dcn="none", dcn_type="DCNv2"):
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, num_grids, head_dcn, dcn_type)
        self.light = light
        if light:  # one shared tower that sees both coordinates
            self.mask_convs = _tower(in_channels, feat_channels, stacked_convs, "xy", head_dcn, dcn_type)
        else:
            self.mask_convs_x = _tower(in_channels, feat_channels, stacked_convs, "x", head_dcn, dcn_type)
            self.mask_convs_y = _tower(in_channels, feat_channels, stacked_convs, "y", head_dcn, dcn_type)
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

    def candidate_masks(self, out, b, cells, mask_size, mask_thr, static=False):
        levels, local = self.split_cells(cells)

        def factor(name, level):  # a level's S maps, each upsampled to stride 4 (as published)
            return _resize(out[name][level][b : b + 1].sigmoid(), mask_size)[0]

        if static:  # one gather from all levels' maps [ΣS, h, w]
            grid = torch.tensor(self.num_grids, device=cells.device)[levels]
            offsets = torch.tensor([0] + list(self.num_grids), device=cells.device).cumsum(0)[levels]
            ys, xs = (torch.cat([factor(name, lvl) for lvl in range(len(self.num_grids))])
                      for name in ("mask_y", "mask_x"))
            return mask_stats(ys[offsets + local // grid] * xs[offsets + local % grid], mask_thr)

        empty = out["mask_x"][0].new_zeros((0, *mask_size))

        def level_soft(level, sel):
            if sel.numel() == 0:
                return empty
            S = self.num_grids[level]
            return factor("mask_y", level)[sel // S] * factor("mask_x", level)[sel % S]

        return mask_stats(per_level(levels, local, len(self.num_grids), level_soft, empty), mask_thr)


class _MaskFeatLevel(nn.Module):
    """One level of SOLOv2's mask-feature branch: ``level`` × (conv, ×2 upsample), or one conv."""

    def __init__(self, in_channels: int, feat_channels: int, level: int, coords: bool, dcn: Optional[str] = None):
        super().__init__()
        n = max(level, 1)
        for j in range(n):
            cin = in_channels if j == 0 else feat_channels
            self.add_module(f"conv{j}", ConvModule(cin, feat_channels, 3, coords="xy" if (coords and j == 0) else None,
                                                   dcn=dcn))
        self.num_up = level

    def forward(self, x):
        for j in range(max(self.num_up, 1)):
            x = getattr(self, f"conv{j}")(x)
            if j < self.num_up:
                x = _upsample2(x)
        return x


class MaskFeatModule(nn.Module):
    """SOLOv2's unified mask features: P2..P5 each brought to stride 4, summed, 1×1 conv to E."""

    def __init__(self, in_channels=256, feat_channels=128, out_channels=256, num_levels=4, dcn: Optional[str] = None):
        super().__init__()
        self.convs_all_levels = nn.ModuleList(
            _MaskFeatLevel(in_channels, feat_channels, i, coords=(i == num_levels - 1), dcn=dcn)
            for i in range(num_levels)
        )
        self.conv_pred = ConvModule(feat_channels, out_channels, 1, dcn=dcn)

    def forward(self, feats):
        total = self.convs_all_levels[0](feats[0])
        for i in range(1, len(self.convs_all_levels)):
            total = total + self.convs_all_levels[i](feats[i])
        return self.conv_pred(total)


class SOLOV2Head(_GridHead):
    """SOLOv2: dynamic 1×1 kernels per cell applied to unified stride-4 mask features."""

    # Outputs that post-processing reads in any memory layout and float dtype:
    # ``mask_predict`` multiplies the kernels by the features' [E, H*W] view, whose rows a
    # channels-last map holds as they lie (the CPU's mask_logits GEMM reads them in bf16
    # too). The network's fast form hands it on as it is instead of converting a
    # [256, H/4, W/4] map (~50 ms at 800x1344 on 2 Zen 4 cores; ~20 ms more from bf16).
    any_layout_outputs = ("mask_feats",)

    def __init__(self, num_classes, in_channels=256, feat_channels=512, stacked_convs=4,
                 num_grids=(40, 36, 24, 16, 12), mask_feat_channels=128, mask_out_channels=256,
                 head_dcn="none", dcn_type="DCNv2", mask_feat_dcn: bool = False):
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, num_grids, head_dcn, dcn_type)
        self.mask_feature_head = MaskFeatModule(in_channels, mask_feat_channels, mask_out_channels,
                                                dcn=dcn_type if mask_feat_dcn else None)
        self.kernel_convs = _tower(in_channels, feat_channels, stacked_convs, "xy", head_dcn, dcn_type)
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

    def candidate_masks(self, out, b, cells, mask_size, mask_thr, static=False):
        feats = out["mask_feats"][b]
        if static:  # one gather from all levels' kernels [E, ΣS²]
            kernels = torch.cat([k[b].reshape(k.shape[1], -1) for k in out["kernels"]], 1)[:, cells].t()
        else:
            levels, local = self.split_cells(cells)
            kernels = per_level(levels, local, len(self.num_grids), lambda lvl, sel: self._kernels(out, b, lvl, sel),
                                feats.new_zeros((0, feats.shape[0])))
        return ops.mask_predict(feats, kernels, mask_thr=mask_thr)


def build_head(cfg: dict) -> nn.Module:
    # Configs written before DCN (no head_dcn / dcn_type / mask_feat_dcn) have none.
    common = dict(num_classes=cfg["num_classes"], in_channels=cfg["fpn_channels"], feat_channels=cfg["feat_channels"],
                  stacked_convs=cfg["stacked_convs"], num_grids=cfg["num_grids"],
                  head_dcn=cfg["head_dcn"], dcn_type=cfg["dcn_type"])
    kind = cfg["head"]
    if kind == "solo":
        return SOLOHead(**common)
    if kind in ("decoupled", "decoupled_light"):
        return DecoupledSOLOHead(**common, light=kind == "decoupled_light")
    if kind == "solov2":
        return SOLOV2Head(**common, mask_feat_channels=cfg["mask_feat_channels"],
                          mask_out_channels=cfg["mask_out_channels"], mask_feat_dcn=cfg["mask_feat_dcn"])
    raise ValueError(f"head: expected 'solo', 'decoupled', 'decoupled_light' or 'solov2', got {kind!r}")
