"""Weights of mmdetection 3.x and of the original SOLO repository for ``SOLO.from_mmdet``.

Two public checkpoint layouts exist for the SOLO family:

- **mmdetection** (2.x and 3.x; ``mmdet/models/dense_heads/solo_head.py``,
  ``solov2_head.py``): detector attributes ``backbone``, ``neck`` and ``mask_head``.
  solo_fast names its modules after mmdetection's (ResNet = torchvision names, FPN
  ``lateral_convs.i.conv`` / ``fpn_convs.i.conv``, ConvModule ``conv`` / ``gn``, head
  ``cls_convs``, ``mask_convs``, ``conv_mask_list``, ``conv_cls``, ``kernel_convs``,
  ``conv_kernel``, ``mask_feature_head.convs_all_levels.i.convj``, ...), so every key keeps
  its name.
- **the original SOLO repository** (WXinlong/SOLO, built on mmdetection 1.x;
  ``mmdet/models/anchor_heads/*solo*_head.py``, ``mmdet/models/mask_heads/mask_feat_head.py``):
  the head is the detector's ``bbox_head`` with other layer names, and SOLOv2's
  mask-feature branch is a separate top-level ``mask_feat_head``. :data:`SOLO_REPO_RULES`
  renames them.

Deformable convolutions and ResNeXt keep these names in both layouts. A DCN layer
(mmcv's ``ModulatedDeformConv2dPack`` "DCNv2" / ``DeformConv2dPack`` "DCN", mmdetection
1.x's ``mmdet/ops/dcn`` ``ModulatedDeformConvPack`` / ``DeformConvPack``) holds ``weight``
(``bias`` only without a norm after it: none in the SOLO family) and its offset conv
``conv_offset.{weight,bias}`` (3·k² channels for DCNv2, 2·k² for DCN) where a plain conv
would be: ``backbone.layerN.i.conv2.conv_offset.*`` (stages with DCN),
``mask_head.{cls,kernel,mask}_convs.i.conv.conv_offset.*`` (the towers),
``mask_head.mask_feature_head.*.conv.conv_offset.*`` (SOLOv2's mask-feature branch);
solo_fast's :class:`~solo_fast.modeling.layers.DeformConv2d` has the same names. Files of
mmcv's DCN "version < 2" name the offset conv ``<conv>_offset`` next to the conv (e.g.
``layer2.0.conv2_offset.weight``); they are renamed as mmcv's own ``_load_from_state_dict``
does. ResNeXt (``groups``, ``base_width``) changes only the Bottlenecks' widths; its keys
are ResNet's. The architecture a checkpoint shows (:func:`_arch_of`: head, depth, ResNeXt
groups, where its DCN layers are and of which type, tower depth and widths) is checked
against the config before any tensor is copied, and names the config it fits.

Background class: both layouts have exactly one class-conv row per foreground class, row
``k`` scoring (0-based, contiguous) class ``k``. mmdetection counts ``num_classes`` that
way (80 for COCO). The SOLO repository sets ``num_classes=81`` in its configs, counting
the background, but its class conv has ``cate_out_channels = num_classes - 1`` rows (its
focal loss takes 1-based labels with 0 = background, and label ``k`` trains row ``k - 1``),
so there is no background row to drop and no shift. solo_fast's ``num_classes`` always
counts foreground classes only: it is read from the class conv's rows, and an explicit
``num_classes`` that disagrees (e.g. 81 for a COCO checkpoint) raises a ``ValueError``
that says so.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..modeling import configs
from ..modeling.backbone import ARCHS, Bottleneck, describe as describe_backbone, stage_span

# ---------------------------------------------------------------------------- key rules

# The original SOLO repository -> solo_fast, applied to the start of each key, first match
# wins (``ins_convs\.`` cannot match ``ins_convs_x.``). ``backbone.*`` (mmdetection 1.x
# ResNet: conv1/bn1/layerN.i.{conv,bn}K/downsample.{0,1}) and ``neck.*`` (FPN
# lateral_convs/fpn_convs, ConvModule ``conv``) already have our names.
SOLO_REPO_RULES: List[Tuple[str, str]] = [
    # SOLO and Decoupled SOLO Light: the CoordConv mask tower (first conv has C + 2 inputs).
    (r"bbox_head\.ins_convs\.", "mask_head.mask_convs."),
    # Decoupled SOLO: one tower per coordinate (first conv has C + 1 inputs).
    (r"bbox_head\.ins_convs_x\.", "mask_head.mask_convs_x."),
    (r"bbox_head\.ins_convs_y\.", "mask_head.mask_convs_y."),
    # Class branch of every head ("cate" = category).
    (r"bbox_head\.cate_convs\.", "mask_head.cls_convs."),
    (r"bbox_head\.(?:solo|dsolo)_cate\.", "mask_head.conv_cls."),
    # SOLO: the per-level 1x1 convs to S^2 masks.
    (r"bbox_head\.solo_ins_list\.", "mask_head.conv_mask_list."),
    # Decoupled SOLO (and Light): the per-level 3x3 convs to S x-maps and S y-maps.
    (r"bbox_head\.dsolo_ins_list_x\.", "mask_head.conv_mask_list_x."),
    (r"bbox_head\.dsolo_ins_list_y\.", "mask_head.conv_mask_list_y."),
    # SOLOv2 (and Light): the kernel branch.
    (r"bbox_head\.kernel_convs\.", "mask_head.kernel_convs."),
    (r"bbox_head\.solo_kernel\.", "mask_head.conv_kernel."),
    # SOLOv2's mask-feature branch is a top-level module there; its conv_pred is an
    # nn.Sequential holding one ConvModule (hence the ".0").
    (r"mask_feat_head\.conv_pred\.0\.", "mask_head.mask_feature_head.conv_pred."),
    (r"mask_feat_head\.convs_all_levels\.", "mask_head.mask_feature_head.convs_all_levels."),
]
_SOLO_REPO_RULES = [(re.compile(pattern), repl) for pattern, repl in SOLO_REPO_RULES]

FORMATS = {"mmdet": "mmdetection (keys 'mask_head.*')",
           "solo": "the original SOLO repository (keys 'bbox_head.*', 'mask_feat_head.*')",
           "solo_fast": "solo_fast's own .safetensors (SOLO.save_pretrained; mmdetection's key names)"}
HEAD_NAMES = {"solo": "SOLO", "decoupled": "Decoupled SOLO", "decoupled_light": "Decoupled SOLO Light",
              "solov2": "SOLOv2"}

# Checkpoint keys that carry nothing for solo_fast: mmengine's data preprocessor
# (mean/std, which our InputTransform owns).
_IGNORED_PREFIXES = ("data_preprocessor.",)

# numpy scalars and dtypes turn up in mmcv checkpoint metadata (e.g. a best score); they
# hold plain numbers, so they are allowed in addition to torch.load's weights_only set.
@functools.lru_cache(maxsize=1)
def _numpy_safe_globals() -> Optional[tuple]:
    if not hasattr(torch.serialization, "safe_globals"):  # torch 2.4: only the default set
        return None
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch in practice
        return None
    core = getattr(np, "_core", None) or np.core  # numpy 2.x, numpy 1.x
    scalar = core.multiarray.scalar
    # numpy >= 1.25 pickles a dtype's class (numpy.dtypes.Float64DType, ...) too; object
    # and structured dtypes, which could wrap arbitrary objects, stay refused.
    plain = [np.dtype] + [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", None))
                          if n.endswith("DType") and n not in ("ObjectDType", "VoidDType")]
    # Files written under numpy 1.x name the scalar "numpy.core...", under 2.x "numpy._core...";
    # the (object, name) form of the allowlist takes both, where this torch supports it.
    both = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")] + plain
    probe = io.BytesIO()
    torch.save({"x": np.float64(0.5)}, probe)
    try:
        probe.seek(0)
        with torch.serialization.safe_globals(both):
            torch.load(probe, weights_only=True)
        return tuple(both)
    except Exception:
        return tuple([scalar] + plain)


@dataclass
class LoadReport:
    """What :meth:`SOLO.from_mmdet` did with a checkpoint (``model.load_report``)."""

    format: str  # "mmdet", "solo" or "solo_fast" (see FORMATS)
    missing: List[str] = field(default_factory=list)  # solo_fast keys left at their initial values
    unexpected: List[str] = field(default_factory=list)  # checkpoint keys (their own names) not loaded
    ignored: List[str] = field(default_factory=list)  # checkpoint entries skipped on purpose (no weights)

    def __str__(self) -> str:
        def listed(keys: List[str]) -> str:
            more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
            return f"{keys[:10]}{more}"

        return (f"format {self.format!r}: {len(self.missing)} missing key(s) {listed(self.missing)}, "
                f"{len(self.unexpected)} unexpected key(s) {listed(self.unexpected)}")


@dataclass
class Checkpoint:
    """A checkpoint's tensors under solo_fast names, and where each came from."""

    path: str
    format: str
    state: Dict[str, torch.Tensor]  # solo_fast key -> tensor
    source: Dict[str, str]  # solo_fast key -> key in the checkpoint
    unmapped: List[str]  # checkpoint keys with no solo_fast counterpart
    ignored: List[str]
    class_names: Optional[List[str]] = None
    category_ids: Optional[List[int]] = None  # solo_fast checkpoints of a COCO-format dataset
    config: Optional[dict] = None  # solo_fast checkpoints: the model's config

    def name(self, key: str) -> str:
        """The checkpoint's own name of a solo_fast key (for messages)."""
        src = self.source.get(key, key)
        return src if src == key else f"{src} (solo_fast: {key})"


