"""The deformable-convolution (DCN) and ResNeXt models of the SOLO family (issue #17).

mmdetection 3.x ``configs/solov2``: ``solov2_r101-dcn_fpn_ms-3x_coco``,
``solov2_x101-dcn_fpn_ms-3x_coco``, ``solov2-light_r50-dcn_fpn_ms-3x_coco``; the original SOLO
repository (WXinlong/SOLO, mmdetection 1.x): SOLOv2_R101_DCN_3x, SOLOv2_X101_DCN_3x (the same
networks), SOLOv2_Light_512_DCN_R50_3x and Decoupled_SOLO_Light_DCN_R50_3x (DCNv1, "DCN").

The checkpoint key/shape tables below are written from the public module definitions, not
from solo_fast's modules: mmdetection's ResNet / ResNeXt (``models/backbones/resnet.py``,
``resnext.py``: Bottleneck width ``floor(planes * base_width / 64) * groups``; with ``dcn``
its 3x3 ``conv2`` is the DCN, groups kept), mmcv's ``ModulatedDeformConv2dPack`` /
``DeformConv2dPack`` (``weight``, no ``bias`` under a norm, ``conv_offset`` of
``3 * k * k`` / ``2 * k * k`` channels with a bias), ``SOLOV2Head`` (``dcn_cfg`` in every conv
of kernel_convs and cls_convs with ``dcn_apply_to_all_conv=True``, else in the last one;
``MaskFeatModule``'s ``conv_cfg`` in all its ConvModules, the 1x1 ``conv_pred`` included),
``DecoupledSOLOLightHead`` (``dcn_cfg`` in the last conv of each tower). The rule was held
against the state dicts of mmdetection's own models built from the three published configs;
``test_key_rule_matches_mmdetection`` does that again where ``SOLO_FAST_MMDET_PYTHON`` names a
Python with mmdetection 3.x (mmcv-lite suffices: only the structure is built).
"""
import json
import os
import subprocess
import warnings

import pytest
import torch
import torch.nn.functional as F

import solo_fast
from solo_fast.modeling import configs
from solo_fast.modeling.layers import ConvModule, DeformConv2d

from helpers import checkpoint_tensors, conv_rows, convmodule_rows

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(min_size=64, max_size=64, num_grids=(6, 5, 4, 3, 2), flip_prob=0.0)
C = 7  # foreground classes of the synthetic checkpoints

# What the published configs say, written here from the config files (not from configs.py).
LIGHT_RANGES = ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048))
PUBLISHED = {
    # name: (head, depth, groups, base_width, dcn type, tower DCN, mask-feature DCN, stacked, feat, E,
    #        scale ranges, (test short side, long side), train short sides, mmdetection config)
    "solov2_r101_dcn_fpn": ("solov2", 101, 1, 4, "DCNv2", "all", True, 4, 512, 256,
                            ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)), (800, 1333), (800, 768, 736, 704, 672, 640),
                            "solov2_r101-dcn_fpn_ms-3x_coco"),
    "solov2_x101_dcn_fpn": ("solov2", 101, 64, 4, "DCNv2", "all", True, 4, 512, 256,
                            ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)), (800, 1333), (800, 768, 736, 704, 672, 640),
                            "solov2_x101-dcn_fpn_ms-3x_coco"),
    "solov2_light_r50_dcn_fpn": ("solov2", 50, 1, 4, "DCNv2", "last", False, 3, 256, 128,
                                 LIGHT_RANGES, (448, 768), (512, 480, 448, 416, 384, 352),
                                 "solov2-light_r50-dcn_fpn_ms-3x_coco"),
    # the original repository only (DCNv1, 852x512 input)
    "solov2_light_512_r50_dcn_fpn": ("solov2", 50, 1, 4, "DCN", "last", False, 3, 256, 128,
                                     LIGHT_RANGES, (512, 852), (512, 480, 448, 416, 384, 352), None),
    "decoupled_solo_light_r50_dcn_fpn": ("decoupled_light", 50, 1, 4, "DCN", "last", False, 4, 256, None,
                                         LIGHT_RANGES, (512, 852), (512, 480, 448, 416, 384, 352), None),
}
NAMES = list(PUBLISHED)
BIG = {"solov2_r101_dcn_fpn", "solov2_x101_dcn_fpn"}


