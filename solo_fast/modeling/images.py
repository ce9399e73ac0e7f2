"""Decodes what users pass to ``predict`` as mmdetection's ``LoadImageFromFile`` does.

A file is read with ``cv2.imdecode(..., cv2.IMREAD_COLOR)``, the call behind mmcv's
``imfrombytes(flag='color')``: EXIF orientation applied, grayscale replicated to three
channels, alpha dropped, palettes expanded, 16-bit samples scaled to 8 bits (``>> 8``).
Every image stays an HWC uint8 RGB array until the model's transform has resized it
(``transform.py``), so mmdetection checkpoints see mmdetection's network input, and a
large photo costs no full-resolution float copy. Float CHW tensors are passed through
unchanged: they take the on-device float path of the transform.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
import torch

Image = Union[np.ndarray, torch.Tensor]  # HWC uint8 RGB array, or CHW float tensor in [0, 1]


def decode_file(path, name: str) -> np.ndarray:
    """The HWC uint8 RGB array of an image file, decoded as mmdetection decodes it."""
    import cv2

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no image file at {path!r}")
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:  # e.g. no read permission
        raise ValueError(f"{name}: cannot read {path!r} ({exc.strerror or exc})") from None
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    except cv2.error as exc:
        if "CV_IO_MAX_IMAGE" in str(exc):  # OpenCV's decompression-bomb guard (default 2**30 pixels)
            raise ValueError(
                f"{name}: {path!r} is larger than OpenCV decodes (its limit of OPENCV_IO_MAX_IMAGE_PIXELS, default "
                "2**30 pixels, or of OPENCV_IO_MAX_IMAGE_WIDTH/HEIGHT); if you trust the file, set that environment "
                "variable to a larger value before the process starts (OpenCV reads it when it is imported)") from None
        raise ValueError(f"{name}: {path!r} is not a readable image (OpenCV: {exc})") from None
    if img is None:
        raise ValueError(f"{name}: {path!r} is not a readable image (OpenCV cannot decode it)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def pil_to_array(img, name: str) -> np.ndarray:
    """The HWC uint8 RGB array of a PIL image's pixels (no EXIF rotation: the pixels as given).

    16-bit grayscale (modes ``I;16*`` and ``I``) is scaled to 8 bits by ``>> 8`` as OpenCV
    decodes 16-bit files (PIL's own ``convert("RGB")`` would clip at 255); every other mode
    goes through ``convert("RGB")``, which drops alpha and expands palettes as OpenCV does."""
    if img.width == 0 or img.height == 0:
        raise ValueError(f"{name}: expected a non-empty image, got a {img.width}x{img.height} PIL image")
    if img.mode.startswith("I;16") or img.mode == "I":
        gray = (np.asarray(img).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def check_array(img: np.ndarray, name: str) -> np.ndarray:
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: expected an HWC RGB array with 3 channels, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"{name}: expected a uint8 array (0-255), got dtype {img.dtype}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty image, got shape {img.shape}")
    return img


def _load_one(img, name: str) -> Tuple[Image, np.ndarray]:
    from PIL import Image as PILImage

    if isinstance(img, (str, Path)):
        arr = decode_file(img, name)
        return arr, arr
    if isinstance(img, PILImage.Image):
        arr = pil_to_array(img, name)
        return arr, arr
    if isinstance(img, np.ndarray):
        # The caller's array is only read (cv2.resize writes a new one, torch copies it to float).
        check_array(img, name)
        return img, img
    if isinstance(img, torch.Tensor):
        from .transform import check_image

        check_image(img, name)
        if img.dtype == torch.uint8:
            arr = img.detach().cpu().permute(1, 2, 0).numpy()
            return arr, arr
        if float(img.min()) < 0 or float(img.max()) > 1:
            raise ValueError(f"{name}: expected values in [0, 1], got [{float(img.min()):.3g}, {float(img.max()):.3g}]")
        arr = (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return img, arr
    raise ValueError(f"{name}: expected a path, PIL image, HWC uint8 array or CHW tensor, got {type(img).__name__}")


def load_images(images) -> Tuple[List[Image], List[np.ndarray]]:
    """One or many images -> (what the transform takes: HWC uint8 RGB arrays, or CHW float
    tensors in [0, 1]; HWC uint8 RGB arrays of the same images for drawing)."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("images: expected at least one image")
    pairs = [_load_one(img, f"images[{i}]") for i, img in enumerate(images)]
    return [p[0] for p in pairs], [p[1] for p in pairs]