# ---------------------------------------------------------------------------- reading


@dataclass
class RawCheckpoint:
    """A checkpoint file's tensors under the file's own names, before any renaming."""

    path: str
    state: Dict[str, torch.Tensor]
    ignored: List[str]  # entries that are no tensors (an optimizer's step count, a version string, ...)
    meta: Optional[dict]  # mmcv/mmengine "meta", or a safetensors file's metadata (str -> str)


def read_state_dict(path, arg: str = "path") -> RawCheckpoint:
    """The weights of any checkpoint file: ``.pth``/``.pt`` via ``torch.load(weights_only=True)``
    (a state dict, or one under ``"state_dict"``; a DDP ``module.`` prefix dropped) or
    ``.safetensors``. ``arg`` names the argument in error messages."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{arg}: expected the path of a checkpoint file, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{arg}: no checkpoint at {path!r}")
    raw, meta = _load_file(path, arg)
    state, ignored = _state_dict_of(raw, path, arg)
    return RawCheckpoint(path, state, ignored, meta)


def read_checkpoint(path, arg: str = "path") -> Checkpoint:
    """Loads ``path`` (see :func:`read_state_dict`) and renames its keys to solo_fast's."""
    raw = read_state_dict(path, arg)
    path, state, ignored = raw.path, raw.state, list(raw.ignored)
    fmt = detect_format(state, path, arg)
    converted, source, unmapped = {}, {}, []
    for key, tensor in state.items():
        if key.startswith(_IGNORED_PREFIXES):
            ignored.append(key)
            continue
        new = convert_key(_current_offset_name(key, state), fmt)
        if new is None:
            unmapped.append(key)
        else:
            converted[new] = tensor
            source[new] = key
    if not any(k.startswith("mask_head.") for k in converted):
        raise ValueError(f"{arg}: {path!r} is not a SOLO-family checkpoint: none of its 'bbox_head.*' keys is a "
                         f"layer of the SOLO repository's heads (e.g. {sorted(unmapped)[:3]})")
    config = _solo_fast_config(raw.meta)
    return Checkpoint(path, "solo_fast" if config is not None else fmt, converted, source, unmapped, ignored,
                      _class_names(raw.meta), _category_ids(raw.meta), config)


def _load_file(path: str, arg: str = "path"):
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata()
            return load_file(path, device="cpu"), meta
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{arg}: {path!r} is not a readable safetensors file ({e})") from e
    allow = _numpy_safe_globals()
    try:
        with torch.serialization.safe_globals(list(allow)) if allow else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message ends with the unpickler's own reason; refused globals (classes,
        # functions) mean a checkpoint with Python objects, anything else a file that is no
        # checkpoint at all (e.g. "Unsupported operand" on text).
        detail = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
        found = _unsafe_globals(path)
        if not found and not re.search(r"global|can only build", detail, re.IGNORECASE):
            raise ValueError(f"{arg}: {path!r} is not a PyTorch checkpoint ({detail or e})") from e
        raise ValueError(
            f"{arg}: {path!r} holds Python objects that torch.load(weights_only=True) refuses to load"
            f" ({', '.join(found) if found else detail}); solo_fast loads no code from a checkpoint. "
            "If you trust the file, keep only its weights: torch.save(torch.load(path, weights_only=False)"
            "['state_dict'], 'weights.pth')") from e
    except Exception as e:  # not a zip or pickle at all: KeyError, EOFError, RuntimeError, ...
        raise ValueError(f"{arg}: {path!r} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    meta = obj.get("meta") if isinstance(obj, dict) else None
    return obj, meta


def _unsafe_globals(path: str) -> List[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) files, older torch
        return []


def _state_dict_of(obj, path: str, arg: str = "path") -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The weights of a checkpoint: ``obj["state_dict"]`` (mmcv/mmengine), or ``obj`` itself."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{arg}: {path!r} is not a checkpoint: expected a state dict of tensors or a dict with "
                         f"a 'state_dict' entry, got {what}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    ignored = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    # Saved from a DataParallel/DDP wrapper: every key starts with "module.".
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, ignored


def _json_meta(meta, key: str):
    """A JSON value of a solo_fast safetensors file's metadata (str -> str), or None."""
    if not isinstance(meta, dict) or not isinstance(meta.get(key), str):
        return None
    try:
        return json.loads(meta[key])
    except ValueError:
        return None


def _class_names(meta) -> Optional[List[str]]:
    """Class names from mmcv (``meta["CLASSES"]``), mmengine (``meta["dataset_meta"]["classes"]``)
    or a solo_fast safetensors file (``class_names``, JSON)."""
    if not isinstance(meta, dict):
        return None
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), dict):
        names = meta["dataset_meta"].get("classes")
    if names is None:
        names = _json_meta(meta, "class_names")
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def _category_ids(meta) -> Optional[List[int]]:
    ids = _json_meta(meta, "category_ids")
    if isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return ids
    return None