def _param(name):
    return pytest.param(name, marks=pytest.mark.slow) if name in BIG else name


# ---------------------------------------------------------------------------------------
# The key/shape rule: (mmdetection name, SOLO-repository name, shape) of every tensor
# ---------------------------------------------------------------------------------------
def _backbone_rows(depth, groups=1, bw=4, dcn="DCNv2", prefix="backbone."):
    """(key, shape) of mmdetection's ResNet / ResNeXt with ``dcn`` in c3-c5 (None: no DCN)."""
    offset_ch = (3 if dcn == "DCNv2" else 2) * 9
    rows = []

    def same(key, shape):
        rows.append((prefix + key, shape))

    def bn(prefix, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            same(f"{prefix}.{p}", (c,))
        same(f"{prefix}.num_batches_tracked", ())

    same("conv1.weight", (64, 3, 7, 7))
    bn("bn1", 64)
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    cin = 64
    for s, count in enumerate(blocks, start=1):
        planes = 64 * 2 ** (s - 1)
        width = planes if groups == 1 else planes * bw // 64 * groups
        for b in range(count):
            p = f"layer{s}.{b}"
            same(f"{p}.conv1.weight", (width, cin, 1, 1))
            bn(f"{p}.bn1", width)
            same(f"{p}.conv2.weight", (width, width // groups, 3, 3))
            if s > 1 and dcn:  # stage_with_dcn=(False, True, True, True), fallback_on_stride=False
                same(f"{p}.conv2.conv_offset.weight", (offset_ch, width, 3, 3))
                same(f"{p}.conv2.conv_offset.bias", (offset_ch,))
            bn(f"{p}.bn2", width)
            same(f"{p}.conv3.weight", (planes * 4, width, 1, 1))
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                same(f"{p}.downsample.0.weight", (planes * 4, cin, 1, 1))
                bn(f"{p}.downsample.1", planes * 4)
            cin = planes * 4
    return rows


def _rows(name, num_classes=C, grids=TINY["num_grids"]):
    """(mmdetection name, SOLO-repository name, shape) of every tensor of the named model."""
    head, depth, groups, bw, dcn, tower_dcn, mf_dcn, n, feat, E = PUBLISHED[name][:10]
    rows = [(k, k, shape) for k, shape in _backbone_rows(depth, groups, bw, dcn)]

    def same(key, shape):
        rows.append((key, key, shape))

    for i, c in enumerate((256, 512, 1024, 2048)):
        same(f"neck.lateral_convs.{i}.conv.weight", (256, c, 1, 1))
        same(f"neck.lateral_convs.{i}.conv.bias", (256,))
        same(f"neck.fpn_convs.{i}.conv.weight", (256, 256, 3, 3))
        same(f"neck.fpn_convs.{i}.conv.bias", (256,))

    och = (3 if dcn == "DCNv2" else 2) * 9  # offset (and mask) channels of a 3x3 DCN

    def convmodule(mm, orig, cin, cout, k=3, deform=False):
        rows.extend(convmodule_rows(mm, orig, cin, cout, k, offset_channels=(och // 9 * k * k) if deform else 0))

    def conv(mm, orig, cin, cout, k):
        rows.extend(conv_rows(mm, orig, cin, cout, k))

    for i in range(n):
        deform = tower_dcn == "all" or i == n - 1
        if head == "solov2":
            convmodule(f"mask_head.kernel_convs.{i}", f"bbox_head.kernel_convs.{i}", 258 if i == 0 else feat, feat,
                       deform=deform)
        else:
            convmodule(f"mask_head.mask_convs.{i}", f"bbox_head.ins_convs.{i}", 258 if i == 0 else feat, feat,
                       deform=deform)
        convmodule(f"mask_head.cls_convs.{i}", f"bbox_head.cate_convs.{i}", 256 if i == 0 else feat, feat,
                   deform=deform)
    if head == "solov2":
        conv("mask_head.conv_cls", "bbox_head.solo_cate", feat, num_classes, 3)
        conv("mask_head.conv_kernel", "bbox_head.solo_kernel", feat, E, 3)
        for lvl in range(4):
            for j in range(max(lvl, 1)):
                cin = (258 if lvl == 3 else 256) if j == 0 else 128
                convmodule(f"mask_head.mask_feature_head.convs_all_levels.{lvl}.conv{j}",
                           f"mask_feat_head.convs_all_levels.{lvl}.conv{j}", cin, 128, deform=mf_dcn)
        convmodule("mask_head.mask_feature_head.conv_pred", "mask_feat_head.conv_pred.0", 128, E, 1, deform=mf_dcn)
    else:
        for lvl, S in enumerate(grids):
            for a in "xy":
                conv(f"mask_head.conv_mask_list_{a}.{lvl}", f"bbox_head.dsolo_ins_list_{a}.{lvl}", feat, S, 3)
        conv("mask_head.conv_cls", "bbox_head.dsolo_cate", feat, num_classes, 3)
    return rows


def _checkpoint(tmp_path, name, layout):
    """(path, {mmdetection key: tensor}) of a synthetic checkpoint in ``layout`` ("mmdet" or
    "solo": the SOLO repository's names). Not cached: the x101 one is ~360 MB of tensors."""
    rows = _rows(name)
    mm = checkpoint_tensors(rows, std=0.02)
    state = mm if layout == "mmdet" else {orig: mm[k] for k, orig, _ in rows}
    path = tmp_path / f"{name}-{layout}.pth"
    torch.save({"meta": {"CLASSES": [f"c{i}" for i in range(C)]}, "state_dict": state}, path)
    return str(path), mm


def scene():
    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 4:30, 6:40] = 1
    masks[1, 28:62, 20:62] = 1
    return img, {"masks": masks, "labels": torch.tensor([0, 2])}


def _deform_convs(module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, DeformConv2d)]


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_published_settings(name):
    (head, depth, groups, bw, dcn, tower_dcn, mf_dcn, n, feat, E, ranges, (short, long), train,
     _) = PUBLISHED[name]
    cfg = configs.get_config(name)
    assert (cfg["head"], cfg["depth"], cfg["groups"], cfg["dcn_type"]) == (head, depth, groups, dcn)
    if groups > 1:
        assert cfg["base_width"] == bw
    assert cfg["stage_with_dcn"] == (False, True, True, True)
    assert (cfg["head_dcn"], cfg["mask_feat_dcn"]) == (tower_dcn, mf_dcn)
    assert (cfg["stacked_convs"], cfg["feat_channels"]) == (n, feat)
    if E is not None:
        assert (cfg["mask_feat_channels"], cfg["mask_out_channels"]) == (128, E)
    assert cfg["scale_ranges"] == ranges and cfg["num_grids"] == (40, 36, 24, 16, 12)
    assert (cfg["min_size"], cfg["max_size"], cfg["train_min_size"]) == (short, long, train)
    assert (cfg["score_thr"], cfg["mask_thr"], cfg["nms_pre"], cfg["filter_thr"], cfg["max_per_img"]) == (
        0.1, 0.5, 500, 0.05, 100)
    assert name in solo_fast.modeling.CONFIGS


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips(name, tmp_path):
    cfg = dict(configs.get_config(name), num_classes=3)
    typed = configs.SOLOConfig.from_dict(cfg)
    assert typed.arch.stage_with_dcn == (False, True, True, True)
    flat = typed.to_dict()
    assert configs.SOLOConfig.from_dict(json.loads(json.dumps(flat))) == typed  # JSON: tuples become lists
    assert set(flat) == set(configs.BASE) | {"name", "num_classes"}
    # A config saved before these settings existed has their defaults: no DCN, a plain ResNet.
    old = {k: v for k, v in configs.get_config("solov2_light_r50_fpn").items()
           if k not in ("groups", "base_width", "dcn_type", "stage_with_dcn", "head_dcn", "mask_feat_dcn")}
    arch = configs.SOLOConfig.from_dict(dict(old, num_classes=3)).arch
    assert (arch.groups, arch.stage_with_dcn, arch.head_dcn, arch.mask_feat_dcn) == (1, (False,) * 4, "none", False)


def test_save_and_load_pretrained(tmp_path):
    model = solo_fast.SOLO("solov2_light_512_r50_dcn_fpn", num_classes=3, **TINY)
    with torch.no_grad():
        for _, m in _deform_convs(model):  # offsets the file must carry
            m.conv_offset.weight.normal_(std=0.01)
    path = model.save_pretrained(str(tmp_path / "run"))
    again = solo_fast.SOLO.from_pretrained(path)
    assert again.config == model.config and again.config.arch.dcn_type == "DCN"
    ours, theirs = model.state_dict(), again.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("name, override, match", [
    ("solov2_r101_dcn_fpn", dict(depth=18), r"stage_with_dcn: .*depth 18 \(BasicBlocks have none"),
    ("solov2_x101_dcn_fpn", dict(depth=34, stage_with_dcn=(False,) * 4), r"groups: expected 1 for depth 34"),
    ("solov2_x101_dcn_fpn", dict(stage_with_dcn=(False, True)), r"stage_with_dcn: expected 4 bools"),
    ("solov2_x101_dcn_fpn", dict(stage_with_dcn=(0, 1, 1, 1)), r"stage_with_dcn: expected 4 bools"),
    ("solov2_x101_dcn_fpn", dict(head_dcn="first"), r"head_dcn: expected 'none', 'all'"),
    ("solov2_x101_dcn_fpn", dict(dcn_type="DCNv3"), r"dcn_type: expected 'DCNv2'"),
    ("solov2_x101_dcn_fpn", dict(groups=0), r"groups: expected a positive int"),
    ("solov2_x101_dcn_fpn", dict(base_width=2.5), r"base_width: expected a positive int"),
    ("decoupled_solo_light_r50_dcn_fpn", dict(mask_feat_dcn=True),
     r"mask_feat_dcn: expected False for head 'decoupled_light'"),
])
def test_bad_settings(name, override, match):
    with pytest.raises(ValueError, match=match):
        configs.get_config(name, **override)


# ---------------------------------------------------------------------------------------
# The DCN layer
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("modulated", [True, False])
def test_deform_layer_with_zero_offsets_is_the_plain_conv(modulated):
    # conv_offset is zero-initialised (mmcv): offsets 0, and DCNv2's mask sigmoid(0) = 1/2.
    torch.manual_seed(0)
    layer = DeformConv2d(8, 6, 3, stride=2, padding=1, groups=2, modulated=modulated)
    assert layer.conv_offset.out_channels == (27 if modulated else 18) and layer.weight.shape == (6, 4, 3, 3)
    assert not layer.conv_offset.weight.any() and not layer.conv_offset.bias.any()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 8, 9, 7)
    plain = F.conv2d(x, layer.weight, None, stride=2, padding=1, groups=2)
    scale = 0.5 if modulated else 1.0
    torch.testing.assert_close(layer(x), scale * plain + layer.bias[:, None, None], rtol=1e-5, atol=1e-5)
    if modulated:
        # The mask is the last third of conv_offset's channels (mmcv: o1, o2, mask = chunk(3)):
        # a large bias there alone makes the mask 1 and leaves the offsets 0.
        with torch.no_grad():
            layer.conv_offset.bias[18:] = 30.0
        torch.testing.assert_close(layer(x), plain + layer.bias[:, None, None], rtol=1e-5, atol=1e-5)
        # The offsets are the first two thirds, cat(o1, o2): an integer dy (even channels of
        # the concatenation) moves every tap a whole row, which is the conv of the shifted input.
        with torch.no_grad():
            off = torch.zeros(18)
            off[0::2] = 1.0  # dy = 1, dx = 0 for every tap
            layer.conv_offset.bias[:18] = off
        # Tap i of output row ho reads row 2*ho - 1 + i + 1: no padding above, zeros below.
        want = F.conv2d(F.pad(x, (1, 1, 0, 2)), layer.weight, layer.bias, stride=2, groups=2)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_coord_dcn_sees_the_coordinates_of_coord_conv():
    # A CoordConv ConvModule with DCN: with zero offsets and mask 1 it computes what the plain
    # CoordConv layer computes (coordinates resized from the level's map, as SOLOv2's kernel branch).
    torch.manual_seed(0)
    plain = ConvModule(16, 32, 3, coords="xy")
    dcn = ConvModule(16, 32, 3, coords="xy", dcn="DCNv2")
    assert dcn.conv.weight.shape == plain.conv.weight.shape == (32, 18, 3, 3)
    assert dcn.conv.conv_offset.weight.shape == (27, 18, 3, 3) and dcn.conv.bias is None
    with torch.no_grad():
        dcn.conv.weight.copy_(plain.conv.weight)
        dcn.conv.conv_offset.weight.zero_()
        dcn.conv.conv_offset.bias.zero_()
        dcn.conv.conv_offset.bias[18:] = 30.0
    x = torch.randn(2, 16, 6, 6)
    for src in (None, (13, 9)):
        torch.testing.assert_close(dcn(x, coord_src_size=src), plain(x, coord_src_size=src), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Train and eval
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval(name):
    torch.manual_seed(0)
    model = solo_fast.SOLO(name, num_classes=3, **TINY)
    head, _, groups, _, dcn, tower_dcn, mf_dcn, n = PUBLISHED[name][:8]
    bb = model.backbone
    assert [bool(_deform_convs(getattr(bb, f"layer{s}"))) for s in range(1, 5)] == [False, True, True, True]
    assert all(isinstance(b.conv2, DeformConv2d) for s in (2, 3, 4) for b in getattr(bb, f"layer{s}"))
    assert bb.layer2[0].conv2.stride == 2 and bb.layer2[0].conv2.groups == groups
    mh = model.mask_head
    towers = [mh.cls_convs, mh.kernel_convs if head == "solov2" else mh.mask_convs]
    for tower in towers:
        on = [isinstance(layer.conv, DeformConv2d) for layer in tower]
        assert on == ([True] * n if tower_dcn == "all" else [False] * (n - 1) + [True])
    if head == "solov2":
        assert bool(_deform_convs(model.mask_head.mask_feature_head)) == mf_dcn
    assert all(m.modulated == (dcn == "DCNv2") for _, m in _deform_convs(model))
    assert all(not m.conv_offset.weight.any() for _, m in _deform_convs(bb))  # zero at start, as mmdetection's

    img, tgt = scene()
    model.train()
    losses = model([img], [tgt])
    assert set(losses) == {"loss_mask", "loss_cls"}
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["loss_mask"].detach()) > 0
    sum(losses.values()).backward()
    for where, m in _deform_convs(model):
        for pname, p in (("weight", m.weight), ("conv_offset.weight", m.conv_offset.weight)):
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), f"no gradient reached {where}.{pname}"

    model.eval()
    with torch.no_grad():
        out = model([img, torch.rand(3, 50, 70)])
    for o, (h, w) in zip(out, [(64, 64), (50, 70)]):
        k = o["scores"].shape[0]
        assert o["masks"].shape == (k, h, w) and o["labels"].dtype == torch.int64
    res = model.predict(img, score_thr=0.0, nms_pre=20, max_per_img=5)[0]
    assert res.masks.shape[1:] == (64, 64) and len(res) <= 5


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------
LOADS = [("solov2_r101_dcn_fpn", "mmdet"), ("solov2_x101_dcn_fpn", "mmdet"), ("solov2_light_r50_dcn_fpn", "mmdet"),
         ("solov2_r101_dcn_fpn", "solo"), ("solov2_x101_dcn_fpn", "solo"), ("solov2_light_512_r50_dcn_fpn", "solo"),
         ("decoupled_solo_light_r50_dcn_fpn", "solo")]


@pytest.mark.parametrize("name, layout", [pytest.param(n, l, marks=[pytest.mark.slow] if n in BIG else [])
                                          for n, l in LOADS])
def test_checkpoint_loads_every_tensor(tmp_path, name, layout):
    path, mm = _checkpoint(tmp_path, name, layout)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete: no warning
        model = solo_fast.SOLO.from_mmdet(path, name, num_grids=TINY["num_grids"])
    assert model.load_report.format == layout
    assert model.load_report.missing == [] and model.load_report.unexpected == []
    assert model.num_classes == C and model.class_names == [f"c{i}" for i in range(C)]
    ours = model.state_dict()
    assert set(ours) == set(mm)  # mmdetection's names, every one
    for key, value in mm.items():
        assert torch.equal(ours[key], value), key
    if name not in BIG:
        model.eval()
        with torch.no_grad():
            out = model.extract(torch.rand(1, 3, 64, 64))
        assert all(torch.isfinite(t).all() for t in out["cls"])


def test_old_offset_names_are_renamed(tmp_path):
    # mmcv's DCN before its version 2 named the offset conv "<conv>_offset" beside the conv.
    rows = _rows("solov2_light_512_r50_dcn_fpn")
    mm = checkpoint_tensors(rows, std=0.02)
    old = {}
    for k, orig, _ in rows:
        old[orig.replace(".conv2.conv_offset.", ".conv2_offset.")] = mm[k]
    assert "backbone.layer2.0.conv2_offset.weight" in old
    path = str(tmp_path / "old.pth")
    torch.save(old, path)
    model = solo_fast.SOLO.from_mmdet(path, "solov2_light_512_r50_dcn_fpn", num_grids=TINY["num_grids"])
    assert model.load_report.missing == [] and model.load_report.unexpected == []
    key = "backbone.layer2.0.conv2.conv_offset.weight"
    assert torch.equal(model.backbone.layer2[0].conv2.conv_offset.weight, mm[key])


def test_dcn_checkpoint_for_the_plain_config_names_the_dcn_keys(tmp_path):
    path, _ = _checkpoint(tmp_path, "solov2_light_r50_dcn_fpn", "mmdet")
    # The light DCN model has 3 stacked convs, the plain light config 2: the DCN keys are what
    # the first error talks about, and it names the config to use.
    with pytest.raises(ValueError, match=r"(?s)deformable convolutions \(DCNv2\) in backbone stages c3-c5 and the "
                                         r"last conv of each head tower \(key backbone\.layer2\.0\.conv2\.conv_offset"
                                         r"\.weight\).*'solov2_light_r50_fpn' has no deformable convolutions.*"
                                         r"looks like a checkpoint for 'solov2_light_r50_dcn_fpn'"):
        solo_fast.SOLO.from_mmdet(path, "solov2_light_r50_fpn")
    # DCNv2 offsets (27 channels) where the config has DCNv1 (18): the type is named.
    with pytest.raises(ValueError, match=r"(?s)DCNv2.*27 channels for 9 taps.*'solov2_light_512_r50_dcn_fpn' has "
                                         r"deformable convolutions \(DCN\).*'solov2_light_r50_dcn_fpn'"):
        solo_fast.SOLO.from_mmdet(path, "solov2_light_512_r50_dcn_fpn")
    # And a plain checkpoint for a DCN config.
    plain = solo_fast.SOLO("solov2_light_r50_fpn", num_classes=C, **TINY)
    with pytest.raises(ValueError, match=r"(?s)has no deformable convolutions \(no '\*\.conv_offset\.\*' keys\), "
                                         r"config 'solov2_light_r50_dcn_fpn' has deformable convolutions \(DCNv2\)"
                                         r".*'solov2_light_r50_fpn'"):
        solo_fast.SOLO.from_mmdet(plain.save_pretrained(str(tmp_path / "plain")),
                                  "solov2_light_r50_dcn_fpn", num_grids=TINY["num_grids"])


@pytest.mark.slow
def test_resnext_checkpoint_for_the_resnet_config(tmp_path):
    path, _ = _checkpoint(tmp_path, "solov2_x101_dcn_fpn", "mmdet")
    with pytest.raises(ValueError, match=r"(?s)ResNeXt-101 64x4d as backbone \(key 'backbone\.layer1\.0\.conv2\."
                                         r"weight'\), config 'solov2_r101_dcn_fpn' has ResNet-101.*"
                                         r"'solov2_x101_dcn_fpn'"):
        solo_fast.SOLO.from_mmdet(path, "solov2_r101_dcn_fpn")


def test_finetune_finds_the_dcn_config(tmp_path):
    path, mm = _checkpoint(tmp_path, "decoupled_solo_light_r50_dcn_fpn", "solo")
    model = solo_fast.SOLO.finetune_from(path, num_classes=2, num_grids=TINY["num_grids"])
    assert model.config_name == "decoupled_solo_light_r50_dcn_fpn"
    key = "backbone.layer4.2.conv2.conv_offset.weight"
    assert torch.equal(model.backbone.layer4[2].conv2.conv_offset.weight, mm[key])


def test_imagenet_weights_leave_the_offsets_at_zero(tmp_path):
    # torchvision's resnext50_32x4d names and shapes, plus its classifier, for a ResNeXt-50
    # 32x4d with DCNv2 in c3-c5 (overrides of the r101 DCN config): every backbone tensor but
    # the DCN offset convs, which no ImageNet file has.
    kw = dict(num_classes=3, depth=50, groups=32, base_width=4, **TINY)
    g = torch.Generator().manual_seed(0)

    def imagenet(rows):
        state = {k: torch.tensor(0) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=g)
                 for k, shape in rows}
        return dict(state, **{"fc.weight": torch.randn(1000, 2048, generator=g), "fc.bias": torch.zeros(1000)})

    state = imagenet(_backbone_rows(50, 32, 4, dcn=None, prefix=""))
    assert state["layer1.0.conv2.weight"].shape == (128, 4, 3, 3)  # width 4 * 32 = 128, 4 channels per group
    path = str(tmp_path / "resnext50_32x4d.pth")
    torch.save(state, path)
    model = solo_fast.SOLO("solov2_r101_dcn_fpn", backbone_weights=path, **kw)
    report = model.load_report
    assert report.unused == ["fc.bias", "fc.weight"]
    dcns = _deform_convs(model.backbone)
    offsets = sorted(f"backbone.{n}.conv_offset.{p}" for n, _ in dcns for p in ("weight", "bias"))
    assert report.initialised == offsets and len(offsets) == 2 * 13  # the 4 + 6 + 3 blocks of c3-c5
    assert len(report.loaded) == len(state) - 2
    assert all(not m.conv_offset.weight.any() and not m.conv_offset.bias.any() for _, m in dcns)
    assert torch.equal(model.backbone.layer3[5].conv2.weight, state["layer3.5.conv2.weight"])
    # A ResNet-50 file for the ResNeXt backbone: the shape error names both.
    torch.save(imagenet(_backbone_rows(50, dcn=None, prefix="")), path)
    with pytest.raises(ValueError, match=r"the ResNeXt-50 32x4d with DCNv2 in c3-c5 backbone expects.*the file holds "
                                         r"ResNet-50"):
        solo_fast.SOLO("solov2_r101_dcn_fpn", backbone_weights=path, **kw)


# ---------------------------------------------------------------------------------------
# The rule against mmdetection itself (optional)
# ---------------------------------------------------------------------------------------
_DUMP = r"""
import json, sys
from mmengine.config import Config
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
import mmdet, os
register_all_modules()
out = {}
for name in sys.argv[2:]:
    cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "solov2", name + ".py"))
    cfg.model.backbone.init_cfg = None
    cfg.model.mask_head.num_classes = 7
    out[name] = [(k, list(v.shape)) for k, v in MODELS.build(cfg.model).state_dict().items()]
json.dump(out, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SOLO_FAST_MMDET_PYTHON"),
                    reason="SOLO_FAST_MMDET_PYTHON (a Python with mmdetection 3.x) is not set")
def test_key_rule_matches_mmdetection(tmp_path):
    names = {PUBLISHED[n][-1]: n for n in NAMES if PUBLISHED[n][-1]}
    out = tmp_path / "keys.json"
    subprocess.run([os.environ["SOLO_FAST_MMDET_PYTHON"], "-c", _DUMP, str(out), *names], check=True,
                   capture_output=True, timeout=600)
    for mmdet_name, rows in json.loads(out.read_text()).items():
        theirs = {k: tuple(s) for k, s in rows}
        ours = {k: tuple(s) for k, _, s in _rows(names[mmdet_name], grids=(40, 36, 24, 16, 12))}
        assert theirs == ours, mmdet_name
