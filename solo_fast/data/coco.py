"""COCO-format instance segmentation data (a json file + an image folder) on pycocotools.

The dataset only decodes, as mmdetection's ``LoadImageFromFile`` and ``LoadAnnotations``
do: images come back at their original size as uint8 (OpenCV's decoder) and masks at the
same size. Resizing (multi-scale included), the horizontal flip, normalising and padding
are the model's job (``SOLO.transform``, an ``InputTransform``), in mmdetection's order,
so that train and eval see one code path.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from .._checks import is_int

__all__ = ["CocoDataset", "collate", "evaluable_ground_truth", "polygons_with_area"]


def _rle_string_total(counts: str) -> int:
    """Sum of the run lengths of a compressed COCO RLE string (pycocotools' rleFrString:
    6-bit groups offset by 48, 5 data bits each; from the third run on, each run is
    stored as the difference to the run two before it)."""
    runs: List[int] = []
    i, n = 0, len(counts)
    while i < n:
        x, shift, more = 0, 0, True
        while more:
            if i >= n:
                raise ValueError("the compressed RLE string ends inside a run length")
            c = ord(counts[i]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {counts[i]!r} is not in the compressed RLE alphabet")
            x |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            i += 1
            shift += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * shift)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise ValueError("negative run length")
        runs.append(x)
    return sum(runs)


def _hashable(x) -> bool:
    return isinstance(x, (int, str)) and not isinstance(x, bool)


def polygons_with_area(seg: list) -> list:
    """The polygons of a polygon segmentation that have at least 3 points (6 coordinates):
    fewer enclose no area. Training (:class:`CocoDataset`) and evaluation
    (:func:`evaluable_ground_truth`) use only these, as mmdetection and detectron2 do."""
    return [p for p in seg if isinstance(p, (list, tuple)) and len(p) >= 6]


def evaluable_ground_truth(coco) -> Tuple[object, int, int]:
    """``coco`` (a ``pycocotools.coco.COCO``) with the annotations :class:`CocoDataset` skips
    dropped and the polygons it ignores removed: ``(coco or a cleaned copy, number of
    annotations dropped, number of annotations that lost a polygon)``.

    pycocotools checks nothing here: ``COCOeval`` hands each polygon list to
    ``frPyObjects``, which reads a first polygon of 4 numbers as a box (``TypeError:
    Argument 'bb' has incorrect type``) and rejects a shorter or empty one (``input type is
    not supported``) after every image was predicted. An annotation with no polygon of 3
    points (crowd regions too) is dropped; one with some keeps only those. ``coco`` itself
    is returned, unchanged, when there is nothing to drop."""
    from pycocotools.coco import COCO

    kept, dropped, trimmed = [], 0, 0
    for ann in coco.dataset.get("annotations", []):
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            polys = polygons_with_area(seg)
            if not polys:
                dropped += 1
                continue
            if len(polys) != len(seg):
                trimmed += 1
                ann = {**ann, "segmentation": polys}
        kept.append(ann)
    if not dropped and not trimmed:
        return coco, 0, 0
    clean = COCO()
    clean.dataset = {**coco.dataset, "annotations": kept}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        clean.createIndex()
    return clean, dropped, trimmed


class CocoDataset(torch.utils.data.Dataset):
    """Instance masks of a COCO json (``ann_file``) over the images in ``img_dir``.

    ``dataset[i]`` is ``(image, target)``: image a uint8 CHW RGB tensor at the original
    size (decoded by ``cv2.imdecode`` as mmdetection does, EXIF orientation applied), target ``{"masks": uint8 [M, H, W], "labels": int64 [M],
    "image_id": int, "orig_size": (H, W)}``. Labels are contiguous, 0..C-1, in the order of
    ascending category id: ``cat_ids[label]`` (also ``label_to_cat_id``) is the original
    id and ``cat_id_to_label`` the inverse, ``class_names[label]`` the name. Pass
    ``cat_ids`` to ``SOLOResult.to_coco`` to get results in the file's ids.

    Segmentations may be polygons or RLE (compressed or uncompressed); ``iscrowd=1``
    annotations are skipped, and so are polygons with fewer than 3 points (an
    annotation left with no polygon is skipped with a warning; evaluation leaves them out
    of the ground truth alike, :func:`evaluable_ground_truth`). Images with no
    annotation are kept (M = 0). No augmentation happens here: the model's training
    transform resizes and flips (``flip_prob`` of its config).

    ``coco`` is the ``pycocotools.coco.COCO`` object (the ground truth for ``COCOeval``);
    ``image_ids[i]`` is the image id of item i (the file's image order).
    """

    def __init__(self, ann_file, img_dir):
        from pycocotools.coco import COCO

        ann_file, img_dir = os.fspath(ann_file), os.fspath(img_dir)
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"ann_file: annotation file not found: {ann_file}")
        if not os.path.isdir(img_dir):
            raise FileNotFoundError(f"img_dir: image folder not found: {img_dir}")
        self.ann_file, self.img_dir = ann_file, img_dir

        try:
            with open(ann_file, "rb") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"ann_file: {ann_file} is not valid JSON: {e}") from None
        self._check(data)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            self.coco.createIndex()

        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids: List[int] = [int(c["id"]) for c in cats]
        self.class_names: List[str] = [str(c.get("name", c["id"])) for c in cats]
        self.label_to_cat_id: Dict[int, int] = dict(enumerate(self.cat_ids))
        self.cat_id_to_label: Dict[int, int] = {c: i for i, c in enumerate(self.cat_ids)}
        self.image_ids: List[int] = [int(img["id"]) for img in data["images"]]
        self._skipped_anns = 0

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def _check(self, data) -> None:
        """Reject, by annotation id, what would otherwise fail deep inside pycocotools
        (or, for a bad RLE, write past a buffer in its C code)."""
        where = f"ann_file {self.ann_file}"
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a COCO json object, got a {type(data).__name__}")
        data.setdefault("annotations", [])  # test-set files have none
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{where}: expected a list under {key!r}")
        image_hw = {}
        for img in data["images"]:
            if not isinstance(img, dict) or any(k not in img for k in ("id", "file_name", "height", "width")):
                raise ValueError(f"{where}: every image needs id, file_name, height and width; got {img!r:.200}")
            if not isinstance(img["file_name"], str):
                raise ValueError(f"{where}: image id {img['id']!r}: file_name must be a string, got {img['file_name']!r}")
            if not is_int(img["id"]):
                raise ValueError(f"{where}: image ids must be integers, got {img['id']!r}")
            if img["id"] in image_hw:
                raise ValueError(f"{where}: image id {img['id']} appears twice")
            h, w = img["height"], img["width"]
            if not (is_int(h) and is_int(w) and h > 0 and w > 0):
                raise ValueError(f"{where}: image id {img['id']}: expected positive integer height and width, got {h}, {w}")
            image_hw[img["id"]] = (h, w)
        cat_ids = set()
        for cat in data["categories"]:
            if not isinstance(cat, dict) or not is_int(cat.get("id")):
                raise ValueError(f"{where}: every category needs an integer id; got {cat!r:.200}")
            if cat["id"] in cat_ids:
                raise ValueError(f"{where}: category id {cat['id']} appears twice")
            cat_ids.add(cat["id"])
        ann_ids = set()
        for ann in data["annotations"]:
            if not isinstance(ann, dict) or "id" not in ann:
                raise ValueError(f"{where}: every annotation needs an id; got {ann!r:.200}")
            aid = ann["id"]
            if not _hashable(aid):
                raise ValueError(f"{where}: annotation id {aid!r} is not a number")
            if aid in ann_ids:
                raise ValueError(f"{where}: annotation id {aid} appears twice")
            ann_ids.add(aid)
            if not _hashable(ann.get("image_id")) or ann.get("image_id") not in image_hw:
                raise ValueError(f"{where}: annotation id {aid} refers to image id {ann.get('image_id')!r}, "
                                 "which is not in the file's images")
            if not _hashable(ann.get("category_id")) or ann.get("category_id") not in cat_ids:
                raise ValueError(f"{where}: annotation id {aid} refers to category id {ann.get('category_id')!r}, "
                                 "which is not in the file's categories")
            if ann.get("iscrowd", 0) not in (0, 1, False, True):
                raise ValueError(f"{where}: annotation id {aid}: iscrowd must be 0 or 1, got {ann.get('iscrowd')!r}")
            if "segmentation" not in ann:
                raise ValueError(f"{where}: annotation id {aid} has no segmentation")
            if not ann.get("iscrowd", 0):
                self._check_segmentation(ann, *image_hw[ann["image_id"]])

    def _check_segmentation(self, ann, h: int, w: int) -> None:
        seg, aid = ann["segmentation"], ann["id"]
        bad = f"ann_file {self.ann_file}: annotation id {aid}: malformed segmentation: "
        if isinstance(seg, list):
            if not seg:
                raise ValueError(bad + "an empty list of polygons")
            for poly in seg:
                # (The coordinates' values are checked when decoding: a Python pass over
                # every number of COCO train would add seconds to every start.)
                if not isinstance(poly, list) or len(poly) % 2:
                    raise ValueError(bad + "expected polygons as lists of an even number of coordinates "
                                     "[x1, y1, x2, y2, ...]")
        elif isinstance(seg, dict):
            if "counts" not in seg or "size" not in seg:
                raise ValueError(bad + "an RLE needs 'counts' and 'size'")
            size = seg["size"]
            if not (isinstance(size, (list, tuple)) and len(size) == 2 and list(size) == [h, w]):
                raise ValueError(bad + f"RLE size {size!r} does not match the image's [height, width] = [{h}, {w}]")
            counts = seg["counts"]
            if isinstance(counts, list):
                if not all(is_int(c) and c >= 0 for c in counts):
                    raise ValueError(bad + "uncompressed RLE counts must be non-negative integers")
                total = sum(counts)
            elif isinstance(counts, (str, bytes)):
                try:
                    total = _rle_string_total(counts.decode("ascii") if isinstance(counts, bytes) else counts)
                except (ValueError, UnicodeDecodeError) as e:
                    raise ValueError(bad + f"compressed RLE counts: {e}") from None
            else:
                raise ValueError(bad + f"RLE counts must be a list or a string, got {type(counts).__name__}")
            if total != h * w:
                raise ValueError(bad + f"RLE run lengths add up to {total}, not height * width = {h * w}")
        else:
            raise ValueError(bad + f"expected polygons (a list) or an RLE (a dict), got {type(seg).__name__}")

    def __len__(self) -> int:
        return len(self.image_ids)

    def _load_image(self, info) -> torch.Tensor:
        from ..modeling.images import decode_file

        path = os.path.join(self.img_dir, info["file_name"])
        arr = decode_file(path, f"image id {info['id']}")  # its errors name the file and say why
        if arr.shape[:2] != (info["height"], info["width"]):
            raise ValueError(f"image id {info['id']}: {path} is {arr.shape[0]}x{arr.shape[1]} (HxW), but the "
                             f"annotation file says {info['height']}x{info['width']}")
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def _rle(self, ann, h: int, w: int):
        """The RLE of one non-crowd annotation, or None if it has no valid polygon."""
        from pycocotools import mask as mask_utils

        seg = ann["segmentation"]
        if isinstance(seg, list):
            # One polygon at a time: pycocotools reads a list whose first entry has 4
            # numbers as a box, so a 2-point polygon would silently become a rectangle.
            polys = []
            for p in polygons_with_area(seg):
                try:
                    if any(isinstance(v, (bool, str, bytes)) for v in p):
                        raise TypeError
                    xy = np.asarray(p, dtype=np.float64)
                except (TypeError, ValueError):
                    xy = None
                if xy is None or xy.ndim != 1 or not np.isfinite(xy).all():
                    raise ValueError(f"ann_file {self.ann_file}: annotation id {ann['id']}: malformed segmentation: "
                                     "polygon coordinates must be finite numbers")
                polys.append(xy.tolist())
            if not polys:
                return None
            rle = mask_utils.merge([mask_utils.frPyObjects([p], h, w)[0] for p in polys])
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            counts = seg["counts"]
            rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        return rle

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        image = self._load_image(info)
        h, w = info["height"], info["width"]
        rles, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            rle = self._rle(ann, h, w)
            if rle is None:
                self._skipped_anns += 1
                if self._skipped_anns == 1:
                    warnings.warn(f"{self.ann_file}: annotation id {ann['id']} has only polygons of fewer than 3 "
                                  "points; skipping it (and any others like it)", stacklevel=2)
                continue
            rles.append(rle)
            labels.append(self.cat_id_to_label[ann["category_id"]])
        if rles:
            from pycocotools import mask as mask_utils

            with warnings.catch_warnings():
                # pycocotools' Cython array predates numpy 2's copy keyword and says so on every call.
                warnings.simplefilter("ignore", DeprecationWarning)
                masks = mask_utils.decode(rles)  # [H, W, M], one call for the image
            masks_t = torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))
            keep = masks_t.flatten(1).amax(1) > 0  # e.g. a polygon entirely outside the image: nothing to learn
            masks_t = masks_t[keep]
            labels_t = torch.tensor(labels, dtype=torch.int64)[keep]
        else:
            masks_t = torch.zeros((0, h, w), dtype=torch.uint8)
            labels_t = torch.zeros((0,), dtype=torch.int64)
        target = {"masks": masks_t.contiguous(), "labels": labels_t, "image_id": int(image_id), "orig_size": (h, w)}
        return image.contiguous(), target

    def __repr__(self) -> str:
        return (f"CocoDataset({self.ann_file!r}, {self.img_dir!r}): "
                f"{len(self)} images, {self.num_classes} classes")


def collate(batch: Sequence[Tuple[torch.Tensor, Dict]]) -> Tuple[List[torch.Tensor], List[Dict]]:
    """``DataLoader`` collate: images of different sizes stay a list (the model pads them)."""
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets
