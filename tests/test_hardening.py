"""Hardening: bad input is rejected with a ValueError naming the argument, nothing is
modified in place, NaN/Inf give a clear error or the documented result, and the same
inputs give the same outputs.

NaN/Inf policy (README, "What is checked and what is rejected"):
- images: NaN/Inf -> ValueError; the network's outputs (non-finite weights, an fp16
  overflow) -> ValueError from predict / forward in eval mode;
- matrix_nms: NaN/Inf scores, NaN/Inf/negative mask_area -> ValueError;
- center_region_assign: NaN/Inf boxes -> ValueError;
- mask_predict: NaN logits give NaN soft values that are outside the binary mask and
  count in neither area nor maskness;
- coord_conv2d: NaN/Inf propagate exactly as through F.conv2d (not checked: a device
  sync per layer).
"""
import numpy as np
import pytest
import torch

import solo_fast
from solo_fast import ops

from helpers import two_box_scene

SMALL = dict(min_size=64, max_size=64, num_grids=(6, 5, 4, 3, 2))
BACKENDS = {op: ops.available_backends(op, "cpu") for op in ("matrix_nms", "center_region_assign",
                                                            "coord_conv2d", "mask_predict")}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, **SMALL).eval()


def _nms_args():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 8, 9, generator=g) > 0.4
    masks[4] = masks[1]
    return masks, torch.tensor([0, 1, 0, 0, 1]), torch.tensor([0.9, 0.5, 0.5, 0.2, 0.7])


def _conv_args():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 6, 7, generator=g), torch.randn(4, 5, 3, 3, generator=g), torch.randn(4, generator=g)


def _mp_args():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, 7, generator=g), torch.randn(4, 6, generator=g), torch.randn(4, generator=g)


# ------------------------------------------------------------------------ bad input
M, L, S = _nms_args()
AM, AL, AB, ACFG = two_box_scene()
X, W, B = _conv_args()
F_, K_, KB = _mp_args()

