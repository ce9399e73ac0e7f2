"""Synthetic scenes of coloured shapes, with their instance masks (for demos and tests),
and a writer for whole datasets of them in the COCO format (PNG images + instances json)."""
from __future__ import annotations

import json
import os
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np

SHAPES = ("circle", "rectangle", "triangle")

# write_shapes_dataset's object sizes, as fractions of the image's short side, drawn
# log-uniformly: a 14x span, so that once the model resizes the short side to 448-800
# (every named config) the objects' sqrt(w*h) covers all five FPN scale ranges
# (e.g. 0.06 * 800 = 48 ... 0.85 * 800 = 680; 0.06 * 448 = 27 ... 0.85 * 448 = 381).
DATASET_SIZE_RANGE = (0.06, 0.85)
DATASET_OBJECTS = (2, 7)  # objects per image, inclusive
# Later shapes may hide at most half of an earlier one: occlusions, but no slivers that
# are unlearnable and would drag a short demo's AP down.
DATASET_MAX_OCCLUSION = 0.5


def draw_scene(height: int = 480, width: int = 640, num_objects: int = 4, seed: int = 0, *,
               size_range: Tuple[float, float] = (0.08, 0.45), log_sizes: bool = False,
               max_occlusion: Optional[float] = None, max_tries: int = 20,
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An HWC uint8 RGB image on a textured background, its visible instance masks
    [M, H, W] uint8 (later shapes occlude earlier ones) and their labels [M] (index into
    :data:`SHAPES`). Objects fully hidden by later ones are dropped.

    ``size_range``: object size as a fraction of the short side (drawn log-uniformly with
    ``log_sizes``). ``max_occlusion``: if set, a new shape that would hide more than this
    fraction of an earlier shape's full area is moved (up to ``max_tries`` positions) or
    else left out. The defaults give the scenes this function has always drawn.
    """
    from PIL import Image, ImageDraw

    lo, hi = (float(v) for v in size_range)
    if not 0 < lo <= hi:
        raise ValueError(f"size_range: expected 0 < low <= high, got {size_range}")
    if max_occlusion is not None and not 0 <= max_occlusion <= 1:
        raise ValueError(f"max_occlusion: expected a fraction in [0, 1] or None, got {max_occlusion}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.integers(40, 200, size=3)
    texture = 25 * np.sin(xx / rng.uniform(6, 20) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(6, 20))
    img = np.clip(base[None, None, :] + texture[..., None] + rng.normal(0, 8, (height, width, 3)), 0, 255)
    canvas = Image.fromarray(img.astype(np.uint8))
    masks: List[np.ndarray] = []
    full_areas: List[int] = []
    labels: List[int] = []
    short = min(height, width)
    for _ in range(num_objects):
        kind = int(rng.integers(len(SHAPES)))
        frac = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if log_sizes else rng.uniform(lo, hi)
        size = frac * short
        m = None
        for _attempt in range(max_tries if max_occlusion is not None else 1):
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
            cand = np.asarray(layer, dtype=np.uint8)
            if max_occlusion is None or all(
                    (prev.sum() - int(np.count_nonzero(prev & cand))) >= (1 - max_occlusion) * area
                    for prev, area in zip(masks, full_areas) if area > 0):
                m = cand
                break
        if m is None:
            continue
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        canvas.paste(Image.new("RGB", (width, height), colour), mask=Image.fromarray(m * 255))
        for prev in masks:
            prev[m > 0] = 0
        masks.append(m.copy())
        full_areas.append(int(m.sum()))
        labels.append(kind)
    keep = [i for i, m in enumerate(masks) if m.sum() > 0]
    stack = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, height, width), np.uint8)
    return np.asarray(canvas), stack, np.array([labels[i] for i in keep], dtype=np.int64)


def _image_seed(seed: int, split: str, index: int) -> int:
    # Splits of one seed draw different scenes; the same (seed, split, index) always the same.
    return int(np.random.SeedSequence([int(seed), zlib.crc32(split.encode("utf-8")), int(index)]).generate_state(1)[0])


def shapes_scene_kwargs(seed: int, split: str, index: int, *, size_range: Tuple[float, float] = DATASET_SIZE_RANGE,
                        objects: Tuple[int, int] = DATASET_OBJECTS,
                        max_occlusion: Optional[float] = DATASET_MAX_OCCLUSION) -> Dict:
    """The ``draw_scene`` keyword arguments of image ``index`` (0-based) of a
    :func:`write_shapes_dataset` split (besides height and width)."""
    image_seed = _image_seed(seed, split, index)
    n_lo, n_hi = (int(v) for v in objects)
    if not 0 <= n_lo <= n_hi:
        raise ValueError(f"objects: expected (low, high) object counts with 0 <= low <= high, got {objects}")
    num_objects = int(np.random.default_rng(image_seed ^ 0x5EED).integers(n_lo, n_hi + 1))
    return dict(num_objects=num_objects, seed=image_seed, size_range=tuple(size_range),
                log_sizes=True, max_occlusion=max_occlusion)


def shapes_image_dir(root: str, split: str = "train") -> str:
    """Where :func:`write_shapes_dataset` puts a split's PNG images (``CocoDataset``'s ``img_dir``)."""
    return os.path.join(root, split)


def write_shapes_dataset(root: str, num_images: int, *, height: int, width: int, seed: int,
                         split: str = "train", size_range: Tuple[float, float] = DATASET_SIZE_RANGE,
                         objects: Tuple[int, int] = DATASET_OBJECTS,
                         max_occlusion: Optional[float] = DATASET_MAX_OCCLUSION) -> str:
    """Write ``num_images`` synthetic shape scenes in the COCO layout and return the json path.

    Images: ``<root>/<split>/<image_id:06d>.png`` (see :func:`shapes_image_dir`);
    annotations: ``<root>/annotations/instances_<split>.json`` with RLE segmentations
    (visible masks: shapes occlude each other), area, bbox, ``iscrowd`` 0, and the
    categories circle, rectangle, triangle with ids 1, 2, 3 (label ``k`` of
    :func:`draw_scene` is category ``k + 1``). Image ids run from 1. Object sizes span a
    14x range of the short side (every FPN level once the model resizes the image);
    backgrounds are textured. The same arguments always write the same files.

    ``size_range`` (fractions of the short side, drawn log-uniformly), ``objects`` (the
    inclusive range of shapes per image) and ``max_occlusion`` (see :func:`draw_scene`)
    change the defaults, e.g. larger and fewer shapes for small images.
    """
    from PIL import Image
    from pycocotools import mask as mask_utils

    num_images, height, width = int(num_images), int(height), int(width)
    if num_images < 0:
        raise ValueError(f"num_images: expected >= 0, got {num_images}")
    if height < 8 or width < 8:
        raise ValueError(f"height, width: expected at least 8 pixels each, got {height}x{width}")
    if not split or os.sep in split or split in (".", ".."):
        raise ValueError(f"split: expected a plain folder name such as 'train' or 'val', got {split!r}")
    img_dir = shapes_image_dir(root, split)
    ann_dir = os.path.join(root, "annotations")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1
        img, masks, labels = draw_scene(height, width, **shapes_scene_kwargs(
            seed, split, index, size_range=size_range, objects=objects, max_occlusion=max_occlusion))
        file_name = f"{image_id:06d}.png"
        Image.fromarray(img).save(os.path.join(img_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        if len(labels) == 0:
            continue
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        areas = mask_utils.area(rles)
        boxes = mask_utils.toBbox(rles)
        for rle, label, area, box in zip(rles, labels, areas, boxes):
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(label) + 1,
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": float(area),
                "bbox": [float(v) for v in box],
                "iscrowd": 0,
            })
    dataset = {
        "info": {"description": f"solo_fast synthetic shapes, split {split!r}, seed {seed}", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPES)],
    }
    path = os.path.join(ann_dir, f"instances_{split}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dataset, f)
    os.replace(tmp, path)
    return path
