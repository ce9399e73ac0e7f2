"""Synthetic scenes of coloured shapes, with their instance masks (for demos and tests)."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

SHAPES = ("circle", "rectangle", "triangle")


def draw_scene(height: int = 480, width: int = 640, num_objects: int = 4, seed: int = 0
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An HWC uint8 RGB image on a textured background, its visible instance masks
    [M, H, W] uint8 (later shapes occlude earlier ones) and their labels [M] (index into
    :data:`SHAPES`). Objects fully hidden by later ones are dropped."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.integers(40, 200, size=3)
    texture = 25 * np.sin(xx / rng.uniform(6, 20) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(6, 20))
    img = np.clip(base[None, None, :] + texture[..., None] + rng.normal(0, 8, (height, width, 3)), 0, 255)
    canvas = Image.fromarray(img.astype(np.uint8))
    masks: List[np.ndarray] = []
    labels: List[int] = []
    short = min(height, width)
    for _ in range(num_objects):
        kind = int(rng.integers(len(SHAPES)))
        size = rng.uniform(0.08, 0.45) * short
        cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        layer = Image.new("L", (width, height), 0)
        pen = ImageDraw.Draw(layer)
        if kind == 0:
            pen.ellipse([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], fill=1)
        elif kind == 1:
            aspect = rng.uniform(0.5, 2.0)
            w, h = size * np.sqrt(aspect), size / np.sqrt(aspect)
            pen.rectangle([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=1)
        else:
            angle = rng.uniform(0, 2 * np.pi)
            pts = [(cx + size / 1.7 * np.cos(angle + k * 2 * np.pi / 3), cy + size / 1.7 * np.sin(angle + k * 2 * np.pi / 3))
                   for k in range(3)]
            pen.polygon(pts, fill=1)
        m = np.asarray(layer, dtype=np.uint8)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        canvas.paste(Image.new("RGB", (width, height), colour), mask=Image.fromarray(m * 255))
        for prev in masks:
            prev[m > 0] = 0
        masks.append(m.copy())
        labels.append(kind)
    keep = [i for i, m in enumerate(masks) if m.sum() > 0]
    stack = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, height, width), np.uint8)
    return np.asarray(canvas), stack, np.array([labels[i] for i in keep], dtype=np.int64)