BAD_OP_CALLS = [
    # matrix_nms
    ("masks", lambda: ops.matrix_nms(M.numpy(), L, S)),
    ("masks", lambda: ops.matrix_nms(M[0], L, S)),
    ("masks", lambda: ops.matrix_nms(M.float(), L, S)),
    ("masks", lambda: ops.matrix_nms(M.to(torch.uint8) * 2, L, S)),
    ("labels", lambda: ops.matrix_nms(M, L[:3], S)),
    ("labels", lambda: ops.matrix_nms(M, L.float(), S)),
    ("scores", lambda: ops.matrix_nms(M, L, S.long())),
    ("scores", lambda: ops.matrix_nms(M, L, S[:, None])),
    ("scores", lambda: ops.matrix_nms(M, L, torch.tensor([0.9, float("inf"), 0.5, 0.2, 0.7]))),
    ("scores", lambda: ops.matrix_nms(M, L, torch.tensor([0.9, float("nan"), 0.5, 0.2, 0.7]))),
    ("mask_area", lambda: ops.matrix_nms(M, L, S, mask_area=torch.tensor([1, 2, -3, 4, 5]))),
    ("mask_area", lambda: ops.matrix_nms(M, L, S, mask_area=torch.tensor([1.0, 2, float("nan"), 4, 5]))),
    ("mask_area", lambda: ops.matrix_nms(M, L, S, mask_area=torch.ones(4))),
    ("kernel", lambda: ops.matrix_nms(M, L, S, kernel="box")),
    ("sigma", lambda: ops.matrix_nms(M, L, S, sigma=0)),
    ("filter_thr", lambda: ops.matrix_nms(M, L, S, filter_thr="0.1")),
    ("filter_thr", lambda: ops.matrix_nms(M, L, S, filter_thr=float("nan"))),
    ("nms_pre", lambda: ops.matrix_nms(M, L, S, nms_pre=2.5)),
    ("max_num", lambda: ops.matrix_nms(M, L, S, max_num=True)),
    ("backend", lambda: ops.matrix_nms(M, L, S, backend="gpu")),
    # center_region_assign
    ("gt_masks", lambda: ops.center_region_assign(AM.float(), AL, AB, **ACFG)),
    ("gt_masks", lambda: ops.center_region_assign(AM[:, :16], AL, AB, **ACFG)),
    ("gt_labels", lambda: ops.center_region_assign(AM, AL[:1], AB, **ACFG)),
    ("gt_labels", lambda: ops.center_region_assign(AM, AL + 5, AB, **ACFG)),
    ("gt_labels", lambda: ops.center_region_assign(AM, AL.float(), AB, **ACFG)),
    ("gt_boxes", lambda: ops.center_region_assign(AM, AL, AB[:, :3], **ACFG)),
    ("gt_boxes", lambda: ops.center_region_assign(AM, AL, AB.flip(1), **ACFG)),
    ("gt_boxes", lambda: ops.center_region_assign(AM, AL, AB * float("nan"), **ACFG)),
    ("gt_boxes", lambda: ops.center_region_assign(AM, AL, AB * float("inf"), **ACFG)),
    ("pad_shape", lambda: ops.center_region_assign(AM, AL, AB, **{**ACFG, "pad_shape": (32, -32)})),
    ("num_grids", lambda: ops.center_region_assign(AM, AL, AB, **{**ACFG, "num_grids": [4, 0]})),
    ("scale_ranges", lambda: ops.center_region_assign(AM, AL, AB, **{**ACFG, "scale_ranges": [(1, 16)]})),
    ("scale_ranges", lambda: ops.center_region_assign(AM, AL, AB, **{**ACFG, "scale_ranges": [(16, 1), (1, 2)]})),
    ("pos_scale", lambda: ops.center_region_assign(AM, AL, AB, **{**ACFG, "pos_scale": 2.0})),
    ("num_classes", lambda: ops.center_region_assign(AM, AL, AB, **{**ACFG, "num_classes": 0})),
    ("mask_stride", lambda: ops.center_region_assign(AM, AL, AB, **{**ACFG, "mask_stride": 5})),
    ("gt_masks", lambda: ops.center_region_assign_batch(AM, [AL], **ACFG)),
    ("gt_labels", lambda: ops.center_region_assign_batch([AM, AM], [AL], **ACFG)),
    ("gt_boxes", lambda: ops.center_region_assign_batch([AM], [AL], [AB, AB], **ACFG)),
    # coord_conv2d
    ("x", lambda: ops.coord_conv2d(X[0], W, B)),
    ("x", lambda: ops.coord_conv2d(X.long(), W, B)),
    ("x", lambda: ops.coord_conv2d(X[:, :, :1, :1], W, B, padding=0)),
    ("weight", lambda: ops.coord_conv2d(X, W[:, :4], B)),
    ("weight", lambda: ops.coord_conv2d(X, W.double(), B)),
    ("bias", lambda: ops.coord_conv2d(X, W, B[:2])),
    ("bias", lambda: ops.coord_conv2d(X, W, B.long())),
    ("coords", lambda: ops.coord_conv2d(X, W, B, coords="yx")),
    ("padding", lambda: ops.coord_conv2d(X, W, B, padding=-1)),
    ("padding", lambda: ops.coord_conv2d(X, W, B, padding=1.0)),
    ("coord_src_size", lambda: ops.coord_conv2d(X, W, B, coord_src_size=(0, 4))),
    ("coord_src_size", lambda: ops.coord_conv2d(X, W, B, coord_src_size=(True, 4))),
    # mask_predict
    ("features", lambda: ops.mask_predict(F_[0], K_, KB)),
    ("features", lambda: ops.mask_predict(F_.int(), K_, KB)),
    ("kernels", lambda: ops.mask_predict(F_, K_[:, :3], KB)),
    ("kernels", lambda: ops.mask_predict(F_, K_.numpy(), KB)),
    ("bias", lambda: ops.mask_predict(F_, K_, KB[:1])),
    ("mask_thr", lambda: ops.mask_predict(F_, K_, KB, mask_thr=1.5)),
    ("mask_thr", lambda: ops.mask_predict(F_, K_, KB, mask_thr=True)),
    ("mask_thr", lambda: ops.mask_predict(F_, K_, KB, mask_thr=float("nan"))),
    ("out_dtype", lambda: ops.mask_predict(F_, K_, KB, out_dtype=torch.int32)),
]


