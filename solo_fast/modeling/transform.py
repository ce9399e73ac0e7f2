"""The model's input transform: resize keeping the aspect ratio, normalise, pad to 32.

As torchvision's detection models, the model owns it, so users pass images at their
original size and get masks back at that size. Two paths:

- **uint8 images** (HWC RGB arrays, CHW uint8 tensors; what ``predict`` makes of files
  and PIL images): mmdetection's pipelines exactly. ``cv2.resize(INTER_LINEAR)`` on the
  uint8 image to mmcv's keep-ratio size (``mmcv.imrescale``), then ``(x - mean) / std``
  in fp32 and zero padding to a multiple of 32 (``DetDataPreprocessor``); in training,
  instance masks resized with ``cv2.INTER_NEAREST`` (``BitmapMasks.rescale``) and the
  horizontal flip after the resize (``RandomFlip``). The resize runs on the host; only
  the resized uint8 image is copied to the device.
- **float CHW tensors in [0, 1]** (possibly already on a GPU): ``F.interpolate(bilinear,
  align_corners=False)`` of ``255 * x`` in float on the tensor's device, masks by
  ``F.interpolate(nearest)``. The same geometry, but not OpenCV's fixed-point arithmetic:
  resized values differ from the uint8 path by up to ~1 grey level, so detections are
  close to, not identical with, mmdetection's. Images already at the target size are
  not resized and give the uint8 path's input to float rounding (x * 255 of k / 255).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
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
    """mmcv's keep-ratio size (``rescale_size``): the largest size with the same ratio whose
    short side is <= the smaller and long side <= the larger of (min_size, max_size),
    each side rounded as ``int(side * scale + 0.5)``."""
    long_edge, short_edge = max(min_size, max_size), min(min_size, max_size)
    scale = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def check_image(img, name: str = "images") -> torch.Tensor:
    """A CHW tensor: float in [0, 1] (the range is checked where it is cheap to) or uint8."""
    if not isinstance(img, torch.Tensor):
        raise ValueError(f"{name}: expected CHW float tensors in [0, 1] or uint8 tensors, got {type(img).__name__}")
    if img.dim() != 3:
        raise ValueError(f"{name}: expected a 3-D CHW tensor, got shape {tuple(img.shape)}")
    if img.shape[0] != 3:
        raise ValueError(f"{name}: expected 3 channels (RGB) first, got shape {tuple(img.shape)}")
    if not img.is_floating_point() and img.dtype != torch.uint8:
        raise ValueError(f"{name}: expected a floating-point tensor in [0, 1] or a uint8 tensor, got dtype {img.dtype}")
    if img.shape[1] < 1 or img.shape[2] < 1:
        raise ValueError(f"{name}: expected a non-empty image, got shape {tuple(img.shape)}")
    if img.is_floating_point() and not bool(torch.isfinite(img).all()):
        raise ValueError(f"{name}: expected finite pixel values, got NaN or Inf")
    return img


def _as_hwc_uint8(img) -> Optional[np.ndarray]:
    """The image as a C-contiguous HWC uint8 array if it takes the uint8 path, else None."""
    if isinstance(img, np.ndarray):
        return np.ascontiguousarray(img)
    if img.dtype == torch.uint8:
        return np.ascontiguousarray(img.detach().cpu().permute(1, 2, 0).numpy())
    return None


def _resize_masks_nearest(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``BitmapMasks.rescale``: each [H0, W0] mask by ``cv2.resize(INTER_NEAREST)``."""
    import cv2

    h, w = size
    src = masks.detach().to("cpu", torch.uint8).numpy()
    out = np.empty((src.shape[0], h, w), dtype=np.uint8)
    for k in range(src.shape[0]):
        out[k] = cv2.resize(src[k], (w, h), interpolation=cv2.INTER_NEAREST)
    return torch.from_numpy(out)


