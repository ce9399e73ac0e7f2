"""The public API of DESIGN.md §3: inputs, results, checkpoints, backend selection, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

import solo_fast
from solo_fast import ops

SMALL = dict(min_size=64, max_size=96, num_grids=(6, 5, 4, 3, 2))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=2, **SMALL).eval()
    # A fresh model scores every cell at the 0.01 prior; random class biases make it detect
    # things, so that the whole post-processing has work to do.
    with torch.no_grad():
        m.mask_head.conv_cls.bias.normal_(0.0, 1.0)
    return m


def test_predict_accepts_every_image_kind(model, tmp_path):
    arr = (np.random.RandomState(0).rand(50, 70, 3) * 255).astype(np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    kw = dict(score_thr=0.01, nms_pre=20, max_per_img=5)
    results = [model.predict(x, **kw)[0] for x in (str(path), Image.fromarray(arr), arr, chw)]
    results += model.predict([arr, chw], **kw)
    floats = [model.predict(chw.float() / 255, **kw)[0]]
    for r in results + floats:
        assert r.masks.shape[1:] == (50, 70) and r.masks.dtype == torch.bool
        assert len(r) <= 5 and r.boxes.shape == (len(r), 4)
        assert r.image.shape == (50, 70, 3) and np.array_equal(r.image, arr)
    # Every uint8 kind of input (the OpenCV path) gives the same answer: bit for bit alone
    # (one network input), to rounding in a batch of two (other conv blockings).
    assert len(results[0]) > 0
    for r in results[1:4]:
        assert torch.equal(r.scores, results[0].scores) and torch.equal(r.masks, results[0].masks)
    for r in results[4:]:
        torch.testing.assert_close(r.scores, results[0].scores)
        assert torch.equal(r.masks, results[0].masks)
    assert not model.training


def test_batched_equals_single(model):
    # Images that pad to the same 64 x 96 alone and together: batching must not change answers.
    torch.manual_seed(3)
    imgs = [torch.rand(3, 64, 96), torch.rand(3, 62, 90), torch.rand(3, 60, 96)]
    kw = dict(score_thr=0.01, nms_pre=30, max_per_img=10)
    single = [model.predict(x, **kw)[0] for x in imgs]
    for bs in (2, 3):
        batched = model.predict(imgs, batch_size=bs, **kw)
        assert len(batched) == 3
        for a, b in zip(single, batched):
            assert a.masks.shape == b.masks.shape and len(a) > 0
            torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
            assert torch.equal(a.labels, b.labels)
            assert (a.masks == b.masks).float().mean() > 0.999


def test_results_to_coco_and_draw(model):
    masks = torch.zeros(2, 30, 40, dtype=torch.bool)
    masks[0, 2:10, 3:20] = True
    masks[1, 15:29, 20:39] = True
    r = solo_fast.SOLOResult(masks, torch.tensor([0.9, 0.4]), torch.tensor([1, 0]),
                             solo_fast.results.masks_to_boxes(masks), image=np.zeros((30, 40, 3), np.uint8))
    assert r.boxes[0].tolist() == [3, 2, 20, 10]
    coco = r.to_coco(7, category_ids=[11, 22])
    assert [d["category_id"] for d in coco] == [22, 11] and coco[0]["image_id"] == 7
    assert coco[0]["bbox"] == [3.0, 2.0, 17.0, 8.0]
    from pycocotools import mask as mask_utils

    decoded = mask_utils.decode({"size": coco[1]["segmentation"]["size"],
                                 "counts": coco[1]["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), masks[1].numpy())
    img = r.draw()
    assert img.size == (40, 30)
    px = np.asarray(img)
    assert px[5, 10].sum() > 0 and px[0, 39].sum() == 0  # coloured inside a mask, untouched outside
    with pytest.raises(ValueError, match="category_ids"):
        r.to_coco(1, category_ids=[5])


def test_coco_eval_ground_truth_as_predictions_gives_ap_1():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from pycocotools import mask as mask_utils

    masks = torch.zeros(3, 60, 80, dtype=torch.bool)
    masks[0, 5:25, 5:30] = True
    masks[1, 30:58, 10:70] = True
    masks[2, 2:20, 50:78] = True
    labels = torch.tensor([0, 1, 0])
    anns = []
    for i, m in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        x1, y1, x2, y2 = solo_fast.results.masks_to_boxes(m[None])[0].tolist()
        anns.append({"id": i + 1, "image_id": 1, "category_id": [3, 5][int(labels[i])], "segmentation": rle,
                     "area": float(m.sum()), "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0})
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "height": 60, "width": 80}], "annotations": anns,
                  "categories": [{"id": 3, "name": "a"}, {"id": 5, "name": "b"}]}
    gt.createIndex()
    r = solo_fast.SOLOResult(masks, torch.tensor([0.9, 0.8, 0.7]), labels, solo_fast.results.masks_to_boxes(masks))
    dt = gt.loadRes(r.to_coco(1, category_ids=[3, 5]))
    ev = COCOeval(gt, dt, "segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_checkpoint_round_trip(model, tmp_path):
    model.class_names = ["cat", "dog"]
    path = model.save_pretrained(str(tmp_path / "run"))
    loaded = solo_fast.SOLO.from_pretrained(path).eval()
    assert loaded.config_name == model.config_name and loaded.class_names == ["cat", "dog"]
    assert loaded.cfg["num_grids"] == tuple(model.cfg["num_grids"])
    img = torch.rand(3, 64, 64)
    a = model.predict(img, score_thr=0.01)[0]
    b = loaded.predict(img, score_thr=0.01)[0]
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
    assert torch.equal(a.masks, b.masks)
    with pytest.raises(FileNotFoundError, match="path"):
        solo_fast.SOLO.from_pretrained(str(tmp_path / "missing.safetensors"))


def test_backend_selection(monkeypatch):
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2, :2] = True
    args = (masks, torch.tensor([0, 0]), torch.tensor([0.9, 0.5]))
    assert solo_fast.current_backend() == "auto"
    with solo_fast.use_backend("reference"):
        assert solo_fast.current_backend() == "reference"
        out = ops.matrix_nms(*args)
    torch.testing.assert_close(out[0], torch.tensor([0.9, 0.5 * float(np.exp(-2.0))]))
    monkeypatch.setenv("SOLO_FAST_BACKEND", "reference")
    assert solo_fast.current_backend() == "reference"
    monkeypatch.setenv("SOLO_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SOLO_FAST_BACKEND"):
        ops.matrix_nms(*args)
    monkeypatch.delenv("SOLO_FAST_BACKEND")
    with pytest.raises(ValueError, match="backend"):
        ops.matrix_nms(*args, backend="gpu")
    with pytest.raises(ValueError, match="use_backend"):
        with solo_fast.use_backend("fastest"):
            pass
    # A backend that is asked for and cannot run here is a clear error, not a silent fallback.
    with pytest.raises(solo_fast.BackendUnavailableError):
        ops.matrix_nms(*args, backend="cuda")


def test_model_follows_use_backend(model):
    """The whole model runs on the reference path inside use_backend('reference')."""
    calls = []
    from solo_fast import _backend

    real = _backend.resolve

    def spy(op, backend, device_type):
        name, fn = real(op, backend, device_type)
        calls.append((op, name))
        return name, fn

    _backend.resolve = spy
    try:
        with solo_fast.use_backend("reference"):
            model.predict(torch.rand(3, 64, 64), score_thr=0.01)
            model.train()
            img = torch.rand(3, 64, 64)
            m = torch.zeros(1, 64, 64, dtype=torch.uint8)
            m[0, 10:40, 10:40] = 1
            model([img], [{"masks": m, "labels": torch.tensor([1])}])
            model.eval()
    finally:
        _backend.resolve = real
    ops_seen = {op for op, _ in calls}
    assert {"coord_conv2d", "mask_predict", "center_region_assign"} <= ops_seen
    assert all(name == "reference" for _, name in calls)


# ------------------------------------------------------------------------- bad input
def test_bad_input_raises_value_error(model):
    with pytest.raises(ValueError, match="config"):
        solo_fast.SOLO("solov3_r50_fpn")
    with pytest.raises(ValueError, match="num_classes"):
        solo_fast.SOLO("solo_r18_fpn", num_classes=0)
    with pytest.raises(ValueError, match="not a setting"):
        solo_fast.SOLO("solo_r18_fpn", num_classes=2, min_sizes=3)
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(64, 64))  # wrong rank
    with pytest.raises(ValueError, match="channels"):
        model([torch.rand(4, 64, 64)])
    with pytest.raises(ValueError, match="images"):
        model.predict(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        model.predict(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.predict(torch.full((3, 10, 10), 2.0))
    with pytest.raises(ValueError, match="finite"):
        model.predict(torch.full((3, 10, 10), float("nan")))
    with pytest.raises(FileNotFoundError):
        model.predict("/no/such/image.png")
    with pytest.raises(ValueError, match="score_thr"):
        model.predict(torch.rand(3, 10, 10), score_thr=2)
    with pytest.raises(ValueError, match="not an inference setting"):
        model.predict(torch.rand(3, 10, 10), sigma=3)
    model.train()
    try:
        img = torch.rand(3, 64, 64)
        good = torch.zeros(1, 64, 64, dtype=torch.uint8)
        with pytest.raises(ValueError, match="image's size"):
            model([img], [{"masks": torch.zeros(1, 32, 64, dtype=torch.uint8), "labels": torch.tensor([0])}])
        with pytest.raises(ValueError, match=r"labels.*\[0, 2\)"):
            model([img], [{"masks": good, "labels": torch.tensor([2])}])
        with pytest.raises(ValueError, match="labels"):
            model([img], [{"masks": good, "labels": torch.tensor([0, 1])}])
        with pytest.raises(ValueError, match="targets"):
            model([img])
        with pytest.raises(ValueError, match="targets"):
            model([img], [])
    finally:
        model.eval()


def test_corrupt_image_file(model, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="not a readable image"):
        model.predict(str(bad))


def test_inputs_not_modified(model):
    img = torch.rand(3, 64, 64)
    m = torch.zeros(1, 64, 64, dtype=torch.uint8)
    m[0, 5:30, 5:30] = 1
    labels = torch.tensor([1])
    copies = (img.clone(), m.clone(), labels.clone())
    model.predict(img, score_thr=0.01)
    model.train()
    model([img], [{"masks": m, "labels": labels}])
    model.eval()
    assert torch.equal(img, copies[0]) and torch.equal(m, copies[1]) and torch.equal(labels, copies[2])
