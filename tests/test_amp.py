"""Mixed precision: every op accepts fp16/bf16 inputs, and inference under autocast
(bf16 on the CPU here; fp16/bf16 on a GPU, tests marked ``cuda``) gives the fp32 masks.

Output dtypes (the ops' docstrings):
- ``coord_conv2d``: the dtype of ``x`` (= weight's), or the autocast dtype, as ``F.conv2d``;
- ``mask_predict``: fp32 logits whatever the inputs; ``soft`` in ``out_dtype`` (default
  fp16 on the GPU, fp32 on the CPU), ``binary`` bool, ``area`` int64, ``maskness`` fp32;
- ``matrix_nms``: scores in the dtype of ``scores``; intersections exact (fp32/int32);
- ``center_region_assign``: boxes of any float dtype, read in float64.
The last three run with autocast off, so autocast never changes their result.
"""
import contextlib

import pytest
import torch

import solo_fast
from solo_fast import ops
from solo_fast.ops import reference

from helpers import (FAST, assert_low_precision_agrees, available, overfit_scene, train_on_overfit_scene,
                     two_box_scene)

HALF = [torch.float16, torch.bfloat16]


def _backends(op):
    return available(op, among=("reference",) + FAST)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- ops
@pytest.mark.parametrize("backend", _backends("coord_conv2d"))
# |y| reaches ~20 here: a few units in the last place of fp16 (2**-11) / bf16 (2**-8).
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float16, 0.05, 0), (torch.bfloat16, 0.4, 0)],
                         ids=["fp16", "bf16"])
@pytest.mark.parametrize("autocast", [False, True])
def test_coord_conv2d_half(backend, dtype, atol, rtol, autocast):
    x, w, b = torch.randn(2, 4, 7, 9), torch.randn(5, 6, 3, 3), torch.randn(5)
    ctx = torch.autocast("cpu", dtype=dtype) if autocast else contextlib.nullcontext()
    args = (x, w, b) if autocast else (x.to(dtype), w.to(dtype), b.to(dtype))
    with ctx:
        y = ops.coord_conv2d(*args, coord_src_size=(5, 4), backend=backend)
        want = ops.coord_conv2d(*args, coord_src_size=(5, 4), backend="reference")
    assert y.dtype == dtype == want.dtype
    exact = ops.coord_conv2d(x.double(), w.double(), b.double(), coord_src_size=(5, 4), backend="reference")
    torch.testing.assert_close(y.double(), exact, atol=atol, rtol=rtol)
    torch.testing.assert_close(y.double(), want.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", _backends("coord_conv2d"))
def test_coord_conv2d_autocast_backward(backend):
    x = torch.randn(2, 4, 7, 9, requires_grad=True)
    w = torch.randn(5, 6, 3, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.coord_conv2d(x, w, b, backend=backend)
    y.float().square().sum().backward()
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    assert all(bool(torch.isfinite(t.grad).all()) for t in (x, w, b))


def test_coord_conv2d_mixed_dtypes_need_autocast():
    x, w = torch.randn(1, 4, 5, 5, dtype=torch.bfloat16), torch.randn(3, 6, 3, 3)
    with pytest.raises(ValueError, match="weight: expected the dtype of x"):
        ops.coord_conv2d(x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.coord_conv2d(x, w).dtype == torch.bfloat16


@pytest.mark.parametrize("backend", _backends("mask_predict"))
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("autocast", [False, True])
def test_mask_predict_half(backend, dtype, autocast):
    feats, kern, bias = torch.randn(16, 9, 11), torch.randn(6, 16) * 0.5, torch.randn(6)
    feats, kern, bias = feats.to(dtype), kern.to(dtype), bias.to(dtype)
    ctx = torch.autocast("cpu", dtype=dtype) if autocast else contextlib.nullcontext()
    with ctx:
        soft, binary, area, maskness = ops.mask_predict(feats, kern, bias, backend=backend)
    assert (soft.dtype, binary.dtype, area.dtype, maskness.dtype) == (torch.float32, torch.bool, torch.int64,
                                                                      torch.float32)
    # fp32 logits of the half inputs: the reference without autocast, where only binary
    # may differ on the threshold (GEMM summation order)
    want = reference.mask_predict(feats, kern, bias)
    torch.testing.assert_close(soft, want[0], atol=1e-5, rtol=1e-5)
    near = (want[0] - 0.5).abs() < 1e-5
    assert torch.equal(binary | near, want[1] | near)
    if backend == "reference":
        assert all(torch.equal(a, b) for a, b in zip((soft, binary, area, maskness), want))


@pytest.mark.parametrize("backend", _backends("matrix_nms"))
@pytest.mark.parametrize("dtype", HALF)
def test_matrix_nms_half_scores_and_autocast(backend, dtype):
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(12, 40, 40, generator=g) > 0.2  # ~1280-pixel masks: not exact in bf16
    masks[5] = masks[2]
    labels = torch.randint(0, 2, (12,), generator=g)
    scores = torch.randperm(12, generator=g).float() / 12 + 0.05  # distinct in fp16/bf16
    want = ops.matrix_nms(masks, labels, scores, backend="reference")
    got = ops.matrix_nms(masks, labels, scores.to(dtype), backend=backend)
    assert got[0].dtype == dtype
    assert torch.equal(got[3], want[3])
    torch.testing.assert_close(got[0].float(), want[0], atol=0, rtol=2**-7)
    with torch.autocast("cpu", dtype=dtype):
        under = ops.matrix_nms(masks, labels, scores, backend=backend)
    assert under[0].dtype == torch.float32
    assert torch.equal(under[3], want[3])
    torch.testing.assert_close(under[0], want[0])


@pytest.mark.parametrize("backend", _backends("center_region_assign"))
@pytest.mark.parametrize("dtype", HALF)
def test_center_region_assign_half_boxes(backend, dtype):
    masks, _, boxes, kw = two_box_scene()
    want = ops.center_region_assign(masks, torch.tensor([0, 1]), boxes, backend="reference", **kw)
    with torch.autocast("cpu", dtype=dtype):
        got = ops.center_region_assign(masks, torch.tensor([0, 1]), boxes.to(dtype), backend=backend, **kw)
    for a, b in zip(got, want):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def trained():
    """solov2_light_r18 briefly trained on the overfit scene (as test_overfit does)."""
    img = overfit_scene()[0]
    model, _ = train_on_overfit_scene(40)
    return model.eval(), img


def test_predict_bf16_autocast_matches_fp32(trained):
    model, img = trained
    r32 = model.predict(img)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r16 = model.predict(img)[0]
    assert r16.scores.dtype == torch.float32 and r16.masks.dtype == torch.bool
    assert_low_precision_agrees(r32, r16)
    # forward() in eval mode too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([img])[0]
    assert torch.equal(out["masks"], r16.masks) and torch.equal(out["scores"], r16.scores)


def test_train_step_under_bf16_autocast():
    img, masks, labels = overfit_scene()
    torch.manual_seed(0)
    model = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, min_size=64, max_size=64,
                           num_grids=(12, 10, 8, 6, 4)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([img], [{"masks": masks, "labels": labels}])
    loss = sum(losses.values())
    loss.backward()
    assert bool(torch.isfinite(loss))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF)
def test_predict_cuda_autocast_matches_fp32(trained, dtype):
    model, img = trained
    model = model.cuda()
    try:
        r32 = model.predict(img)[0]
        with torch.autocast("cuda", dtype=dtype):
            rlow = model.predict(img)[0]
        assert_low_precision_agrees(r32, rlow)
    finally:
        model.cpu()
