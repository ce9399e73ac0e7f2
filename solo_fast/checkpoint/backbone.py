"""ImageNet weights for the ResNet / ResNeXt backbone (``SOLO(..., backbone_weights=PATH)``).

The files people have:

- **torchvision**'s published ``resnet18/34/50/101-*.pth`` and ``resnext101_64x4d-*.pth``
  (the ResNeXt has the same names, its grouped ``conv2`` narrower per group): a plain state
  dict with torchvision's names (``conv1.weight``, ``bn1.*``, ``layerN.i.{conv,bn}K.*``,
  ``layerN.0.downsample.{0,1}.*``) and the ImageNet classifier ``fc.*``; timm's ResNets use
  the same names (also as ``.safetensors``). mmcv's ``open-mmlab://resnext101_64x4d``
  (what mmdetection's x101 configs start from) is loaded by mmdetection straight into its
  ResNeXt, whose names are these, so it has them too (not checked against the file itself).
- **mmpretrain / mmdetection** checkpoints: the same names under ``backbone.`` inside
  ``state_dict`` (mmpretrain's classifier is ``head.fc.*``; a detector's ``neck.*`` and heads
  come along too).

solo_fast's ResNet has torchvision's names (``modeling/backbone.py``), so every key keeps
its name once the ``backbone.`` prefix is gone. A backbone with deformable convs (the DCN
configs) has one tensor pair an ImageNet file cannot have: each DCN's offset conv
``layerN.i.conv2.conv_offset.*``, which stays zero-initialised (the DCN starts as the
ImageNet conv, as in mmdetection) and is listed in ``BackboneReport.initialised``, not as
missing. The file is read by
:func:`solo_fast.checkpoint.mmdet.read_state_dict` (``torch.load(weights_only=True)`` or
safetensors), as every other checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from . import mmdet

PREFIX = "backbone."
FORMATS = {"torchvision": "torchvision / timm names at the top level (conv1.weight, layer1.0.conv1.weight, ...)",
           "mmdet": "mmpretrain / mmdetection names under 'backbone.'"}


@dataclass
class BackboneReport:
    """What ``SOLO(..., backbone_weights=PATH)`` did with the file (``model.load_report``)."""

    path: str
    format: str  # see FORMATS
    loaded: List[str] = field(default_factory=list)  # backbone keys (solo_fast names, 'backbone.' prefix) filled
    # backbone keys no ImageNet file has, left at their initial values (DCN offset convs: zeros)
    initialised: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)  # the file's keys (its own names) not loaded: fc.*, head.*, ...
    ignored: List[str] = field(default_factory=list)  # the file's entries that are no tensors

    def __str__(self) -> str:
        more = f" and {len(self.unused) - 10} more" if len(self.unused) > 10 else ""
        kept = f", {len(self.initialised)} DCN offset tensors zero-initialised" if self.initialised else ""
        return (f"backbone weights {self.path!r} ({self.format}): {len(self.loaded)} tensors loaded{kept}, "
                f"{len(self.unused)} unused {self.unused[:10]}{more}")


def _split(state: Dict[str, torch.Tensor]) -> Tuple[str, Dict[str, torch.Tensor], Dict[str, str], List[str]]:
    """(format, tensors under ResNet names, ResNet name -> file name, file keys outside the backbone)."""
    if any(k.startswith(PREFIX) for k in state):
        inside = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
        return ("mmdet", inside, {k: PREFIX + k for k in inside},
                sorted(k for k in state if not k.startswith(PREFIX)))
    return "torchvision", dict(state), {k: k for k in state}, []


def _what_it_holds(state: Dict[str, torch.Tensor]) -> str:
    """The ResNet a file holds, for messages: ' (the file holds ResNet-50)' or ''."""
    depth, _, desc = mmdet._depth_of({PREFIX + k: v for k, v in state.items()})
    return f" (the file holds {desc})" if depth is not None else ""


def load_backbone(backbone: torch.nn.Module, path, arg: str = "backbone_weights") -> BackboneReport:
    """Copies an ImageNet ResNet's weights from ``path`` into ``backbone`` (a solo_fast ResNet)
    after checking that every backbone tensor is there with its shape; the classifier and
    anything else outside the backbone is listed as unused."""
    raw = mmdet.read_state_dict(path, arg)
    path = raw.path
    fmt, state, source, outside = _split(raw.state)
    ours = backbone.state_dict()
    name = getattr(backbone, "name", f"ResNet-{getattr(backbone, 'depth', '?')}")
    if "conv1.weight" not in state and not any(k.startswith("layer1.") for k in state):
        found = sorted(raw.state)[:6]
        raise ValueError(f"{arg}: {path!r} is not a ResNet checkpoint: expected torchvision's names (conv1.weight, "
                         f"bn1.weight, layer1.0.conv1.weight, ..., fc.weight) or mmpretrain/mmdetection's under "
                         f"'backbone.', found keys {found}")
    # BatchNorm's batch counter is not a weight (torchvision's older files lack it); a DCN's
    # offset conv is in no ImageNet file.
    initialised = [k for k in ours if k not in state and _is_offset(k)]
    missing = [k for k in ours if k not in state and not k.endswith("num_batches_tracked") and not _is_offset(k)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{arg}: {path!r} has no {_file_key(fmt, missing[0])!r}{more}, which the {name} "
                         f"backbone needs (backbone.{missing[0]}, shape {tuple(ours[missing[0]].shape)})"
                         f"{_what_it_holds(state)}")
    for k, v in state.items():
        if k not in ours:
            continue
        if tuple(v.shape) != tuple(ours[k].shape):
            raise ValueError(f"{arg}: key {source[k]!r} of {path!r} has shape {tuple(v.shape)}, the {name} "
                             f"backbone expects {tuple(ours[k].shape)} for backbone.{k}{_what_it_holds(state)}")
        if v.is_floating_point() != ours[k].is_floating_point():
            raise ValueError(f"{arg}: key {source[k]!r} of {path!r} is a {v.dtype} tensor, expected "
                             f"{'a floating-point' if ours[k].is_floating_point() else 'an integer'} one")
    matched = {k: v for k, v in state.items() if k in ours}
    with torch.no_grad():
        backbone.load_state_dict(matched, strict=False)
    return BackboneReport(
        path=os.fspath(path), format=fmt, loaded=sorted(PREFIX + k for k in matched),
        initialised=sorted(PREFIX + k for k in initialised),
        unused=sorted([source[k] for k in state if k not in ours] + outside), ignored=list(raw.ignored))


def _is_offset(key: str) -> bool:
    return ".conv_offset." in key


def _file_key(fmt: str, key: str) -> str:
    """The file's own name of a ResNet key."""
    return PREFIX + key if fmt == "mmdet" else key