class InputTransform:
    """``min_size``/``max_size``: the test scale; ``train_min_size``: the short sides that
    training draws from, one per image (mmdetection's ``RandomChoiceResize``, long side
    ``max_size``); ``flip_prob``: training's horizontal flip (``RandomFlip``)."""

    def __init__(self, min_size: int, max_size: int, size_divisor: int = 32,
                 train_min_size: Union[int, Sequence[int], None] = None, flip_prob: float = 0.0):
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.size_divisor = int(size_divisor)
        if train_min_size is None:
            train_min_size = (self.min_size,)
        self.train_min_size = tuple(train_min_size) if isinstance(train_min_size, (list, tuple)) else (int(train_min_size),)
        self.flip_prob = float(flip_prob)
        self.mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
        self.std = torch.tensor(PIXEL_STD).view(3, 1, 1)

    def test_size(self, h: int, w: int) -> Tuple[int, int]:
        """The resized (h, w) of an (h, w) image at inference."""
        return rescaled_size(h, w, self.min_size, self.max_size)

    def pad_size(self, h: int, w: int) -> Tuple[int, int]:
        d = self.size_divisor
        return -(-h // d) * d, -(-w // d) * d

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` in fp32 on the 0-255 scale (x: [..., 3, H, W])."""
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, images: List, masks: Optional[List[torch.Tensor]] = None, training: bool = False,
                 device=None):
        """Returns the padded batch [B, 3, H, W] on ``device`` (default: where each image
        is), the metas, and, given ``masks``, the masks resized, flipped and padded alike.

        ``images``: HWC uint8 RGB arrays, CHW uint8 tensors, or CHW float tensors in [0, 1]."""
        resized, metas, out_masks = [], [], []
        for i, img in enumerate(images):
            arr = _as_hwc_uint8(img)
            h0, w0 = arr.shape[:2] if arr is not None else img.shape[-2:]
            if training:
                # One draw of the scale per image, then of the flip, as mmdetection's train pipeline.
                h, w = rescaled_size(h0, w0, random.choice(self.train_min_size), self.max_size)
                flip = self.flip_prob > 0 and random.random() < self.flip_prob
            else:
                h, w = self.test_size(h0, w0)
                flip = False
            dev = device if device is not None else (img.device if isinstance(img, torch.Tensor) else "cpu")
            if arr is not None:
                import cv2

                if (h, w) != (h0, w0):
                    arr = cv2.resize(arr, (w, h), interpolation=cv2.INTER_LINEAR)
                elif not arr.flags.writeable:  # torch.from_numpy wants a writable array (only read here)
                    arr = arr.copy()
                x = torch.from_numpy(arr).to(dev).permute(2, 0, 1).float()
            else:
                x = img.to(dev).float() * 255.0
                if (h, w) != (h0, w0):
                    x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            x = self.normalize(x)
            if flip:
                x = x.flip(-1)
            resized.append(x)
            metas.append(ImageMeta((h0, w0), (h, w), (0, 0)))
            if masks is not None:
                m = masks[i]
                if m.shape[0] and (h, w) != (h0, w0):
                    if arr is not None:
                        m = _resize_masks_nearest(m, (h, w))
                    else:
                        m = F.interpolate(m.to(dev)[None].float(), size=(h, w), mode="nearest")[0]
                m = m.to(dev, torch.uint8)
                if m.shape[0] == 0:
                    m = m.new_zeros((0, h, w))
                out_masks.append(m.flip(-1) if flip else m)
        H, W = self.pad_size(max(x.shape[-2] for x in resized), max(x.shape[-1] for x in resized))
        batch = resized[0].new_zeros((len(resized), 3, H, W))
        for i, x in enumerate(resized):
            batch[i, :, : x.shape[-2], : x.shape[-1]] = x
            metas[i].pad_shape = (H, W)
        if masks is not None:
            out_masks = [F.pad(m, (0, W - m.shape[-1], 0, H - m.shape[-2])) for m in out_masks]
            return batch, metas, out_masks
        return batch, metas
