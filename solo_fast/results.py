"""What ``SOLO.predict`` returns for one image."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes of bool masks [N, H, W]: (min col, min row, max col + 1, max row + 1)."""
    from .ops.reference import masks_to_boxes as _boxes

    return _boxes(masks)


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

    def __len__(self) -> int:
        return int(self.scores.numel())

    def to_coco(self, image_id: int, category_ids: Optional[Sequence[int]] = None) -> List[Dict]:
        """COCO result dicts (RLE segmentation) for pycocotools' ``loadRes``.

        ``category_ids[label]`` maps contiguous labels to the dataset's category ids
        (default: the label itself).
        """
        from pycocotools import mask as mask_utils

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
