"""What ``SOLO.predict`` returns for one image."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ._checks import is_integral


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes of masks [N, H, W] (nonzero is inside): (min col, min row, max col + 1,
    max row + 1), zeros for an empty mask; :func:`solo_fast.ops.masks_to_boxes`."""
    from . import ops

    return ops.masks_to_boxes(masks if masks.dtype in (torch.bool, torch.uint8) else masks.bool())


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')} tensor of shape {list(v.shape)}"
    return type(v).__name__


def _check_image_array(img, size, name: str) -> None:
    """An HWC uint8 RGB array of the masks' size (H, W)."""
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        got = f"array of shape {img.shape} and dtype {img.dtype}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"{name}: expected an HWC uint8 RGB array or a PIL image, got {got}")
    if tuple(img.shape[:2]) != size:
        raise ValueError(f"{name}: expected the masks' size {size} (height, width), got {tuple(img.shape[:2])}")


def _check_category_ids(ids, name: str) -> None:
    if ids is not None and (isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__")
                            or not all(is_integral(c) for c in ids)):
        raise ValueError(f"{name}: expected a sequence of ints (one per label), got {ids!r}")


def _check_class_names(names, name: str) -> None:
    if names is not None and (isinstance(names, str) or not all(isinstance(c, str) for c in names)):
        raise ValueError(f"{name}: expected a sequence of str")


def _palette(n: int) -> List[tuple]:
    # Evenly spaced hues, so neighbouring instances are easy to tell apart.
    import colorsys

    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.61803) % 1.0, 0.75, 1.0)) for i in range(n)]


@dataclass
class SOLOResult:
    masks: torch.Tensor  # bool [N, H, W] at the original image size
    scores: torch.Tensor  # float [N], descending
    labels: torch.Tensor  # int64 [N], 0-based contiguous class indices
    boxes: torch.Tensor  # float [N, 4] xyxy, from the masks
    image: Optional[np.ndarray] = field(default=None, repr=False)  # HWC uint8 RGB, for draw()
    class_names: Optional[Sequence[str]] = field(default=None, repr=False)
    # The dataset's category id of each label (the model's, when it was trained on a COCO dataset).
    category_ids: Optional[Sequence[int]] = field(default=None, repr=False)

    def __post_init__(self):
        m = self.masks
        if not isinstance(m, torch.Tensor) or m.dim() != 3 or m.dtype != torch.bool:
            raise ValueError(f"masks: expected a bool tensor [N, H, W], got {_describe(m)}")
        n = m.shape[0]
        for name, t, shape, ok in (
            ("scores", self.scores, (n,), lambda t: t.is_floating_point()),
            ("labels", self.labels, (n,), lambda t: not t.is_floating_point() and not t.is_complex()
             and t.dtype != torch.bool),
            ("boxes", self.boxes, (n, 4), lambda t: t.is_floating_point() or t.dtype == torch.int64),
        ):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not ok(t):
                kind = "an integer" if name == "labels" else "a float"
                raise ValueError(f"{name}: expected {kind} tensor of shape {list(shape)} (one per mask), got {_describe(t)}")
        if self.image is not None:
            _check_image_array(self.image, tuple(m.shape[1:]), "image")
        _check_class_names(self.class_names, "class_names")
        _check_category_ids(self.category_ids, "category_ids")

    def __len__(self) -> int:
        return int(self.scores.numel())

    def to_coco(self, image_id: int, category_ids: Optional[Sequence[int]] = None) -> List[Dict]:
        """COCO result dicts (RLE segmentation) for pycocotools' ``loadRes``.

        ``category_ids[label]`` maps contiguous labels to the dataset's category ids. Default:
        the result's own ``category_ids`` (a model trained by solo_fast on a COCO-format
        dataset carries that dataset's ids), else the label itself.
        """
        from pycocotools import mask as mask_utils

        if not is_integral(image_id):
            raise ValueError(f"image_id: expected an int, got {image_id!r}")
        _check_category_ids(category_ids, "category_ids")
        if category_ids is None:
            category_ids = self.category_ids
        if len(self) == 0:
            return []
        masks = np.asfortranarray(self.masks.cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
        rles = mask_utils.encode(masks)
        out = []
        for i, rle in enumerate(rles):
            rle["counts"] = rle["counts"].decode("ascii")
            label = int(self.labels[i])
            if category_ids is not None and not 0 <= label < len(category_ids):
                raise ValueError(f"category_ids: has {len(category_ids)} entries, but label {label} was predicted")
            x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
            out.append({
                "image_id": int(image_id),
                "category_id": int(category_ids[label]) if category_ids is not None else label,
                "segmentation": rle,
                "score": float(self.scores[i]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
            })
        return out

    def draw(self, image=None, *, alpha: float = 0.5, score_thr: float = 0.0, class_names=None):
        """The image with the masks overlaid, and each instance's class and score, as a PIL image."""
        from PIL import Image, ImageDraw

        img = self.image if image is None else image
        if img is None:
            raise ValueError("image: this result holds no image; pass the image to draw(image=...)")
        if isinstance(img, Image.Image):
            img = np.asarray(img.convert("RGB"))
        _check_image_array(img, tuple(self.masks.shape[1:]), "image")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}")
        if isinstance(score_thr, bool) or not isinstance(score_thr, (int, float)) or math.isnan(score_thr):
            raise ValueError(f"score_thr: expected a number, got {score_thr!r}")
        _check_class_names(class_names, "class_names")
        canvas = np.asarray(img, dtype=np.float32).copy()
        names = class_names or self.class_names
        keep = [i for i in range(len(self)) if float(self.scores[i]) >= score_thr]
        colours = _palette(max(len(keep), 1))
        masks = self.masks.cpu().numpy()
        for c, i in zip(colours, keep):
            m = masks[i]
            canvas[m] = canvas[m] * (1 - alpha) + np.array(c, dtype=np.float32) * alpha
        out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
        pen = ImageDraw.Draw(out)
        for c, i in zip(colours, keep):
            x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
            label = int(self.labels[i])
            name = names[label] if names is not None and label < len(names) else str(label)
            pen.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=c)
            pen.text((x1 + 2, y1 + 1), f"{name} {float(self.scores[i]):.2f}", fill=(255, 255, 255))
        return out
