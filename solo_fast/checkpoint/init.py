"""Starting a model for your classes from a detector checkpoint (``SOLO.finetune_from``,
``solo-fast train --init``).

Any checkpoint :func:`solo_fast.checkpoint.mmdet.read_checkpoint` reads (solo_fast's own
``.safetensors``, mmdetection and original-SOLO ``.pth``) goes into a model with the
dataset's number of classes: every tensor whose shape fits is copied. The class conv
(``mask_head.conv_cls``, one row per class) is the one layer whose shape follows the
classes; its rows are matched by class name when both sides know their names (mmdetection
keeps the dataset's class names in ``meta``, solo_fast in its metadata), by position when
only the count is known and equal. Rows with no counterpart keep the model's initial
values: the head's focal-prior initialisation (every class starts at probability 0.01),
which is what a class never seen before should start from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import mmdet

CLASS_WEIGHT = "mask_head.conv_cls.weight"
CLASS_BIAS = "mask_head.conv_cls.bias"


def _norm(name: str) -> str:
    # "Traffic_Light" and "traffic light" are one class: datasets differ in case and separators.
    return " ".join(name.replace("_", " ").lower().split())


@dataclass
class InitReport:
    """What ``SOLO.finetune_from`` did with a checkpoint (``model.load_report``)."""

    path: str
    format: str  # as mmdet.FORMATS
    loaded: List[str] = field(default_factory=list)  # model keys copied from the checkpoint unchanged
    reinitialized: List[str] = field(default_factory=list)  # model keys (partly) left at their initial values
    kept_rows: Dict[int, int] = field(default_factory=dict)  # class conv: model label -> checkpoint row
    prior_rows: List[int] = field(default_factory=list)  # class conv: model labels at the focal prior
    class_match: str = "none"  # how rows were matched: "name", "position" or "none"
    mismatched: Dict[str, Tuple[tuple, tuple]] = field(default_factory=dict)  # key -> (checkpoint, model) shape
    missing: List[str] = field(default_factory=list)  # model keys the checkpoint lacks
    unexpected: List[str] = field(default_factory=list)  # checkpoint keys (its own names) with no place
    class_names: Optional[List[str]] = None  # the model's, for messages

    def _label(self, j: int) -> str:
        return repr(self.class_names[j]) if self.class_names and j < len(self.class_names) else str(j)

    def __str__(self) -> str:
        kept = ", ".join(f"{self._label(j)} <- row {i}" for j, i in sorted(self.kept_rows.items())[:10])
        prior = ", ".join(self._label(j) for j in self.prior_rows[:10])
        n = len(self.kept_rows) + len(self.prior_rows)
        cls = (f"class conv: {len(self.kept_rows)} of {n} classes kept by {self.class_match} ({kept})"
               if self.kept_rows else f"class conv: none of the {n} classes kept")
        if self.prior_rows:
            cls += f", {len(self.prior_rows)} at the focal prior ({prior})"
        return (f"{self.path!r} ({self.format}): {len(self.loaded)} tensors loaded; {cls}; "
                f"{len(self.mismatched)} of other shapes {sorted(self.mismatched)[:5]}, "
                f"{len(self.missing)} missing {self.missing[:5]}, {len(self.unexpected)} unexpected "
                f"{self.unexpected[:5]}")


def config_of(ckpt: mmdet.Checkpoint) -> Optional[str]:
    """The config name a checkpoint is for: solo_fast's own files say it; for the others, the
    one named config whose architecture the tensors show (None when not exactly one)."""
    if ckpt.config is not None:
        return ckpt.config["name"]
    from ..modeling import configs

    arch = mmdet._arch_of(ckpt.state)
    names = [n for n, c in configs.CONFIGS.items() if all(c.get(k) == v for k, v in arch.items())]
    return names[0] if len(names) == 1 else None


def _class_rows(ckpt: mmdet.Checkpoint, num_classes: int, class_names: Optional[Sequence[str]],
                ours: Dict[str, torch.Tensor]) -> Tuple[Dict[int, int], str]:
    """(model label -> checkpoint row, how they were matched)."""
    w, b = ckpt.state.get(CLASS_WEIGHT), ckpt.state.get(CLASS_BIAS)
    if w is None or b is None or tuple(w.shape[1:]) != tuple(ours[CLASS_WEIGHT].shape[1:]) \
            or tuple(b.shape) != (w.shape[0],):
        return {}, "none"
    rows = int(w.shape[0])
    theirs = ckpt.class_names if ckpt.class_names is not None and len(ckpt.class_names) == rows else None
    if class_names is not None and theirs is not None:
        index: Dict[str, int] = {}
        for i, name in enumerate(theirs):
            index.setdefault(_norm(name), i)
        return {j: index[_norm(n)] for j, n in enumerate(class_names) if _norm(n) in index}, "name"
    if rows == num_classes:
        return {j: j for j in range(rows)}, "position"
    return {}, "none"


def load_for_finetuning(model: torch.nn.Module, ckpt: mmdet.Checkpoint,
                        class_names: Optional[Sequence[str]] = None) -> InitReport:
    """Copies every tensor of ``ckpt`` whose shape fits into ``model`` (a freshly built SOLO, whose
    class conv holds the head's initial values) and the class-conv rows of matching classes."""
    mmdet.check_architecture(ckpt, model.cfg)
    ours = model.state_dict()
    matched, mismatched = {}, {}
    for k, v in ckpt.state.items():
        if k not in ours or k in (CLASS_WEIGHT, CLASS_BIAS):
            continue
        if tuple(v.shape) == tuple(ours[k].shape):
            matched[k] = v
        else:
            mismatched[k] = (tuple(v.shape), tuple(ours[k].shape))
    num_classes = int(ours[CLASS_WEIGHT].shape[0])
    rows, how = _class_rows(ckpt, num_classes, class_names, ours)
    whole = how != "none" and rows == {j: j for j in range(num_classes)} \
        and ckpt.state[CLASS_WEIGHT].shape[0] == num_classes
    with torch.no_grad():
        model.load_state_dict(matched, strict=False)
        weight, bias = model.get_parameter(CLASS_WEIGHT), model.get_parameter(CLASS_BIAS)
        for j, i in rows.items():
            weight[j].copy_(ckpt.state[CLASS_WEIGHT][i])
            bias[j].copy_(ckpt.state[CLASS_BIAS][i])
    loaded = sorted(matched) + ([CLASS_WEIGHT, CLASS_BIAS] if whole else [])
    if not whole and CLASS_WEIGHT in ckpt.state and how == "none":
        w = ckpt.state[CLASS_WEIGHT]
        if tuple(w.shape[1:]) != tuple(ours[CLASS_WEIGHT].shape[1:]):
            mismatched[CLASS_WEIGHT] = (tuple(w.shape), tuple(ours[CLASS_WEIGHT].shape))
    return InitReport(
        path=ckpt.path, format=ckpt.format, loaded=loaded,
        reinitialized=sorted(set(mismatched) | (set() if whole else {CLASS_WEIGHT, CLASS_BIAS})),
        kept_rows=dict(rows), prior_rows=[j for j in range(num_classes) if j not in rows], class_match=how,
        mismatched=mismatched,
        missing=[k for k in ours if k not in ckpt.state and not k.endswith("num_batches_tracked")],
        unexpected=sorted(ckpt.unmapped + [ckpt.source[k] for k in ckpt.state if k not in ours]),
        class_names=list(class_names) if class_names is not None else None)