@pytest.mark.parametrize("name,call", BAD_OP_CALLS, ids=[f"{i}-{n}" for i, (n, _) in enumerate(BAD_OP_CALLS)])
def test_ops_reject_bad_input(name, call):
    with pytest.raises(ValueError, match=name):
        call()


BAD_CONFIGS = [
    ("config", dict(config="solov2_light_r18")),
    ("num_classes", dict(num_classes=2.0)),
    ("min_size", dict(min_size=0)),
    ("min_size", dict(min_size=(64, "x"))),
    ("max_size", dict(max_size=-5)),
    ("num_grids", dict(num_grids=(6, 5, 0, 3, 2))),
    ("num_grids", dict(num_grids=(6, 5, 4))),
    ("feat_channels", dict(feat_channels=100)),
    ("depth", dict(depth=20)),
    ("frozen_stages", dict(frozen_stages=7)),
    ("norm_eval", dict(norm_eval="yes")),
    ("scale_ranges", dict(scale_ranges=((1, 56), (28, 112), (56, 224), (112, 448), (900, 896)))),
    ("pos_scale", dict(pos_scale=-0.1)),
    ("score_thr", dict(score_thr=float("nan"))),
    ("nms_kernel", dict(nms_kernel="hard")),
    ("nms_sigma", dict(nms_sigma=0.0)),
    ("nms_pre", dict(nms_pre=0)),
    ("mask_loss_weight", dict(mask_loss_weight=float("inf"))),
]


