"""Turns what users pass to ``predict`` into CHW float tensors in [0, 1]."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch


def _load_one(img, name: str) -> Tuple[torch.Tensor, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    if isinstance(img, (str, Path)):
        if not os.path.isfile(img):
            raise FileNotFoundError(f"{name}: no image file at {str(img)!r}")
        try:
            with Image.open(img) as im:
                img = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{name}: {str(img)!r} is not a readable image ({exc})") from None
    if isinstance(img, Image.Image):
        arr = np.asarray(img.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0, arr
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"{name}: expected an HWC RGB array with 3 channels, got shape {img.shape}")
        if img.dtype != np.uint8:
            raise ValueError(f"{name}: expected a uint8 array (0-255), got dtype {img.dtype}")
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"{name}: expected a non-empty image, got shape {img.shape}")
        # A copy: the tensor must not alias (or require writability of) the caller's array.
        return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float() / 255.0, img
    if isinstance(img, torch.Tensor):
        from .transform import check_image

        check_image(img, name)
        if float(img.min()) < 0 or float(img.max()) > 1:
            raise ValueError(f"{name}: expected values in [0, 1], got [{float(img.min()):.3g}, {float(img.max()):.3g}]")
        arr = (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return img, arr
    raise ValueError(f"{name}: expected a path, PIL image, HWC uint8 array or CHW float tensor, got {type(img).__name__}")


def load_images(images) -> Tuple[List[torch.Tensor], List[np.ndarray]]:
    """One or many images -> (CHW float tensors in [0, 1], HWC uint8 arrays for drawing)."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("images: expected at least one image")
    pairs = [_load_one(img, f"images[{i}]") for i, img in enumerate(images)]
    return [p[0] for p in pairs], [p[1] for p in pairs]