def _solo_fast_config(meta) -> Optional[dict]:
    cfg = _json_meta(meta, "solo_fast_config")
    return cfg if isinstance(cfg, dict) and isinstance(cfg.get("name"), str) else None


# ---------------------------------------------------------------------------- naming


def detect_format(state: Dict[str, torch.Tensor], path: str = "checkpoint", arg: str = "path") -> str:
    """``"mmdet"`` when the head is ``mask_head.*``, ``"solo"`` when it is ``bbox_head.*``."""
    mmdet = any(k.startswith("mask_head.") for k in state)
    solo = any(k.startswith(("bbox_head.", "mask_feat_head.")) for k in state)
    if mmdet and solo:
        raise ValueError(f"{arg}: {path!r} has both 'mask_head.*' (mmdetection) and 'bbox_head.*' (SOLO "
                         "repository) keys; expected one layout")
    if not (mmdet or solo):
        heads = sorted({k.split(".")[0] for k in state})
        raise ValueError(f"{arg}: {path!r} is not a SOLO-family checkpoint: expected the head under 'mask_head.' "
                         f"(mmdetection) or 'bbox_head.' (original SOLO repository), found top-level modules {heads}")
    return "mmdet" if mmdet else "solo"


def _current_offset_name(key: str, state: Dict[str, torch.Tensor]) -> str:
    """``P.X_offset.weight`` -> ``P.X.conv_offset.weight`` where ``P.X`` is a conv of the file
    (mmcv's DCN ``_load_from_state_dict`` for files before its version 2); other keys unchanged."""
    m = re.match(r"(.+)_offset\.(weight|bias)$", key)
    if m and f"{m.group(1)}.weight" in state and f"{m.group(1)}.conv_offset.{m.group(2)}" not in state:
        return f"{m.group(1)}.conv_offset.{m.group(2)}"
    return key