@pytest.mark.parametrize("name,kwargs", BAD_CONFIGS, ids=[f"{i}-{n}" for i, (n, _) in enumerate(BAD_CONFIGS)])
def test_model_rejects_bad_config(name, kwargs):
    kw = {"config": "solov2_light_r18_fpn", "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        solo_fast.SOLO(kw.pop("config"), **kw)


def test_predict_rejects_bad_input(model):
    img = torch.rand(3, 40, 50)
    for name, call in [
        ("images", lambda: model.predict([])),
        ("images", lambda: model.predict(torch.rand(40, 50))),
        ("images", lambda: model.predict([img, 3])),
        ("images", lambda: model.predict(torch.full((3, 8, 8), float("inf")))),
        ("images", lambda: model.predict(torch.randint(0, 255, (3, 8, 8)))),
        ("images", lambda: model.predict(np.zeros((0, 5, 3), np.uint8))),
        ("images", lambda: model.predict(torch.rand(3, 0, 5))),
        ("images", lambda: model.predict(-img)),
        ("batch_size", lambda: model.predict(img, batch_size=0)),
        ("mask_thr", lambda: model.predict(img, mask_thr=-0.5)),
        ("max_per_img", lambda: model.predict(img, max_per_img=2.5)),
        ("score_threshold", lambda: model.predict(img, score_threshold=0.5)),
    ]:
        with pytest.raises(ValueError, match=name):
            call()


def _result():
    masks = torch.zeros(2, 30, 40, dtype=torch.bool)
    masks[0, 2:10, 3:20] = True
    masks[1, 15:29, 20:39] = True
    return masks, torch.tensor([0.9, 0.4]), torch.tensor([1, 0]), solo_fast.results.masks_to_boxes(masks)


def test_result_rejects_bad_input():
    masks, scores, labels, boxes = _result()
    img = np.zeros((30, 40, 3), np.uint8)
    for name, kw in [
        ("masks", dict(masks=masks.to(torch.uint8))),
        ("masks", dict(masks=masks[0])),
        ("scores", dict(scores=scores[:1])),
        ("scores", dict(scores=scores.long())),
        ("labels", dict(labels=labels.float())),
        ("boxes", dict(boxes=boxes[:, :2])),
        ("image", dict(image=np.zeros((30, 41, 3), np.uint8))),
        ("image", dict(image=np.zeros((30, 40, 3), np.float32))),
        ("class_names", dict(class_names="ab")),
    ]:
        fields = dict(masks=masks, scores=scores, labels=labels, boxes=boxes, image=img)
        fields.update(kw)
        with pytest.raises(ValueError, match=name):
            solo_fast.SOLOResult(**fields)
    r = solo_fast.SOLOResult(masks, scores, labels, boxes, image=img)
    for name, call in [
        ("image_id", lambda: r.to_coco("7")),
        ("image_id", lambda: r.to_coco(7.0)),
        ("category_ids", lambda: r.to_coco(7, category_ids=[11])),
        ("category_ids", lambda: r.to_coco(7, category_ids="ab")),
        ("image", lambda: r.draw(image=np.zeros((3, 30, 40), np.uint8))),
        ("image", lambda: r.draw(image=np.zeros((31, 40, 3), np.uint8))),
        ("alpha", lambda: r.draw(alpha=2)),
        ("score_thr", lambda: r.draw(score_thr=None)),
        ("class_names", lambda: r.draw(class_names=[1, 2])),
    ]:
        with pytest.raises(ValueError, match=name):
            call()
    assert r.to_coco(np.int64(7))[0]["image_id"] == 7 and r.to_coco(torch.tensor(7))[0]["image_id"] == 7


# ------------------------------------------------------------------- nothing in place
def _op_calls(backend):
    """(op name, inputs, call(*inputs)) of every op on ``backend``."""
    out = []
    if backend in BACKENDS["matrix_nms"]:
        m, lab, s = _nms_args()
        out.append(("matrix_nms", (m, lab, s, m.flatten(1).sum(1)),
                    lambda m, lab, s, a: ops.matrix_nms(m, lab, s, mask_area=a, filter_thr=0.1, nms_pre=4,
                                                        backend=backend)))
        out.append(("matrix_nms", (m.to(torch.uint8), lab, s.double()),
                    lambda m, lab, s: ops.matrix_nms(m, lab, s, kernel="linear", backend=backend)))
    if backend in BACKENDS["center_region_assign"]:
        am, al, ab, cfg = two_box_scene()
        out.append(("center_region_assign", (am, al, ab),
                    lambda m, lab, b: ops.center_region_assign(m, lab, b, backend=backend, **cfg)))
        out.append(("center_region_assign", (am.bool(), al.int()),
                    lambda m, lab: ops.center_region_assign_batch([m, m], [lab, lab], backend=backend, **cfg)))
    if backend in BACKENDS["coord_conv2d"]:
        x, w, b = _conv_args()
        out.append(("coord_conv2d", (x, w, b),
                    lambda x, w, b: ops.coord_conv2d(x, w, b, coord_src_size=(3, 9), backend=backend)))
        out.append(("coord_conv2d", (x.contiguous(memory_format=torch.channels_last), w[:, :4], b),
                    lambda x, w, b: ops.coord_conv2d(x, w, b, coords="y", backend=backend)))
    if backend in BACKENDS["mask_predict"]:
        f, k, b = _mp_args()
        out.append(("mask_predict", (f, k, b), lambda f, k, b: ops.mask_predict(f, k, b, backend=backend)))
        out.append(("mask_predict", (f.bfloat16(), k.half()),
                    lambda f, k: ops.mask_predict(f, k, mask_thr=0.2, out_dtype=torch.float16, backend=backend)))
    return out


ALL_BACKENDS = sorted({b for bs in BACKENDS.values() for b in bs})


def _flatten(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _flatten(x)]
    return []


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ops_do_not_modify_inputs(backend):
    for name, inputs, call in _op_calls(backend):
        copies = [t.clone() for t in inputs]
        call(*inputs)
        for t, c in zip(inputs, copies):
            assert t.dtype == c.dtype and torch.equal(t, c), f"{name} ({backend}) modified an input"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ops_are_deterministic(backend):
    for name, inputs, call in _op_calls(backend):
        first, second = _flatten(call(*inputs)), _flatten(call(*inputs))
        assert len(first) == len(second)
        for a, b in zip(first, second):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{name} ({backend})"


def test_model_deterministic_and_inputs_untouched(model):
    img = torch.rand(3, 48, 60, generator=torch.Generator().manual_seed(1))
    arr = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    copies = (img.clone(), arr.copy())
    a = model.predict([img, arr], score_thr=0.005, filter_thr=0.0)
    b = model.predict([img, arr], score_thr=0.005, filter_thr=0.0)
    assert torch.equal(img, copies[0]) and np.array_equal(arr, copies[1])
    assert len(a[0]) > 0
    for ra, rb in zip(a, b):
        for f in ("masks", "scores", "labels", "boxes"):
            assert torch.equal(getattr(ra, f), getattr(rb, f))
    r = a[0]
    fields = [t.clone() for t in (r.masks, r.scores, r.labels, r.boxes)]
    r.to_coco(1, category_ids=[5, 6, 7])
    r.draw()
    assert all(torch.equal(t, c) for t, c in zip((r.masks, r.scores, r.labels, r.boxes), fields))


# ---------------------------------------------------------------------------- NaN/Inf
@pytest.mark.parametrize("where", ["neck", "mask_features"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_raise(value, where):
    torch.manual_seed(0)
    m = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, **SMALL).eval()
    with torch.no_grad():
        if where == "neck":  # reaches every output
            m.neck.lateral_convs[0].conv.weight[0, 0, 0, 0] = value
        else:  # reaches only the mask features (one channel of one output tensor)
            m.mask_head.mask_feature_head.conv_pred.conv.weight[0, 0, 0, 0] = value
    img = torch.rand(3, 64, 64)
    for call in (lambda: m.predict(img), lambda: m([img])):
        with pytest.raises(ValueError, match="NaN or Inf"):
            call()


@pytest.mark.parametrize("backend", BACKENDS["mask_predict"])
def test_mask_predict_nan_policy(backend):
    f, k, b = _mp_args()
    f[:, 1, 2] = float("nan")  # one pixel of every mask
    k[3] = float("nan")  # every pixel of mask 3
    soft, binary, area, maskness = ops.mask_predict(f, k, b, backend=backend)
    assert bool(torch.isnan(soft[:, 1, 2]).all()) and bool(torch.isnan(soft[3]).all())
    assert not bool(binary[:, 1, 2].any()) and not bool(binary[3].any())
    assert int(area[3]) == 0 and float(maskness[3]) == 0.0
    assert torch.equal(area, binary.sum((1, 2)))
    assert bool(torch.isfinite(maskness).all())
    # The other masks: as if the NaN pixel were simply outside them.
    clean = f.clone()
    clean[:, 1, 2] = 0.0
    ref_soft, ref_binary = ops.mask_predict(clean, k[:3], b[:3], backend="reference")[:2]
    ref_binary[:, 1, 2] = False
    want_area = ref_binary.sum((1, 2))
    assert torch.equal(area[:3], want_area)
    torch.testing.assert_close(maskness[:3], torch.where(ref_binary, ref_soft, 0.0).sum((1, 2)) / want_area)


@pytest.mark.parametrize("backend", BACKENDS["coord_conv2d"])
def test_coord_conv2d_propagates_nan_like_conv2d(backend):
    x, w, b = _conv_args()
    x[1, 0, 3, 3] = float("nan")
    y = ops.coord_conv2d(x, w, b, backend=backend)
    want = ops.coord_conv2d(x, w, b, backend="reference")
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert bool(torch.isnan(y[1, :, 2:5, 2:5]).all()) and not bool(torch.isnan(y[0]).any())
