"""solo_fast.data: COCO parsing (polygons, RLE, crowd), ids, errors, and the synthetic
shapes dataset written in the COCO format and read back."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch

from solo_fast.data import CocoDataset, SHAPES, collate, draw_scene, shapes_image_dir, write_shapes_dataset
from solo_fast.data.synthetic import shapes_scene_kwargs

H, W = 12, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _hand(*boxes, h=H, w=W):
    """A uint8 mask with the given (row0, row1, col0, col1) half-open blocks set."""
    m = np.zeros((h, w), np.uint8)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = 1
    return m


def _uncompressed_rle(m):
    """COCO's uncompressed RLE, written out by hand: runs over the column-major pixels,
    starting with a (possibly empty) run of zeros."""
    flat = m.T.reshape(-1)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": counts}


def _compressed_rle(m):
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _image(h=H, w=W, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(tmp_path, anns, *, images=None, categories=None, pixels=None):
    """A COCO json + image folder under tmp_path; returns (ann_file, img_dir)."""
    from PIL import Image

    images = images if images is not None else [{"id": 1, "file_name": "a.png", "height": H, "width": W}]
    categories = categories if categories is not None else [{"id": 1, "name": "thing"}]
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    for i, info in enumerate(images):
        px = pixels[info["id"]] if pixels and info["id"] in pixels else _image(info["height"], info["width"], seed=i)
        Image.fromarray(px).save(img_dir / info["file_name"])
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return str(ann_file), str(img_dir)


def _ann(aid, seg, *, image_id=1, cat=1, crowd=0):
    return {"id": aid, "image_id": image_id, "category_id": cat, "segmentation": seg, "iscrowd": crowd,
            "area": 1.0, "bbox": [0, 0, 1, 1]}


# ----------------------------------------------------------------------------- parsing


def test_polygons_decode_to_hand_drawn_masks(tmp_path):
    # Integer-vertex polygons cover [x0, x1) x [y0, y1) in pycocotools' rasterisation.
    rect = [[2, 3, 10, 3, 10, 8, 2, 8]]
    ell = [[1, 1, 6, 1, 6, 3, 3, 3, 3, 7, 1, 7]]  # an L: a bar on top, a leg on the left
    two_parts = [[0, 0, 2, 0, 2, 2, 0, 2], [12, 9, 16, 9, 16, 12, 12, 12]]  # one object in two pieces
    ann_file, img_dir = _write(tmp_path, [_ann(1, rect), _ann(2, ell), _ann(3, two_parts)])
    image, target = CocoDataset(ann_file, img_dir)[0]
    expected = np.stack([
        _hand((3, 8, 2, 10)),
        _hand((1, 3, 1, 6), (3, 7, 1, 3)),
        _hand((0, 2, 0, 2), (9, 12, 12, 16)),
    ])
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (3, H, W)
    np.testing.assert_array_equal(target["masks"].numpy(), expected)
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [0, 0, 0]
    assert target["image_id"] == 1 and target["orig_size"] == (H, W)
    assert image.dtype == torch.uint8 and image.shape == (3, H, W)
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), _image())


def test_rle_both_forms_and_crowd(tmp_path):
    a = _hand((0, 5, 0, 3))
    b = _hand((6, 12, 4, 9), (2, 4, 10, 16))
    c = _hand((1, 11, 14, 16))
    crowd = _hand((0, 12, 0, 16))
    rle_a = _uncompressed_rle(a)
    assert rle_a["counts"][:3] == [0, 5, 7]  # the first column: 5 ones, then 7 zeros
    anns = [
        _ann(10, rle_a),                          # uncompressed: counts a list of ints
        _ann(11, _compressed_rle(b)),             # compressed: counts a string
        _ann(12, _uncompressed_rle(crowd), crowd=1),  # crowd regions (COCO writes them uncompressed): skipped
        _ann(13, [[14, 1, 16, 1, 16, 11, 14, 11]], crowd=0),
        _ann(14, [[0, 0, 16, 0, 16, 12, 0, 12]], crowd=1),  # a crowd polygon: skipped too
    ]
    ann_file, img_dir = _write(tmp_path, anns)
    _, target = CocoDataset(ann_file, img_dir)[0]
    np.testing.assert_array_equal(target["masks"].numpy(), np.stack([a, b, c]))
    assert target["labels"].tolist() == [0, 0, 0]


def test_rle_counts_as_bytes_and_degenerate_polygons(tmp_path):
    # Counts given as bytes (as pycocotools.encode returns them) work; a polygon of fewer
    # than 3 points is dropped, and an annotation made only of such polygons is skipped
    # with a warning, while pycocotools alone would read [x, y, x, y] as a box.
    b = _hand((2, 6, 3, 9))
    ds_dir = tmp_path
    ann_file, img_dir = _write(ds_dir, [_ann(1, [[1, 1, 5, 5]]),
                                        _ann(2, [[2, 6, 9, 6, 9, 10, 2, 10], [0, 0, 3, 3]])])
    ds = CocoDataset(ann_file, img_dir)
    with pytest.warns(UserWarning, match="annotation id 1 has only polygons of fewer than 3 points"):
        _, target = ds[0]
    np.testing.assert_array_equal(target["masks"].numpy(), _hand((6, 10, 2, 9))[None])
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(b))
    ds.coco.anns[2]["segmentation"] = {"size": [H, W], "counts": rle["counts"]}  # bytes
    _, target = ds[0]
    np.testing.assert_array_equal(target["masks"].numpy(), b[None])


def test_annotations_with_nothing_inside_the_image_are_dropped(tmp_path):
    outside = [[20, 0, 30, 0, 30, 5, 20, 5]]  # entirely right of the 16-pixel-wide image
    ann_file, img_dir = _write(tmp_path, [_ann(1, outside), _ann(2, [[0, 0, 3, 0, 3, 2, 0, 2]]),
                                          _ann(3, _uncompressed_rle(_hand()))])
    _, target = CocoDataset(ann_file, img_dir)[0]
    np.testing.assert_array_equal(target["masks"].numpy(), _hand((0, 2, 0, 3))[None])
    assert target["labels"].tolist() == [0]


def test_non_contiguous_category_ids(tmp_path):
    cats = [{"id": 11, "name": "kite"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
    anns = [_ann(1, [[0, 0, 4, 0, 4, 4, 0, 4]], cat=7), _ann(2, [[5, 5, 8, 5, 8, 8, 5, 8]], cat=11),
            _ann(3, [[9, 1, 12, 1, 12, 4, 9, 4]], cat=3)]
    ann_file, img_dir = _write(tmp_path, anns, categories=cats)
    ds = CocoDataset(ann_file, img_dir)
    assert ds.cat_ids == [3, 7, 11]
    assert ds.class_names == ["car", "train", "kite"]
    assert ds.num_classes == 3
    assert ds.label_to_cat_id == {0: 3, 1: 7, 2: 11}
    assert ds.cat_id_to_label == {3: 0, 7: 1, 11: 2}
    _, target = ds[0]
    assert target["labels"].tolist() == [1, 2, 0]
    assert [ds.cat_ids[label] for label in target["labels"].tolist()] == [7, 11, 3]


def test_image_without_annotations_is_kept(tmp_path):
    images = [{"id": 5, "file_name": "a.png", "height": H, "width": W},
              {"id": 9, "file_name": "b.png", "height": 7, "width": 5}]
    ann_file, img_dir = _write(tmp_path, [_ann(1, [[0, 0, 4, 0, 4, 4, 0, 4]], image_id=5)], images=images)
    # A file with no "annotations" key at all (a test split) is fine too.
    data = json.loads(open(ann_file).read())
    ds = CocoDataset(ann_file, img_dir)
    assert len(ds) == 2 and ds.image_ids == [5, 9]
    image, target = ds[1]
    assert image.shape == (3, 7, 5)
    assert target["masks"].shape == (0, 7, 5) and target["masks"].dtype == torch.uint8
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["image_id"] == 9 and target["orig_size"] == (7, 5)
    del data["annotations"]
    with open(ann_file, "w") as f:
        json.dump(data, f)
    assert CocoDataset(ann_file, img_dir)[0][1]["masks"].shape == (0, H, W)


def test_collate_keeps_lists(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": H, "width": W},
              {"id": 2, "file_name": "b.png", "height": 9, "width": 11}]
    ann_file, img_dir = _write(tmp_path, [_ann(1, [[0, 0, 4, 0, 4, 4, 0, 4]])], images=images)
    ds = CocoDataset(ann_file, img_dir)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    imgs, targets = next(iter(loader))
    assert isinstance(imgs, list) and isinstance(targets, list)
    assert [tuple(i.shape) for i in imgs] == [(3, H, W), (3, 9, 11)]
    assert [t["image_id"] for t in targets] == [1, 2]
    assert [t["masks"].shape[0] for t in targets] == [1, 0]


# ----------------------------------------------------------------------------- errors


def test_missing_files(tmp_path):
    ann_file, img_dir = _write(tmp_path, [_ann(1, [[0, 0, 4, 0, 4, 4, 0, 4]])])
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="ann_file: annotation file not found: .*nope.json"):
        CocoDataset(missing, img_dir)
    with pytest.raises(FileNotFoundError, match="img_dir: image folder not found: .*no_images"):
        CocoDataset(ann_file, str(tmp_path / "no_images"))
    os.remove(os.path.join(img_dir, "a.png"))
    ds = CocoDataset(ann_file, img_dir)  # images are read lazily, one item at a time
    with pytest.raises(FileNotFoundError, match=r"image id 1: no image file at .*a\.png"):
        ds[0]


def test_corrupt_image_and_size_mismatch(tmp_path):
    ann_file, img_dir = _write(tmp_path, [_ann(1, [[0, 0, 4, 0, 4, 4, 0, 4]])])
    path = os.path.join(img_dir, "a.png")
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError, match=r"image id 1: .*a\.png.* is not a readable image"):
        CocoDataset(ann_file, img_dir)[0]
    with open(path, "rb+") as f:  # a valid header, then a truncated body
        from PIL import Image

        Image.fromarray(_image(40, 40)).save(path)
        f.truncate(60)
    with pytest.raises(ValueError, match=r"a\.png"):
        CocoDataset(ann_file, img_dir)[0]
    from PIL import Image

    Image.fromarray(_image(H + 1, W)).save(path)
    with pytest.raises(ValueError, match=r"a\.png is 13x16 \(HxW\), but the annotation file says 12x16"):
        CocoDataset(ann_file, img_dir)[0]


def test_unknown_image_or_category(tmp_path):
    ann_file, img_dir = _write(tmp_path, [_ann(1, [[0, 0, 4, 0, 4, 4, 0, 4]]),
                                          _ann(77, [[0, 0, 4, 0, 4, 4, 0, 4]], image_id=42)])
    with pytest.raises(ValueError, match="annotation id 77 refers to image id 42, which is not in the file's images"):
        CocoDataset(ann_file, img_dir)
    ann_file, img_dir = _write(tmp_path, [_ann(78, [[0, 0, 4, 0, 4, 4, 0, 4]], cat=5)])
    with pytest.raises(ValueError, match="annotation id 78 refers to category id 5, which is not in the file's categories"):
        CocoDataset(ann_file, img_dir)


@pytest.mark.parametrize("seg, message", [
    ([[0, 0, 4, 0, 4]], "even number of coordinates"),
    ([], "empty list of polygons"),
    ([0, 0, 4, 0, 4, 4], "even number of coordinates"),  # a flat list, not a list of polygons
    ("0 0 4 4", "expected polygons .* or an RLE"),
    ({"counts": [0, 5]}, "needs 'counts' and 'size'"),
    ({"size": [H + 1, W], "counts": [H * W + W]}, r"RLE size \[13, 16\] does not match .* \[12, 16\]"),
    ({"size": [H, W], "counts": [3, 4]}, "add up to 7, not height \\* width = 192"),
    ({"size": [H, W], "counts": [-1, H * W + 1]}, "non-negative integers"),
    ({"size": [H, W], "counts": "0\x7f"}, "compressed RLE counts"),
    ({"size": [H, W], "counts": "e3"}, "compressed RLE counts|add up to"),
    ({"size": [H, W], "counts": 5}, "must be a list or a string"),
])
def test_malformed_segmentation(tmp_path, seg, message):
    ann_file, img_dir = _write(tmp_path, [_ann(1, [[0, 0, 4, 0, 4, 4, 0, 4]]), _ann(31, seg)])
    with pytest.raises(ValueError, match="annotation id 31: malformed segmentation: .*" + message):
        CocoDataset(ann_file, img_dir)


@pytest.mark.parametrize("coord", ["1", None, float("nan"), [1]])
def test_malformed_polygon_coordinates(tmp_path, coord):
    ann_file, img_dir = _write(tmp_path, [_ann(32, [[0, 0, 4, 0, 4, coord]])])
    ds = CocoDataset(ann_file, img_dir)  # values are checked when the item is decoded
    with pytest.raises(ValueError, match="annotation id 32: malformed segmentation: polygon coordinates"):
        ds[0]


def test_malformed_files(tmp_path):
    ann_file, img_dir = _write(tmp_path, [])
    with open(ann_file, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        CocoDataset(ann_file, img_dir)
    with open(ann_file, "w") as f:
        json.dump({"images": [{"id": 1, "file_name": "a.png"}], "categories": []}, f)
    with pytest.raises(ValueError, match="every image needs id, file_name, height and width"):
        CocoDataset(ann_file, img_dir)
    with open(ann_file, "w") as f:
        json.dump({"images": [], "annotations": [{"id": 1}, {"id": 1}], "categories": []}, f)
    with pytest.raises(ValueError, match="refers to image id None"):
        CocoDataset(ann_file, img_dir)


# ----------------------------------------------------------------------------- synthetic


def test_draw_scene_occlusion_limit():
    img, masks, labels = draw_scene(64, 80, num_objects=6, seed=3, size_range=(0.2, 0.6), log_sizes=True,
                                    max_occlusion=0.0)
    # Nothing may hide anything: the visible masks are the full shapes, disjoint.
    assert masks.shape[0] == len(labels) >= 1
    assert masks.sum(0).max() <= 1
    with pytest.raises(ValueError, match="size_range"):
        draw_scene(32, 32, size_range=(0.5, 0.1))


def test_synthetic_round_trip(tmp_path):
    path = write_shapes_dataset(str(tmp_path), 3, height=48, width=64, seed=7, split="val")
    assert path == os.path.join(str(tmp_path), "annotations", "instances_val.json")
    ds = CocoDataset(path, shapes_image_dir(str(tmp_path), "val"))
    assert len(ds) == 3 and ds.cat_ids == [1, 2, 3] and ds.class_names == list(SHAPES)
    data = json.load(open(path))
    assert all(a["iscrowd"] == 0 and a["area"] > 0 and len(a["bbox"]) == 4 for a in data["annotations"])
    for i in range(len(ds)):
        image, target = ds[i]
        img, masks, labels = draw_scene(48, 64, **shapes_scene_kwargs(7, "val", i))
        assert target["image_id"] == i + 1
        np.testing.assert_array_equal(target["masks"].numpy(), masks)
        np.testing.assert_array_equal(target["labels"].numpy(), labels)
        assert image.dtype == torch.uint8
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), img)
    # Deterministic per seed, and splits of one seed differ.
    again = write_shapes_dataset(str(tmp_path / "again"), 3, height=48, width=64, seed=7, split="val")
    assert open(again).read().replace("again/", "") == open(path).read()
    for name in os.listdir(shapes_image_dir(str(tmp_path), "val")):
        with open(os.path.join(shapes_image_dir(str(tmp_path), "val"), name), "rb") as f1, \
                open(os.path.join(shapes_image_dir(str(tmp_path / "again"), "val"), name), "rb") as f2:
            assert f1.read() == f2.read()
    train = json.load(open(write_shapes_dataset(str(tmp_path), 3, height=48, width=64, seed=7, split="train")))
    assert train["annotations"] != data["annotations"]


def test_synthetic_sizes_span_every_fpn_level():
    # Object sizes relative to the short side, scaled to the short side the model
    # resizes to, cover each of the five scale ranges (SOLO at 800, SOLOv2-light at 448).
    from solo_fast.modeling.configs import SCALE_RANGES, SCALE_RANGES_SOLOV2_LIGHT
    from solo_fast.ops.reference import masks_to_boxes

    sizes = []
    for i in range(24):
        kw = shapes_scene_kwargs(0, "train", i)
        _, masks, _ = draw_scene(60, 80, **kw)
        boxes = masks_to_boxes(torch.from_numpy(masks)).double()
        sizes += (((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt() / 60).tolist()
    sizes = np.array(sizes)
    assert 2 * 24 <= len(sizes) <= 7 * 24
    for short, ranges in ((800, SCALE_RANGES), (448, SCALE_RANGES_SOLOV2_LIGHT)):
        for lo, hi in ranges:
            assert ((sizes * short >= lo) & (sizes * short <= hi)).any(), (short, lo, hi)


def test_synthetic_size_and_count_settings(tmp_path):
    # Larger, fewer shapes (the demo's small images): every mask's sqrt(box area) within the
    # size range (occlusion only shrinks masks; the triangle's box is up to ~1.5x its size).
    from solo_fast.ops.reference import masks_to_boxes

    path = write_shapes_dataset(str(tmp_path), 12, height=64, width=64, seed=3, split="train",
                                size_range=(0.3, 0.5), objects=(1, 2), max_occlusion=0.2)
    ds = CocoDataset(path, shapes_image_dir(str(tmp_path), "train"))
    counts = []
    for i in range(len(ds)):
        _, target = ds[i]
        counts.append(len(target["labels"]))
        boxes = masks_to_boxes(target["masks"].bool()).double()
        sizes = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt() / 64
        assert (sizes <= 0.5 * 1.5).all() and (sizes >= 0.3 * 0.4).all(), sizes
    assert set(counts) <= {1, 2} and 1 in counts and 2 in counts
    with pytest.raises(ValueError, match="objects"):
        write_shapes_dataset(str(tmp_path), 1, height=32, width=32, seed=0, objects=(3, 1))


def test_ground_truth_as_predictions_gives_ap_1(tmp_path):
    from pycocotools.cocoeval import COCOeval

    from solo_fast.results import SOLOResult, masks_to_boxes

    path = write_shapes_dataset(str(tmp_path), 4, height=64, width=80, seed=1, split="val")
    ds = CocoDataset(path, shapes_image_dir(str(tmp_path), "val"))
    results = []
    for i in range(len(ds)):
        _, target = ds[i]
        masks = target["masks"].bool()
        n = masks.shape[0]
        r = SOLOResult(masks, torch.linspace(1.0, 0.5, n), target["labels"], masks_to_boxes(masks))
        results += r.to_coco(target["image_id"], ds.cat_ids)
    assert len(results) == len(ds.coco.anns)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = ds.coco.loadRes(results)
        ev = COCOeval(ds.coco, dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # AP @ IoU 0.50:0.95
    assert ev.stats[1] == pytest.approx(1.0)  # AP @ 0.50
