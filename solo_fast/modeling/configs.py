"""Named configurations with the published hyperparameters (mmdetection ``configs/solo``,
``configs/solov2``; the original SOLO repository's ``configs/solo``, ``configs/solov2`` for
the models mmdetection does not have)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, Tuple

from .._checks import is_int as _is_int, is_number as _is_number, python_scalar

SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
SCALE_RANGES_DECOUPLED_LIGHT = ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048))
SCALE_RANGES_SOLOV2_LIGHT = ((1, 56), (28, 112), (56, 224), (112, 448), (224, 896))
# Short sides of the published multi-scale training (``RandomChoiceResize`` of the 3x / ms-3x
# configs; long side max_size). The 1x configs train at min_size alone: train_min_size=(800,).
TRAIN_MIN_SIZE = (800, 768, 736, 704, 672, 640)
TRAIN_MIN_SIZE_LIGHT = (512, 480, 448, 416, 384, 352)

# Deformable convs in stages c3-c5 (layer2..layer4): the published DCN models'
# ``stage_with_dcn=(False, True, True, True)``.
DCN_C3_C5 = (False, True, True, True)

BASE: Dict[str, Any] = dict(
    depth=50,
    # ResNeXt (mmdetection's ResNeXt groups / base_width; groups=1 is a ResNet)
    groups=1,
    base_width=4,
    # Deformable convolutions (mmdetection's backbone dcn / stage_with_dcn, SOLOv2Head's
    # dcn_cfg / dcn_apply_to_all_conv, mask_feature_head's conv_cfg): dcn_type "DCNv2"
    # (modulated) or "DCN" (v1); stage_with_dcn: layer1..layer4; head_dcn: "none", "all"
    # (every conv of the towers) or "last" (the last conv of each tower); mask_feat_dcn:
    # every conv of SOLOv2's mask-feature branch.
    dcn_type="DCNv2",
    stage_with_dcn=(False, False, False, False),
    head_dcn="none",
    mask_feat_dcn=False,
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
    # input transform (mmdetection's pipelines): at test, shorter side to min_size, longer side
    # at most max_size; in training, the shorter side drawn from train_min_size per image, then
    # a horizontal flip with probability flip_prob. Overriding min_size alone trains at it too.
    min_size=800,
    max_size=1333,
    train_min_size=TRAIN_MIN_SIZE,
    flip_prob=0.5,
    size_divisor=32,
    # inference defaults
    score_thr=0.1,
    mask_thr=0.5,
    nms_pre=500,
    filter_thr=0.05,
    nms_kernel="gaussian",
    nms_sigma=2.0,
    max_per_img=100,
    mask_chunk=512,  # candidate cells whose masks are computed at once (memory, not results)
    precision="fp32",  # "bf16": the network under bf16 autocast (SOLO.predict)
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
        scale_ranges=SCALE_RANGES_DECOUPLED_LIGHT, min_size=512, max_size=852, train_min_size=TRAIN_MIN_SIZE_LIGHT,
    ),
    "solov2": dict(head="solov2", stacked_convs=4, feat_channels=512, mask_feat_channels=128, mask_out_channels=256),
    "solov2_light": dict(
        head="solov2", stacked_convs=2, feat_channels=256, mask_feat_channels=128, mask_out_channels=128,
        scale_ranges=SCALE_RANGES_SOLOV2_LIGHT, min_size=448, max_size=768, train_min_size=TRAIN_MIN_SIZE_LIGHT,
    ),
}

CONFIGS: Dict[str, Dict[str, Any]] = {}
for _family, _spec in _FAMILIES.items():
    for _depth in (18, 34, 50, 101):
        CONFIGS[f"{_family}_r{_depth}_fpn"] = {**BASE, **_spec, "depth": _depth}

# The deformable-conv (and ResNeXt) models. mmdetection (configs/solov2/*-dcn_*):
# solov2_r101-dcn_fpn_ms-3x_coco and solov2_x101-dcn_fpn_ms-3x_coco: SOLOv2 with DCNv2 in
# c3-c5, in every conv of both towers (dcn_apply_to_all_conv=True) and of the mask-feature
# branch (conv_cfg=dict(type='DCNv2')); x101: ResNeXt-101 64x4d. The original repository's
# SOLOv2_R101_DCN_3x / SOLOv2_X101_DCN_3x are the same networks.
_SOLOV2_DCN = dict(_FAMILIES["solov2"], depth=101, stage_with_dcn=DCN_C3_C5, head_dcn="all", mask_feat_dcn=True)
CONFIGS["solov2_r101_dcn_fpn"] = {**BASE, **_SOLOV2_DCN}
CONFIGS["solov2_x101_dcn_fpn"] = {**BASE, **_SOLOV2_DCN, "groups": 64, "base_width": 4}
# solov2-light_r50-dcn_fpn_ms-3x_coco: the Light input (768x448) and mask features
# (E = 128), but 3 stacked convs of 256 and Decoupled SOLO Light's scale ranges; DCNv2 in
# c3-c5 and in the last conv of each tower only (dcn_apply_to_all_conv=False), none in the
# mask-feature branch.
_SOLOV2_LIGHT_DCN = dict(_FAMILIES["solov2_light"], depth=50, stacked_convs=3,
                         scale_ranges=SCALE_RANGES_DECOUPLED_LIGHT, stage_with_dcn=DCN_C3_C5, head_dcn="last")
CONFIGS["solov2_light_r50_dcn_fpn"] = {**BASE, **_SOLOV2_LIGHT_DCN}
# The original repository's light DCN models use mmdetection 1.x's "DCN" = DCNv1
# (DeformConvPack: offsets, no mask) and the 852x512 input:
# SOLOv2_Light_512_DCN_R50_3x (solov2_light_512_dcn_r50_fpn_8gpu_3x.py): otherwise the
# network of solov2_light_r50_dcn_fpn;
CONFIGS["solov2_light_512_r50_dcn_fpn"] = {**BASE, **_SOLOV2_LIGHT_DCN, "dcn_type": "DCN", "min_size": 512,
                                           "max_size": 852}
# Decoupled_SOLO_Light_DCN_R50_3x (decoupled_solo_light_dcn_r50_fpn_8gpu_3x.py): Decoupled
# SOLO Light with DCNv1 in c3-c5 and in the last conv of each tower.
CONFIGS["decoupled_solo_light_r50_dcn_fpn"] = {**BASE, **_FAMILIES["decoupled_solo_light"], "depth": 50,
                                               "stage_with_dcn": DCN_C3_C5, "head_dcn": "last", "dcn_type": "DCN"}

# Keys that describe the architecture; everything else is a run-time setting.
ARCH_KEYS = ("depth", "groups", "base_width", "dcn_type", "stage_with_dcn", "head_dcn", "mask_feat_dcn",
             "fpn_channels", "head", "stacked_convs", "feat_channels", "num_grids", "mask_feat_channels",
             "mask_out_channels")
# Settings added after the first checkpoints were written: a saved config without them
# has their defaults (a plain ResNet, no deformable convs).
LATER_DEFAULTS = {k: BASE[k] for k in ("groups", "base_width", "dcn_type", "stage_with_dcn", "head_dcn",
                                       "mask_feat_dcn", "precision")}
TEST_KEYS = ("score_thr", "mask_thr", "nms_pre", "filter_thr", "max_per_img", "mask_chunk", "precision")
PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """What post-processing (and export) read: DESIGN.md §1's inference settings, checked
    on construction. ``predict``'s keyword overrides are :meth:`replace` of the model's."""

    score_thr: float = 0.1
    mask_thr: float = 0.5
    nms_pre: int = 500
    filter_thr: float = 0.05
    nms_kernel: str = "gaussian"
    nms_sigma: float = 2.0
    max_per_img: int = 100
    mask_chunk: int = 512
    precision: str = "fp32"

    def __post_init__(self):
        for key in ("score_thr", "mask_thr", "filter_thr"):
            if not _is_number(getattr(self, key)) or not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key}: expected a number in [0, 1], got {getattr(self, key)!r}")
        for key in ("nms_pre", "max_per_img", "mask_chunk"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise ValueError(f"{key}: expected a positive int, got {getattr(self, key)!r}")
        if self.nms_kernel not in ("gaussian", "linear"):
            raise ValueError(f"nms_kernel: expected 'gaussian' or 'linear', got {self.nms_kernel!r}")
        if not _is_number(self.nms_sigma) or self.nms_sigma <= 0:
            raise ValueError(f"nms_sigma: expected a positive number, got {self.nms_sigma!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")

    @classmethod
    def from_config(cls, cfg: Dict[str, Any]) -> "InferenceSettings":
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})

    def replace(self, **overrides: Any) -> "InferenceSettings":
        """These settings with ``overrides`` (only ``TEST_KEYS``) applied and checked."""
        for key in overrides:
            if key not in TEST_KEYS:
                raise ValueError(f"{key}: not an inference setting; expected one of {TEST_KEYS}")
        return dataclasses.replace(self, **{k: python_scalar(v) for k, v in overrides.items()})


def get_config(name: str, **overrides: Any) -> Dict[str, Any]:
    """The named config with ``overrides`` applied; unknown names or keys raise ValueError."""
    if not isinstance(name, str) or name not in CONFIGS:
        raise ValueError(f"config: unknown config name {name!r}; expected one of {sorted(CONFIGS)}")
    cfg = copy.deepcopy(CONFIGS[name])
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"{key}: not a setting of config {name!r}; known settings: {sorted(cfg)}")
        cfg[key] = python_scalar(value)  # numpy scalars, 0-d tensors: plain numbers before the checks
    if "min_size" in overrides and "train_min_size" not in overrides and _is_int(cfg["min_size"]):
        # A test scale of the user's own with no training scales given: train at it too,
        # rather than at the published scales of another input size.
        cfg["train_min_size"] = (cfg["min_size"],)
    if _is_int(cfg["train_min_size"]):
        cfg["train_min_size"] = (cfg["train_min_size"],)
    elif isinstance(cfg["train_min_size"], list):
        cfg["train_min_size"] = tuple(cfg["train_min_size"])
    if isinstance(cfg["stage_with_dcn"], list):
        cfg["stage_with_dcn"] = tuple(cfg["stage_with_dcn"])
    check_values(cfg)
    if len(cfg["num_grids"]) != len(cfg["strides"]) or len(cfg["scale_ranges"]) != len(cfg["strides"]):
        raise ValueError("num_grids, strides, scale_ranges: expected one entry per FPN level (5)")
    cfg["name"] = name
    return cfg


def check_values(cfg: Dict[str, Any]) -> None:
    """Types and ranges of every setting, so a bad override fails here, naming the setting,
    rather than deep inside the model."""

    def fail(key, expected):
        raise ValueError(f"{key}: expected {expected}, got {cfg[key]!r}")

    def ints(key, lo=1):
        v = cfg[key]
        if not isinstance(v, (list, tuple)) or not v or not all(_is_int(x) and x >= lo for x in v):
            fail(key, f"a non-empty list of ints >= {lo}")

    if cfg["depth"] not in (18, 34, 50, 101) or not _is_int(cfg["depth"]):
        fail("depth", "one of 18, 34, 50, 101")
    for key in ("groups", "base_width"):
        if not _is_int(cfg[key]) or cfg[key] < 1:
            fail(key, "a positive int")
    if cfg["groups"] > 1 and cfg["depth"] not in (50, 101):
        fail("groups", f"1 for depth {cfg['depth']} (ResNeXt has Bottlenecks: depth 50 or 101)")
    if cfg["dcn_type"] not in ("DCNv2", "DCN"):
        fail("dcn_type", "'DCNv2' (modulated) or 'DCN' (v1)")
    dcn = cfg["stage_with_dcn"]
    if not isinstance(dcn, (list, tuple)) or len(dcn) != 4 or not all(isinstance(x, bool) for x in dcn):
        fail("stage_with_dcn", "4 bools (layer1..layer4)")
    if any(dcn) and cfg["depth"] not in (50, 101):
        fail("stage_with_dcn", f"no deformable stages for depth {cfg['depth']} (BasicBlocks have none; "
                               "depth 50 or 101)")
    if cfg["head_dcn"] not in ("none", "all", "last"):
        fail("head_dcn", "'none', 'all' (every conv of the towers) or 'last' (the last conv of each tower)")
    if not isinstance(cfg["mask_feat_dcn"], bool):
        fail("mask_feat_dcn", "a bool")
    if cfg["mask_feat_dcn"] and cfg["head"] != "solov2":
        fail("mask_feat_dcn", f"False for head {cfg['head']!r} (only SOLOv2 has a mask-feature branch)")
    if not _is_int(cfg["frozen_stages"]) or not -1 <= cfg["frozen_stages"] <= 4:
        fail("frozen_stages", "an int in [-1, 4]")
    if not isinstance(cfg["norm_eval"], bool):
        fail("norm_eval", "a bool")
    if cfg["head"] not in ("solo", "decoupled", "decoupled_light", "solov2"):
        fail("head", "'solo', 'decoupled', 'decoupled_light' or 'solov2'")
    for key in ("fpn_channels", "stacked_convs"):
        if not _is_int(cfg[key]) or cfg[key] < 1:
            fail(key, "a positive int")
    for key in ("feat_channels", "mask_feat_channels", "mask_out_channels"):  # GroupNorm(32) layers
        if not _is_int(cfg[key]) or cfg[key] < 32 or cfg[key] % 32:
            fail(key, "a positive multiple of 32 (GroupNorm with 32 groups)")
    ints("strides")
    ints("num_grids")
    ranges = cfg["scale_ranges"]
    if not isinstance(ranges, (list, tuple)) or not all(
        isinstance(r, (list, tuple)) and len(r) == 2 and all(_is_number(x) for x in r) and 0 <= r[0] <= r[1]
        for r in ranges
    ):
        fail("scale_ranges", "(lo, hi) pairs of numbers with 0 <= lo <= hi")
    if not _is_number(cfg["pos_scale"]) or not 0 <= cfg["pos_scale"] <= 1:
        fail("pos_scale", "a number in [0, 1]")
    for key in ("min_size", "max_size", "size_divisor"):
        if not _is_int(cfg[key]) or cfg[key] < 1:
            fail(key, "a positive int")
    # After min_size: with min_size alone overridden, get_config trains at it (train_min_size =
    # (min_size,)), so a bad min_size must be named as itself, not as the scales made from it.
    ints("train_min_size")
    for key in ("focal_alpha", "flip_prob"):
        if not _is_number(cfg[key]) or not 0 <= cfg[key] <= 1:
            fail(key, "a number in [0, 1]")
    InferenceSettings.from_config(cfg)  # the inference settings' own rules
    for key in ("focal_gamma", "cls_loss_weight", "mask_loss_weight"):
        if not _is_number(cfg[key]) or cfg[key] < 0:
            fail(key, "a non-negative number")


# --------------------------------------------------------------------------------------
# The typed, frozen form of a config (what the model holds); the flat dict above is its
# serialised form (``to_dict``: checkpoints' metadata, ``config.json``).
@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """What the weights' shapes and the backbone's freezing depend on."""

    depth: int
    frozen_stages: int
    norm_eval: bool
    groups: int
    base_width: int
    dcn_type: str
    stage_with_dcn: Tuple[bool, ...]
    head_dcn: str
    mask_feat_dcn: bool
    fpn_channels: int
    head: str
    stacked_convs: int
    feat_channels: int
    strides: Tuple[int, ...]
    num_grids: Tuple[int, ...]
    mask_feat_channels: int
    mask_out_channels: int


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """The input transform: test scale, training scales and flip, padding."""

    min_size: int
    max_size: int
    train_min_size: Tuple[int, ...]
    flip_prob: float
    size_divisor: int


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Target assignment and the losses."""

    scale_ranges: Tuple[Tuple[float, float], ...]
    pos_scale: float
    focal_alpha: float
    focal_gamma: float
    cls_loss_weight: float
    mask_loss_weight: float


_GROUPS = {"arch": ArchConfig, "input": InputConfig, "loss": LossConfig, "inference": InferenceSettings}


@dataclasses.dataclass(frozen=True)
class SOLOConfig:
    """A model's settings, checked once (:func:`check_values`) and then immutable:
    ``config.arch.depth``, ``config.input.min_size``, ``config.inference.score_thr``, ...
    ``to_dict``/``from_dict`` convert to and from the flat dict of :func:`get_config`."""

    name: str
    num_classes: int
    arch: ArchConfig
    input: InputConfig
    loss: LossConfig
    inference: InferenceSettings

    @classmethod
    def from_dict(cls, cfg: Dict[str, Any]) -> "SOLOConfig":
        cfg = {**LATER_DEFAULTS, **cfg}
        for key in ("strides", "num_grids", "train_min_size", "stage_with_dcn"):
            cfg[key] = tuple(cfg[key])
        cfg["scale_ranges"] = tuple(tuple(r) for r in cfg["scale_ranges"])
        check_values(cfg)
        if not _is_int(cfg.get("num_classes")) or cfg["num_classes"] <= 0:
            raise ValueError(f"num_classes: expected a positive int, got {cfg.get('num_classes')!r}")
        groups = {g: kind(**{f.name: cfg[f.name] for f in dataclasses.fields(kind)}) for g, kind in _GROUPS.items()}
        return cls(name=cfg["name"], num_classes=cfg["num_classes"], **groups)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name, "num_classes": self.num_classes}
        for group in _GROUPS:
            out.update(dataclasses.asdict(getattr(self, group)))
        return out

    def replace(self, **settings: Any) -> "SOLOConfig":
        """These settings with flat ``settings`` (any keys of :data:`BASE`) replaced, checked."""
        unknown = [k for k in settings if k not in BASE]
        if unknown:
            raise ValueError(f"{unknown[0]}: not a setting; known settings: {sorted(BASE)}")
        return SOLOConfig.from_dict({**self.to_dict(), **{k: python_scalar(v) for k, v in settings.items()}})

