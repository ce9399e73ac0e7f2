"""The model's input transform: resize keeping the aspect ratio, normalise, pad to 32.

As torchvision's detection models, the model owns it, so users pass images in [0, 1] at
their original size and get masks back at that size.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

# ImageNet statistics on the 0-255 scale, RGB order (mmdetection's data preprocessor).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class ImageMeta:
    ori_shape: Tuple[int, int]  # (H0, W0) of the image as given
    img_shape: Tuple[int, int]  # (h, w) after resizing, before padding
    pad_shape: Tuple[int, int]  # (H, W) of the padded batch


def rescaled_size(h: int, w: int, min_size: int, max_size: int) -> Tuple[int, int]:
    """Largest size with the same ratio whose short side is <= min_size and long side <= max_size."""
    scale = min(max_size / max(h, w), min_size / min(h, w))
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def check_image(img, name: str = "images") -> torch.Tensor:
    if not isinstance(img, torch.Tensor):
        raise ValueError(f"{name}: expected CHW float tensors in [0, 1], got {type(img).__name__}")
    if img.dim() != 3:
        raise ValueError(f"{name}: expected a 3-D CHW tensor, got shape {tuple(img.shape)}")
    if img.shape[0] != 3:
        raise ValueError(f"{name}: expected 3 channels (RGB) first, got shape {tuple(img.shape)}")
    if not img.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor in [0, 1], got dtype {img.dtype}")
    if img.shape[1] < 1 or img.shape[2] < 1:
        raise ValueError(f"{name}: expected a non-empty image, got shape {tuple(img.shape)}")
    if not bool(torch.isfinite(img).all()):
        raise ValueError(f"{name}: expected finite pixel values, got NaN or Inf")
    return img


class InputTransform:
    def __init__(self, min_size: Union[int, Sequence[int]], max_size: int, size_divisor: int = 32):
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (int(min_size),)
        self.max_size = int(max_size)
        self.size_divisor = int(size_divisor)
        self.mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
        self.std = torch.tensor(PIXEL_STD).view(3, 1, 1)

    def __call__(self, images: List[torch.Tensor], masks: Optional[List[torch.Tensor]] = None, training: bool = False):
        """Returns the padded batch [B, 3, H, W], the metas, and the masks resized and padded alike."""
        # Multi-scale training draws one short side per batch, as torchvision does.
        min_size = random.choice(self.min_size) if training else self.min_size[-1]
        resized, metas, out_masks = [], [], []
        for i, img in enumerate(images):
            h0, w0 = img.shape[-2:]
            h, w = rescaled_size(h0, w0, min_size, self.max_size)
            x = img.float() * 255.0
            if (h, w) != (h0, w0):
                x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
            resized.append(x)
            metas.append(ImageMeta((h0, w0), (h, w), (0, 0)))
            if masks is not None:
                m = masks[i]
                if m.shape[0] and (h, w) != (h0, w0):
                    m = F.interpolate(m[None].float(), size=(h, w), mode="nearest")[0]
                out_masks.append(m.to(torch.uint8))
        d = self.size_divisor
        H = max(x.shape[-2] for x in resized)
        W = max(x.shape[-1] for x in resized)
        H, W = -(-H // d) * d, -(-W // d) * d
        batch = resized[0].new_zeros((len(resized), 3, H, W))
        for i, x in enumerate(resized):
            batch[i, :, : x.shape[-2], : x.shape[-1]] = x
            metas[i].pad_shape = (H, W)
        if masks is not None:
            out_masks = [F.pad(m, (0, W - m.shape[-1], 0, H - m.shape[-2])) for m in out_masks]
            return batch, metas, out_masks
        return batch, metas
