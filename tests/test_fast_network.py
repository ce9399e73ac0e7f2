"""The CPU fast network (issue 16): channels-last with BatchNorm folded, against the
reference path; its reversibility; bf16 inference; the allocator setting."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import solo_fast
from solo_fast import _cpu, ops
from solo_fast.modeling import backbone as backbone_mod
from solo_fast.modeling.fast_network import FastNetwork, fold_batchnorm

from helpers import (assert_fp32_contract, assert_low_precision_agrees, overfit_scene, randomize_batchnorm,
                     train_on_overfit_scene)

FAMILIES = ["solo_r18_fpn", "decoupled_solo_r18_fpn", "decoupled_solo_light_r18_fpn", "solov2_r18_fpn",
            "solov2_light_r18_fpn"]
SMALL = dict(min_size=96, max_size=128, num_grids=(10, 8, 6, 4, 3), flip_prob=0.0)  # training: one input
KW = dict(score_thr=0.05, filter_thr=0.02, nms_pre=200, max_per_img=50)


def _random_model(name, seed=0):
    """Random weights and BatchNorm statistics, heads made to detect (as test_model_parity)."""
    torch.manual_seed(seed)
    model = solo_fast.SOLO(name, num_classes=3, **SMALL).eval()
    randomize_batchnorm(model, seed)
    with torch.no_grad():
        model.mask_head.conv_cls.bias.normal_(0.0, 1.5)
        for conv in getattr(model.mask_head, "conv_mask_list", []):
            conv.bias.normal_(0.0, 2.0)
        for attr in ("conv_mask_list_x", "conv_mask_list_y"):
            for conv in getattr(model.mask_head, attr, []):
                conv.bias.normal_(1.0, 2.0)
        if hasattr(model.mask_head, "conv_kernel"):
            # SOLOv2's initial dynamic kernels are tiny: every soft mask is within rounding
            # of 0.5 = mask_thr. Larger kernels make masks that are a property of the
            # weights, not of the summation order (as scripts/compare_mmdet.py does).
            model.mask_head.conv_kernel.weight.mul_(20)
            model.mask_head.conv_kernel.bias.zero_()
    return model


def _images():
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(3, 96, 128, generator=g) * 255).to(torch.uint8), (torch.rand(3, 81, 101, generator=g) * 255).to(torch.uint8)]


# ------------------------------------------------------------------------------ folding
@pytest.mark.parametrize("depth", [18, 50])
def test_folded_backbone_equals_conv_then_batchnorm(depth):
    torch.manual_seed(0)
    net = backbone_mod.ResNet(depth).eval()
    randomize_batchnorm(net, 3)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want = net(x)
        folded = FastNetwork([net])
        got = folded.parts[0](x)  # folded, NCHW
        got_cl = folded(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert folded.folded == n_bn  # every BatchNorm of a ResNet follows a conv
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.parts[0].modules())
    for a, b, c in zip(want, got, got_cl):
        scale = float(a.abs().max())
        torch.testing.assert_close(b, a, atol=2e-5 * scale, rtol=0)
        torch.testing.assert_close(c, a, atol=2e-5 * scale, rtol=0)
        assert c.is_contiguous()  # handed on in NCHW


def test_fold_skips_batchnorm_without_a_conv_before_it():
    m = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)).eval()
    assert fold_batchnorm(m) == 0 and isinstance(m[1], nn.BatchNorm2d)


def test_coord_conv2d_keeps_channels_last():
    g = torch.Generator().manual_seed(0)
    for b, c, o, h, w, coords, src in [(1, 5, 7, 9, 11, "xy", None), (2, 4, 3, 6, 5, "x", (8, 9)),
                                       (2, 4, 3, 6, 5, "y", None), (3, 3, 2, 2, 3, "xy", (1, 1))]:
        x = torch.randn(b, c, h, w, generator=g)
        wt = torch.randn(o, c + len(coords), 3, 3, generator=g)
        bias = torch.randn(o, generator=g)
        want = ops.coord_conv2d(x, wt, bias, coords=coords, coord_src_size=src, backend="reference")
        got = ops.coord_conv2d(x.contiguous(memory_format=torch.channels_last),
                               wt.contiguous(memory_format=torch.channels_last), bias, coords=coords,
                               coord_src_size=src, backend="cpu")
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ the contract
@pytest.mark.parametrize("name", FAMILIES)
def test_fast_network_meets_the_fp32_contract_random_weights(name):
    model = _random_model(name)
    imgs = _images()
    with solo_fast.use_backend("reference"):
        ref = model.predict(imgs, **KW)
    fast = model.predict(imgs, **KW)
    assert model._fast_network._net is not None  # the fast form ran
    for r, f in zip(ref, fast):
        assert len(r) > 0
        assert_fp32_contract(r, f)


@pytest.fixture(scope="module")
def trained():
    """SOLOv2-light briefly trained from random BatchNorm statistics. The other families
    need minutes of CPU training before they detect anything on the overfit scene; their
    fast form is held above on random weights (the same layers: ResNet, FPN, GN towers)."""
    model, _ = train_on_overfit_scene(30, "solov2_light_r18_fpn", batchnorm_seed=0)
    return model.eval(), overfit_scene()[0]


def test_fast_network_meets_the_fp32_contract_trained(trained):
    model, img = trained
    with solo_fast.use_backend("reference"):
        ref = model.predict(img)[0]
    fast = model.predict(img)[0]
    assert len(ref) > 0
    assert_fp32_contract(ref, fast)


@pytest.mark.skipif(not _cpu.native_bf16(), reason="no native bf16 on this CPU (AMX / AVX512-BF16)")
def test_bf16_meets_its_contract_trained(trained):
    model, img = trained
    r32 = model.predict(img)[0]
    r16 = model.predict(img, precision="bf16")[0]
    assert r16.scores.dtype == torch.float32
    assert_low_precision_agrees(r32, r16)


def test_bf16_as_a_model_setting(tmp_path):
    model = _random_model("solov2_light_r18_fpn")
    path = model.save_pretrained(str(tmp_path / "m"))
    as_setting = solo_fast.SOLO.from_pretrained(path)
    as_setting.config = as_setting.config.replace(precision="bf16")
    assert as_setting.inference_settings().precision == "bf16"
    imgs = _images()[:1]
    want = model.predict(imgs, precision="bf16", **KW)[0]
    got = as_setting.predict(imgs, **KW)[0]  # the model's own setting: the same bf16 run
    assert as_setting._fast_network._key[1] == (torch.bfloat16 if _cpu.native_bf16() else None)
    assert torch.equal(got.masks, want.masks) and torch.equal(got.scores, want.scores)
    fp32 = as_setting.predict(imgs, precision="fp32", **KW)[0]  # a per-call override wins
    assert torch.equal(fp32.masks, model.predict(imgs, **KW)[0].masks)
    assert solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, precision="bf16").inference_settings().precision == "bf16"
    with pytest.raises(ValueError, match="precision"):
        model.inference_settings(precision="fp16x")


def test_bf16_without_native_support_warns_and_runs_fp32(monkeypatch):
    model = _random_model("solov2_light_r18_fpn")
    imgs = _images()[:1]
    want = model.predict(imgs, **KW)[0]
    monkeypatch.setattr(_cpu, "bf16_isa", lambda: "")
    with pytest.warns(UserWarning, match="no native bf16"):
        got = model.predict(imgs, precision="bf16", **KW)[0]
    assert torch.equal(got.masks, want.masks) and torch.equal(got.scores, want.scores)


# ------------------------------------------------------------------------------ reversibility
def test_predict_leaves_state_dict_and_training_unchanged():
    model = _random_model("solo_r18_fpn")
    fresh = _random_model("solo_r18_fpn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.predict(_images(), **KW)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    # a training step after predict gives the loss and gradients of a model that never predicted
    img, masks, labels = overfit_scene()
    tgt = [{"masks": masks, "labels": labels}]
    losses = []
    for m in (model, fresh):
        m.train()
        out = m([img], tgt)
        sum(out.values()).backward()
        losses.append({k: float(v.detach()) for k, v in out.items()})
    assert losses[0] == losses[1]
    grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in (model, fresh)]
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_fast_network_follows_weight_updates():
    model = _random_model("solov2_light_r18_fpn")
    imgs = _images()[:1]
    model.predict(imgs, **KW)
    first = model._fast_network._net
    with torch.no_grad():  # an in-place update, as an optimizer step or load_state_dict
        model.backbone.conv1.weight.mul_(1.5)
        model.mask_head.conv_cls.bias.add_(0.3)
    with solo_fast.use_backend("reference"):
        ref = model.predict(imgs, **KW)[0]
    fast = model.predict(imgs, **KW)[0]
    assert model._fast_network._net is not first
    assert_fp32_contract(ref, fast)
    second = model._fast_network._net
    model.predict(imgs, **KW)
    assert model._fast_network._net is second  # unchanged weights: reused, not rebuilt
    # .double() swaps every tensor's data under the same Parameter (same id and version)
    model.double()
    assert model.predict(imgs, **KW)[0].scores.dtype == torch.float32
    assert model._fast_network._net is not second


def test_copied_and_pickled_models_start_without_the_copy(tmp_path):
    import copy

    model = _random_model("solov2_light_r18_fpn")
    model.predict(_images()[:1], **KW)
    clone = copy.deepcopy(model)
    assert clone._fast_network._net is None
    path = tmp_path / "m.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert loaded._fast_network._net is None
    # The same weights and the same fast form: the same results, bit for bit.
    a, b = model.predict(_images()[:1], **KW)[0], loaded.predict(_images()[:1], **KW)[0]
    assert torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels) and torch.equal(a.masks, b.masks)


# ------------------------------------------------------------------------------ allocator
def test_keep_freed_memory_stops_page_faults_of_large_blocks():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    code = textwrap.dedent("""
        import resource, sys, torch
        from solo_fast import _cpu
        def faults_of_one_block():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = torch.ones(64 * 2**20 // 4)  # 64 MB: above glibc's mmap threshold
            del t
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        faults_of_one_block()
        default = faults_of_one_block()
        if sys.argv[1] == "keep":
            assert _cpu.keep_freed_memory()
            faults_of_one_block()
        # The least of three: now and then one block still comes in fresh pages right after
        # the switch (seen 3 times in 12 runs), the steady state never.
        print(default, min(faults_of_one_block() for _ in range(3)))
    """)
    out = {}
    for mode in ("default", "keep"):
        res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        out[mode] = [int(v) for v in res.stdout.split()]
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert out["default"][1] > pages // 2  # every block in fresh pages
    assert out["keep"][1] < pages // 20  # the freed block is reused


def test_cli_predict_takes_precision(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from solo_fast.cli import main

    model = _random_model("solov2_light_r18_fpn")
    ckpt = model.save_pretrained(str(tmp_path / "m"))
    Image.fromarray((np.random.RandomState(0).rand(81, 101, 3) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["predict", str(tmp_path / "a.png"), "--checkpoint", ckpt, "--out", str(out),
                     "--score-thr", "0.05", "--precision", precision]) == 0
        assert len(json.loads((out / "results.json").read_text())) > 0
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main(["predict", str(tmp_path / "a.png"), "--checkpoint", ckpt, "--precision", "fp16"])


@pytest.mark.parametrize("name", ["solov2_light_r18_fpn", "solo_r18_fpn"])
def test_head_outputs_layout(name):
    # Post-processing gets NCHW fp32 outputs, except what the head lists in
    # any_layout_outputs (SOLOv2's mask features: channels-last, converted nowhere).
    model = _random_model(name)
    net = FastNetwork([model.backbone, model.neck, model.mask_head])
    out = net(torch.rand(1, 3, 96, 128))
    head = net.parts[-1]  # SOLO's mask tower hands on NCHW at its last layer, before the x2 upsample
    towers = [getattr(head, n) for n in getattr(head, "nchw_towers", ()) if hasattr(head, n)]
    assert [bool(t[-1]._forward_hooks) for t in towers] == ([True] if name.startswith("solo_") else [])
    listed = getattr(model.mask_head, "any_layout_outputs", ())
    assert listed == (("mask_feats",) if name.startswith("solov2") else ())
    for key, value in out.items():
        for t in value if isinstance(value, (list, tuple)) else [value]:
            assert t.dtype == torch.float32
            if key in listed:
                assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
            else:
                assert t.is_contiguous(), key


@pytest.mark.skipif(not _cpu.native_bf16(), reason="no native bf16 on this CPU (AMX / AVX512-BF16)")
def test_head_outputs_layout_bf16():
    # In bf16 the mask features stay bf16 where mask_predict's brgemm GEMM reads bf16, and
    # come in fp32 elsewhere (AMX); the other outputs are fp32 as always.
    model = _random_model("solov2_light_r18_fpn")
    net = FastNetwork([model.backbone, model.neck, model.mask_head], torch.bfloat16)
    out = net(torch.rand(1, 3, 96, 128))
    want = torch.bfloat16 if ops.brgemm_reads(torch.bfloat16) else torch.float32
    assert out["mask_feats"].dtype == want
    assert out["mask_feats"].is_contiguous(memory_format=torch.channels_last)
    assert all(t.dtype == torch.float32 for key in ("kernels", "cls") for t in out[key])


def test_hooked_network_runs_as_it_is():
    model = _random_model("solov2_light_r18_fpn")
    seen = []
    handle = model.neck.register_forward_hook(lambda m, a, out: seen.append(len(out)))
    try:
        model.predict(_images()[:1], **KW)
    finally:
        handle.remove()
    assert seen == [5] and model._fast_network._net is None
    model.predict(_images()[:1], **KW)
    assert model._fast_network._net is not None