def convert_key(key: str, fmt: str) -> Optional[str]:
    """solo_fast's name of a checkpoint key, or None when it has none."""
    if key.startswith(("backbone.", "neck.")):
        return key
    if fmt == "mmdet":
        return key if key.startswith("mask_head.") else None
    for pattern, repl in _SOLO_REPO_RULES:
        m = pattern.match(key)
        if m:
            return repl + key[m.end():]
    return None


# ---------------------------------------------------------------------------- architecture


def _first(keys: Iterable[str], *prefixes: str) -> Optional[str]:
    return next((k for k in sorted(keys) if k.startswith(prefixes)), None)


def _head_kind(state: Dict[str, torch.Tensor]) -> Tuple[Optional[str], Optional[str]]:
    """(head kind as in configs: solo / decoupled / decoupled_light / solov2, a key that shows it)."""
    keys = list(state)
    key = _first(keys, "mask_head.conv_kernel.", "mask_head.kernel_convs.", "mask_head.mask_feature_head.")
    if key:
        return "solov2", key
    key = _first(keys, "mask_head.conv_mask_list_x.", "mask_head.conv_mask_list_y.", "mask_head.mask_convs_x.",
                 "mask_head.mask_convs_y.")
    if key:
        shared = _first(keys, "mask_head.mask_convs.")  # Light: one tower for both coordinates
        return ("decoupled_light", shared) if shared else ("decoupled", key)
    key = _first(keys, "mask_head.conv_mask_list.", "mask_head.mask_convs.")
    if key:
        return "solo", key
    return None, None


def _blocks(state: Dict[str, torch.Tensor]) -> Optional[Tuple[type, Tuple[int, ...], str]]:
    """(block type, blocks per stage, a key of the deepest block) of the checkpoint's ResNet."""
    counts, last = [], None
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in state for m in [re.match(rf"backbone\.layer{stage}\.(\d+)\.", k)] if m}
        if not idx:
            return None
        counts.append(max(idx) + 1)
        last = _first(state, f"backbone.layer{stage}.{max(idx)}.")
    block = Bottleneck if any(re.match(r"backbone\.layer\d+\.\d+\.conv3\.", k) for k in state) else None
    return block, tuple(counts), last


