"""Named configurations with the published hyperparameters (mmdetection ``configs/solo``,
``configs/solov2``)."""
from __future__ import annotations

import copy
from typing import Any, Dict

SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
SCALE_RANGES_DECOUPLED_LIGHT = ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048))
SCALE_RANGES_SOLOV2_LIGHT = ((1, 56), (28, 112), (56, 224), (112, 448), (224, 896))

BASE: Dict[str, Any] = dict(
    depth=50,
    frozen_stages=1,  # stem + layer1 frozen (-1: nothing frozen, e.g. training from scratch)
    norm_eval=True,  # BatchNorm uses its running statistics in training too (mmdetection's norm_eval)
    fpn_channels=256,
    head="solo",
    stacked_convs=7,
    feat_channels=256,
    strides=(8, 8, 16, 32, 32),
    num_grids=(40, 36, 24, 16, 12),
    scale_ranges=SCALE_RANGES,
    pos_scale=0.2,
    # SOLOv2 mask-feature branch (ignored by the other heads)
    mask_feat_channels=128,
    mask_out_channels=256,
    # input transform: shorter side to min_size, longer side at most max_size
    min_size=800,
    max_size=1333,
    size_divisor=32,
    # inference defaults
    score_thr=0.1,
    mask_thr=0.5,
    nms_pre=500,
    filter_thr=0.05,
    nms_kernel="gaussian",
    nms_sigma=2.0,
    max_per_img=100,
    # losses
    focal_alpha=0.25,
    focal_gamma=2.0,
    cls_loss_weight=1.0,
    mask_loss_weight=3.0,
)

_FAMILIES: Dict[str, Dict[str, Any]] = {
    "solo": dict(head="solo", stacked_convs=7, feat_channels=256),
    "decoupled_solo": dict(head="decoupled", stacked_convs=7, feat_channels=256),
    "decoupled_solo_light": dict(
        head="decoupled_light", stacked_convs=4, feat_channels=256,
        scale_ranges=SCALE_RANGES_DECOUPLED_LIGHT, min_size=512, max_size=852,
    ),
    "solov2": dict(head="solov2", stacked_convs=4, feat_channels=512, mask_feat_channels=128, mask_out_channels=256),
    "solov2_light": dict(
        head="solov2", stacked_convs=2, feat_channels=256, mask_feat_channels=128, mask_out_channels=128,
        scale_ranges=SCALE_RANGES_SOLOV2_LIGHT, min_size=448, max_size=768,
    ),
}

CONFIGS: Dict[str, Dict[str, Any]] = {}
for _family, _spec in _FAMILIES.items():
    for _depth in (18, 34, 50, 101):
        CONFIGS[f"{_family}_r{_depth}_fpn"] = {**BASE, **_spec, "depth": _depth}

# Keys that describe the architecture; everything else is a run-time setting.
ARCH_KEYS = ("depth", "fpn_channels", "head", "stacked_convs", "feat_channels", "num_grids",
             "mask_feat_channels", "mask_out_channels")
TEST_KEYS = ("score_thr", "mask_thr", "nms_pre", "filter_thr", "max_per_img")


def get_config(name: str, **overrides: Any) -> Dict[str, Any]:
    """The named config with ``overrides`` applied; unknown names or keys raise ValueError."""
    if not isinstance(name, str) or name not in CONFIGS:
        raise ValueError(f"config: unknown config name {name!r}; expected one of {sorted(CONFIGS)}")
    cfg = copy.deepcopy(CONFIGS[name])
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"{key}: not a setting of config {name!r}; known settings: {sorted(cfg)}")
        cfg[key] = value
    if len(cfg["num_grids"]) != len(cfg["strides"]) or len(cfg["scale_ranges"]) != len(cfg["strides"]):
        raise ValueError("num_grids, strides, scale_ranges: expected one entry per FPN level (5)")
    cfg["name"] = name
    return cfg
