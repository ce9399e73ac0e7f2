"""Model level: the fast path (auto) gives the same answers as the reference path."""
import pytest
import torch

import solo_fast

from helpers import assert_fp32_contract, match_detections

SMALL = dict(min_size=96, max_size=128, num_grids=(10, 8, 6, 4, 3), flip_prob=0.0)  # one deterministic loss


def _model(name):
    torch.manual_seed(0)
    model = solo_fast.SOLO(name, num_classes=3, **SMALL).eval()
    with torch.no_grad():  # classifier biases that fire, so that there are candidates to post-process
        model.mask_head.conv_cls.bias.normal_(0.0, 1.5)
        if hasattr(model.mask_head, "conv_mask_list"):  # SOLO masks start at the 0.01 prior: spread them
            for conv in model.mask_head.conv_mask_list:
                conv.bias.normal_(0.0, 2.0)
        for attr in ("conv_mask_list_x", "conv_mask_list_y"):  # Decoupled SOLO: both factors
            for conv in getattr(model.mask_head, attr, []):
                conv.bias.normal_(1.0, 2.0)
    return model


@pytest.mark.parametrize("name", ["solo_r18_fpn", "decoupled_solo_r18_fpn", "decoupled_solo_light_r18_fpn",
                                  "solov2_r18_fpn", "solov2_light_r18_fpn"])
def test_fast_inference_equals_reference(name):
    model = _model(name)
    imgs = [torch.rand(3, 96, 128), torch.rand(3, 80, 100)]
    kw = dict(score_thr=0.05, filter_thr=0.02, nms_pre=200, max_per_img=50)
    with solo_fast.use_backend("reference"):
        ref = model.predict(imgs, **kw)
    fast = model.predict(imgs, **kw)
    for r, f in zip(ref, fast):
        assert len(r) > 0
        assert_fp32_contract(r, f)
        # Soft masks agree to ~1e-6; a pixel within that of mask_thr may flip.
        pairs = match_detections(r, f)
        assert sum(int((r.masks[i] != f.masks[j]).sum()) for i, (j, _) in pairs.items()) <= 1e-4 * r.masks.numel()


def test_fast_training_loss_equals_reference():
    model = _model("solo_r18_fpn").train()
    img = torch.rand(3, 96, 128)
    m = torch.zeros(2, 96, 128, dtype=torch.uint8)
    m[0, 10:60, 5:70] = 1
    m[1, 40:90, 60:125] = 1
    tgt = [{"masks": m, "labels": torch.tensor([0, 2])}]
    with solo_fast.use_backend("reference"):
        ref = model([img], tgt)
        sum(ref.values()).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fast = model([img], tgt)
    sum(fast.values()).backward()
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-3, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["solo_r18_fpn", "decoupled_solo_light_r18_fpn", "solov2_light_r18_fpn"])
def test_chunked_candidates_equal_one_pass(name):
    """Many candidates are handled in bounded chunks (streamed top nms_pre) with the same result."""
    model = _model(name)
    img = torch.rand(3, 96, 128)
    kw = dict(score_thr=0.05, filter_thr=0.02, nms_pre=40, max_per_img=20)
    one = model.predict(img, **kw)[0]
    chunked = model.predict(img, mask_chunk=7, **kw)[0]
    assert len(one) > 0
    assert torch.equal(one.labels, chunked.labels) and torch.equal(one.masks, chunked.masks)
    # A GEMM over fewer rows may round differently in the last bit (MKL), hence not rtol=0.
    torch.testing.assert_close(one.scores, chunked.scores, rtol=1e-6, atol=1e-7)


def test_reference_computes_each_dense_solo_level_once(monkeypatch):
    """With more candidate cells than a chunk, the fast path streams them; the reference,
    which computes all S² masks of a level anyway, must not run a level's dense conv again
    for every chunk (that would only make the reference slower than published)."""
    model = _model("solo_r18_fpn")
    calls = []
    level_of_weight = {conv.weight.data_ptr(): level for level, conv in enumerate(model.mask_head.conv_mask_list)}
    conv2d = torch.nn.functional.conv2d

    def counting_conv2d(x, weight, *args, **kwargs):  # the dense S^2-channel convs of the mask branch
        if weight.data_ptr() in level_of_weight:
            calls.append(level_of_weight[weight.data_ptr()])
        return conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", counting_conv2d)
    img = torch.rand(3, 96, 128)
    kw = dict(score_thr=0.05, filter_thr=0.02, nms_pre=40, max_per_img=20, mask_chunk=7)
    with solo_fast.use_backend("reference"):
        ref = model.predict(img, **kw)[0]
    assert len(ref) > 0 and calls and len(calls) == len(set(calls))
    calls.clear()
    fast = model.predict(img, **kw)[0]  # streamed: the dense convs do not run at all
    assert calls == []
    assert torch.equal(ref.labels, fast.labels)
    torch.testing.assert_close(ref.scores, fast.scores, rtol=0, atol=1e-5)