def _groups_of(state: Dict[str, torch.Tensor]) -> Optional[Tuple[int, int]]:
    """(groups, base_width) of the backbone's first Bottleneck (ResNeXt: groups > 1), or None."""
    w = state.get("backbone.layer1.0.conv2.weight")
    if w is None or w.dim() != 4 or "backbone.layer1.0.conv3.weight" not in state or w.shape[1] < 1:
        return None
    width, groups = int(w.shape[0]), int(w.shape[0]) // int(w.shape[1])
    # layer1's planes are 64: width = floor(64 * base_width / 64) * groups = base_width * groups
    return (groups, width // groups) if groups > 1 else (1, 4)


def _depth_of(state: Dict[str, torch.Tensor]) -> Tuple[Optional[int], Optional[str], str]:
    found = _blocks(state)
    if found is None:
        return None, None, ""
    block, counts, key = found
    kind = "Bottleneck" if block is Bottleneck else "BasicBlock"
    groups, base_width = _groups_of(state) or (1, 4)
    for depth, (arch_block, arch_counts) in ARCHS.items():
        if (arch_block is Bottleneck) == (block is Bottleneck) and tuple(arch_counts) == counts:
            return depth, key, describe_backbone(depth, groups, base_width)
    return -1, key, f"a ResNet of {kind}s {counts}"


_OFFSET = re.compile(r"(.*)\.conv_offset\.weight$")
_TOWERS = ("mask_head.cls_convs", "mask_head.kernel_convs", "mask_head.mask_convs", "mask_head.mask_convs_x",
           "mask_head.mask_convs_y")


def _dcn_type_of(weight: torch.Tensor) -> Optional[str]:
    """"DCNv2" (3 channels per tap: dy, dx, mask), "DCN" (2: dy, dx) or None (neither, e.g.
    several offset groups) from an offset conv's weight."""
    taps = int(weight.shape[2] * weight.shape[3]) if weight.dim() == 4 else 0
    return {3 * taps: "DCNv2", 2 * taps: "DCN"}.get(int(weight.shape[0])) if taps else None


@dataclass
class _DCN:
    """Where a checkpoint's deformable convs are (solo_fast key of an offset conv of each part)."""

    types: Dict[str, List[str]]  # dcn type (or "other") -> offset-conv keys of that type
    stages: Tuple[bool, ...]  # backbone layer1..layer4
    head: Optional[str]  # "none", "all", "last", or None where the towers disagree / are irregular
    head_detail: str  # the towers' DCN convs, for messages
    mask_feat: Optional[bool]  # None: no mask-feature branch
    keys: Dict[str, str]  # "backbone" / "head" / "mask_feat" -> a key there

    @property
    def dcn_type(self) -> Optional[str]:
        kinds = [t for t in self.types if t != "other"]
        return kinds[0] if len(kinds) == 1 and "other" not in self.types else None

    @property
    def any(self) -> bool:
        return bool(self.types)


def _dcn_of(state: Dict[str, torch.Tensor]) -> _DCN:
    types: Dict[str, List[str]] = {}
    keys: Dict[str, str] = {}
    for key in sorted(state):
        m = _OFFSET.match(key)
        if not m:
            continue
        types.setdefault(_dcn_type_of(state[key]) or "other", []).append(key)
        part = ("backbone" if key.startswith("backbone.") else "mask_feat"
                if key.startswith("mask_head.mask_feature_head.") else "head")
        keys.setdefault(part, key)
    stages = tuple(any(re.match(rf"backbone\.layer{s}\.\d+\.conv2\.conv_offset\.", k) for k in state)
                   for s in range(1, 5))
    towers = {}
    for tower in _TOWERS:
        idx = {int(m.group(1)) for k in state for m in [re.match(rf"{re.escape(tower)}\.(\d+)\.", k)] if m}
        if idx:
            n = max(idx) + 1
            towers[tower] = (n, sorted(i for i in idx if f"{tower}.{i}.conv.conv_offset.weight" in state))
    kinds = set()
    for n, dcn in towers.values():
        kinds.add("none" if not dcn else "all" if dcn == list(range(n)) else "last" if dcn == [n - 1] else None)
    head = kinds.pop() if len(kinds) == 1 else None
    detail = ", ".join(f"{t.split('.')[-1]} {d}" for t, (_, d) in towers.items())
    mask_feat = None
    if any(k.startswith("mask_head.mask_feature_head.") for k in state):
        mask_feat = "mask_feat" in keys
    return _DCN(types, stages, head if towers else "none", detail, mask_feat, keys)


def describe_dcn(dcn_type: Optional[str], stages: Sequence[bool], head: Optional[str], mask_feat: Optional[bool],
                 head_detail: str = "") -> str:
    """'deformable convolutions (DCNv2) in backbone stages c3-c5, every conv of the head's towers
    and the mask-feature branch', or 'no deformable convolutions'."""
    parts = []
    if any(stages):
        parts.append("backbone stages " + stage_span(stages))
    if head == "all":
        parts.append("every conv of the head's towers")
    elif head == "last":
        parts.append("the last conv of each head tower")
    elif head is None:
        parts.append(f"head tower convs no solo_fast config has ({head_detail})")
    if mask_feat:
        parts.append("the mask-feature branch")
    if not parts:
        return "no deformable convolutions"
    where = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    kind = f"({dcn_type})" if dcn_type else "of a kind solo_fast has not (several offset groups, or mixed types)"
    return f"deformable convolutions {kind} in {where}"


def _stacked_convs(state: Dict[str, torch.Tensor]) -> Tuple[Optional[int], Optional[str]]:
    idx = {int(m.group(1)) for k in state for m in [re.match(r"mask_head\.cls_convs\.(\d+)\.", k)] if m}
    if not idx:
        return None, None
    return max(idx) + 1, _first(state, f"mask_head.cls_convs.{max(idx)}.")


def _arch_of(state: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """The architecture settings a checkpoint shows (those it shows), as in :data:`configs.CONFIGS`."""
    arch: Dict[str, object] = {}
    head, _ = _head_kind(state)
    if head:
        arch["head"] = head
    depth, _, _ = _depth_of(state)
    if depth:
        arch["depth"] = depth
    groups = _groups_of(state)
    if groups:
        arch["groups"] = groups[0]
        if groups[0] > 1:
            arch["base_width"] = groups[1]
    dcn = _dcn_of(state)
    if depth:
        arch["stage_with_dcn"] = dcn.stages
    if head:
        arch["head_dcn"] = dcn.head
    if dcn.mask_feat is not None:
        arch["mask_feat_dcn"] = dcn.mask_feat
    if dcn.any:
        arch["dcn_type"] = dcn.dcn_type
    n, _ = _stacked_convs(state)
    if n:
        arch["stacked_convs"] = n
    if "mask_head.cls_convs.0.conv.weight" in state:
        arch["feat_channels"] = state["mask_head.cls_convs.0.conv.weight"].shape[0]
    if "mask_head.conv_kernel.weight" in state:
        arch["mask_out_channels"] = state["mask_head.conv_kernel.weight"].shape[0]
    return arch


def _suggest(ckpt: Checkpoint) -> str:
    arch = _arch_of(ckpt.state)
    names = [n for n, c in configs.CONFIGS.items() if all(c.get(k) == v for k, v in arch.items())]
    if not names:
        return ""
    return f"; it looks like a checkpoint for {' or '.join(repr(n) for n in names)}"


def num_classes_of(ckpt: Checkpoint, num_classes: Optional[int]) -> int:
    """``num_classes`` from the class conv's rows (one per foreground class in both layouts),
    checked against an explicit value."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes <= 0):
        raise ValueError(f"num_classes: expected a positive int or None, got {num_classes!r}")
    w = ckpt.state.get("mask_head.conv_cls.weight")
    if w is None:
        if num_classes is None:
            raise ValueError(f"num_classes: {ckpt.path!r} has no class conv to read the number of classes from; "
                             "pass num_classes")
        return num_classes
    rows = int(w.shape[0])
    if num_classes is None or num_classes == rows:
        return rows
    hint = ""
    if num_classes == rows + 1:
        hint = (" solo_fast's num_classes counts foreground classes only; "
                + ("the SOLO repository's configs count the background too (num_classes=81 for COCO) but its "
                   "class conv has num_classes - 1 rows, with no background row."
                   if ckpt.format == "solo" else "the class conv has no background row."))
    raise ValueError(f"num_classes: {ckpt.name('mask_head.conv_cls.weight')} has {rows} rows, a checkpoint for "
                     f"num_classes={rows}, got num_classes={num_classes}.{hint} Pass num_classes={rows} or leave it "
                     "None.")


def check_architecture(ckpt: Checkpoint, cfg: dict) -> None:
    """ValueError when the checkpoint is for another head, deformable-conv layout (or DCN type),
    backbone (depth, ResNet or ResNeXt) or tower depth."""
    name = cfg["name"]
    head, key = _head_kind(ckpt.state)
    if head is not None and head != cfg["head"]:
        raise ValueError(f"config: {ckpt.path!r} has a {HEAD_NAMES[head]} head (key {ckpt.source[key]!r}), config "
                         f"{name!r} has a {HEAD_NAMES[cfg['head']]} head{_suggest(ckpt)}")
    _check_dcn(ckpt, cfg)
    depth, key, desc = _depth_of(ckpt.state)
    groups = _groups_of(ckpt.state) or (cfg["groups"], cfg["base_width"])
    ours = describe_backbone(cfg["depth"], cfg["groups"], cfg["base_width"])
    if depth is not None and (depth != cfg["depth"] or desc != ours):
        if depth == cfg["depth"] and groups[0] != cfg["groups"]:
            key = "backbone.layer1.0.conv2.weight"  # the grouped conv that shows ResNeXt
        raise ValueError(f"config: {ckpt.path!r} has {desc} as backbone (key {ckpt.source[key]!r}), config "
                         f"{name!r} has {ours}{_suggest(ckpt)}")
    n, key = _stacked_convs(ckpt.state)
    if n is not None and n != cfg["stacked_convs"]:
        raise ValueError(f"config: {ckpt.path!r} has {n} stacked head convs (key {ckpt.source[key]!r}), config "
                         f"{name!r} has {cfg['stacked_convs']}{_suggest(ckpt)}")


def _check_dcn(ckpt: Checkpoint, cfg: dict) -> None:
    """ValueError when the checkpoint's deformable convs (or their type) are not the config's --
    before any other check, so a DCN checkpoint given the plain config says so first."""
    dcn = _dcn_of(ckpt.state)
    want = dict(dcn_type=cfg["dcn_type"], stages=tuple(cfg["stage_with_dcn"]),
                head=cfg["head_dcn"], mask_feat=cfg["mask_feat_dcn"])
    has_backbone = any(k.startswith("backbone.layer") for k in ckpt.state)
    has_head = any(k.startswith(_TOWERS) for k in ckpt.state)
    # Only what the checkpoint holds is compared (a head-only file says nothing of the backbone).
    differs = [part for part, same in (
        ("backbone", not has_backbone or dcn.stages == want["stages"]),
        ("head", not has_head or dcn.head == want["head"]),
        ("mask_feat", dcn.mask_feat is None or dcn.mask_feat == want["mask_feat"]),
    ) if not same]
    if not differs and (not dcn.any or dcn.dcn_type == want["dcn_type"]):
        return
    theirs = describe_dcn(dcn.dcn_type, dcn.stages if has_backbone else (False,) * 4,
                          dcn.head if has_head else "none", dcn.mask_feat, dcn.head_detail)
    mine = describe_dcn(want["dcn_type"], want["stages"], want["head"], want["mask_feat"])
    key = next((dcn.keys[p] for p in differs if p in dcn.keys), None) or next(iter(dcn.keys.values()), None)
    if not differs:  # same places, another kind of DCN
        taps = ckpt.state[key]
        theirs += f" (its offset convs have {taps.shape[0]} channels for {taps.shape[2] * taps.shape[3]} taps)"
    shown = f" (key {ckpt.name(key)})" if key else " (no '*.conv_offset.*' keys)"
    raise ValueError(f"config: {ckpt.path!r} has {theirs}{shown}, config {cfg['name']!r} has {mine}"
                     f"{_suggest(ckpt)}")


# ---------------------------------------------------------------------------- loading


def load_into(model: torch.nn.Module, ckpt: Checkpoint, strict: bool = False) -> LoadReport:
    """Copies the checkpoint's tensors into ``model`` after checking every shape; returns
    what was missing and unexpected (``strict=True``: ValueError when anything was)."""
    check_architecture(ckpt, model.cfg)
    ours = model.state_dict()
    mismatched = [k for k, v in ckpt.state.items() if k in ours and tuple(v.shape) != tuple(ours[k].shape)]
    if mismatched:
        k = mismatched[0]
        more = f" (and {len(mismatched) - 1} more key(s) of other shapes)" if len(mismatched) > 1 else ""
        raise ValueError(
            f"config: {ckpt.path!r} is a checkpoint for another config: key {ckpt.name(k)} has shape "
            f"{tuple(ckpt.state[k].shape)}, config {model.cfg['name']!r} with num_classes={model.cfg['num_classes']} "
            f"expects {tuple(ours[k].shape)}{more}{_suggest(ckpt)}")
    matched = {k: v for k, v in ckpt.state.items() if k in ours}
    report = LoadReport(
        format=ckpt.format,
        # BatchNorm's batch counter is not a weight (norm_eval never updates it); older
        # checkpoints lack it, which is no reason to report the model as incomplete.
        missing=[k for k in ours if k not in matched and not k.endswith("num_batches_tracked")],
        unexpected=sorted(ckpt.unmapped + [ckpt.source[k] for k in ckpt.state if k not in ours]),
        ignored=list(ckpt.ignored),
    )
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"strict: {ckpt.path!r} does not match config {model.cfg['name']!r} exactly: {report}")
    with torch.no_grad():
        model.load_state_dict(matched, strict=False)
    return report
