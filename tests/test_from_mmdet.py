"""SOLO.from_mmdet on synthetic state dicts laid out like the two public checkpoint formats.

The key names below are written from the public module definitions, independently of
solo_fast.checkpoint.mmdet:

- mmdetection 3.x: detector attributes backbone / neck / mask_head; mmdet ResNet
  (conv1, bn1, layerN.i.conv1/bn1/conv2/bn2, downsample.0/1), FPN ConvModules
  (lateral_convs.i.conv, fpn_convs.i.conv); dense_heads/solo_head.py (SOLOHead: mask_convs,
  cls_convs, conv_mask_list, conv_cls; DecoupledSOLOHead: mask_convs_x/y,
  conv_mask_list_x/y; DecoupledSOLOLightHead: mask_convs, conv_mask_list_x/y) and
  solov2_head.py (SOLOV2Head: kernel_convs, cls_convs, conv_kernel, conv_cls,
  mask_feature_head = MaskFeatModule: convs_all_levels.i.convj, conv_pred). ConvModule with
  GroupNorm: ".conv.weight" (no bias) and ".gn.weight/.bias".
- WXinlong/SOLO (mmdetection 1.x): backbone / neck as above, the head is "bbox_head"
  (anchor_heads/solo_head.py: ins_convs, cate_convs, solo_ins_list, solo_cate;
  decoupled_solo_head.py: ins_convs_x/y, dsolo_ins_list_x/y, dsolo_cate;
  decoupled_solo_light_head.py: ins_convs, dsolo_ins_list_x/y, dsolo_cate;
  solov2_head.py / solov2_light_head.py: kernel_convs, cate_convs, solo_kernel,
  solo_cate) and SOLOv2's "mask_feat_head" (mask_heads/mask_feat_head.py:
  convs_all_levels.i.convj, conv_pred.0 — a Sequential around one ConvModule). Its
  class conv has num_classes - 1 rows with num_classes counting the background.
"""
import warnings

import pytest
import torch

import solo_fast

from helpers import checkpoint_tensors, conv_rows, convmodule_rows

pytestmark = pytest.mark.usefixtures("one_thread")


GRIDS = (40, 36, 24, 16, 12)
C = 7  # foreground classes of the synthetic checkpoints


def _resnet18_neck():
    """ResNet-18 (BasicBlock, 2-2-2-2) + FPN(64, 128, 256, 512 -> 256): same names in both formats."""
    rows = []

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            rows.append((f"{name}.{p}", f"{name}.{p}", (c,)))
        rows.append((f"{name}.num_batches_tracked", f"{name}.num_batches_tracked", ()))

    rows.append(("backbone.conv1.weight", "backbone.conv1.weight", (64, 3, 7, 7)))
    bn("backbone.bn1", 64)
    cin = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"backbone.layer{stage}.{b}"
            rows.append((f"{p}.conv1.weight", f"{p}.conv1.weight", (planes, cin, 3, 3)))
            bn(f"{p}.bn1", planes)
            rows.append((f"{p}.conv2.weight", f"{p}.conv2.weight", (planes, planes, 3, 3)))
            bn(f"{p}.bn2", planes)
            if b == 0 and stage > 1:
                rows.append((f"{p}.downsample.0.weight", f"{p}.downsample.0.weight", (planes, cin, 1, 1)))
                bn(f"{p}.downsample.1", planes)
            cin = planes
    for i, c in enumerate((64, 128, 256, 512)):
        rows += conv_rows(f"neck.lateral_convs.{i}.conv", f"neck.lateral_convs.{i}.conv", c, 256, 1)
    for i in range(4):
        rows += conv_rows(f"neck.fpn_convs.{i}.conv", f"neck.fpn_convs.{i}.conv", 256, 256, 3)
    return rows


def _head(config, grids=GRIDS):
    """(mmdetection name, SOLO-repository name, shape) of each head tensor of an r18 config."""
    rows = []
    if config == "solo_r18_fpn":
        n, w = 7, 256
        for i in range(n):
            rows += convmodule_rows(f"mask_head.mask_convs.{i}", f"bbox_head.ins_convs.{i}", 258 if i == 0 else w, w)
        for l, S in enumerate(grids):
            rows += conv_rows(f"mask_head.conv_mask_list.{l}", f"bbox_head.solo_ins_list.{l}", w, S * S, 1)
        cls = "bbox_head.solo_cate"
    elif config in ("decoupled_solo_r18_fpn", "decoupled_solo_light_r18_fpn"):
        light = "light" in config
        n, w = (4 if light else 7), 256
        for i in range(n):
            if light:
                rows += convmodule_rows(f"mask_head.mask_convs.{i}", f"bbox_head.ins_convs.{i}", 258 if i == 0 else w, w)
            else:
                for a in "xy":
                    rows += convmodule_rows(f"mask_head.mask_convs_{a}.{i}", f"bbox_head.ins_convs_{a}.{i}",
                                        257 if i == 0 else w, w)
        for l, S in enumerate(grids):
            for a in "xy":
                rows += conv_rows(f"mask_head.conv_mask_list_{a}.{l}", f"bbox_head.dsolo_ins_list_{a}.{l}", w, S, 3)
        cls = "bbox_head.dsolo_cate"
    elif config == "solov2_light_r18_fpn":
        n, w, E, F = 2, 256, 128, 128
        for i in range(n):
            rows += convmodule_rows(f"mask_head.kernel_convs.{i}", f"bbox_head.kernel_convs.{i}", 258 if i == 0 else w, w)
        rows += conv_rows("mask_head.conv_kernel", "bbox_head.solo_kernel", w, E, 3)
        for lvl in range(4):
            for j in range(max(lvl, 1)):
                cin = (258 if lvl == 3 else 256) if j == 0 else F
                rows += convmodule_rows(f"mask_head.mask_feature_head.convs_all_levels.{lvl}.conv{j}",
                                    f"mask_feat_head.convs_all_levels.{lvl}.conv{j}", cin, F)
        rows += convmodule_rows("mask_head.mask_feature_head.conv_pred", "mask_feat_head.conv_pred.0", F, E, 1)
        cls = "bbox_head.solo_cate"
    else:
        raise AssertionError(config)
    for i in range(n):
        rows += convmodule_rows(f"mask_head.cls_convs.{i}", f"bbox_head.cate_convs.{i}", 256 if i == 0 else w, w)
    rows += conv_rows("mask_head.conv_cls", cls, w, C, 3)  # C rows: no background row in either format
    return rows


def _table(config, grids=GRIDS):
    return _resnet18_neck() + _head(config, grids)


def _checkpoints(config, seed=1, grids=GRIDS):
    """(mmdet-named state dict, SOLO-repository-named state dict) with the same tensors."""
    rows = _table(config, grids)
    values = checkpoint_tensors(rows, seed)
    return values, {orig: values[mm] for mm, orig, _ in rows}


def _save(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def _outputs(model, seed=0):
    model.eval()
    x = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.extract(x)


def _assert_same_outputs(a, b):
    for key in a:
        va, vb = a[key], b[key]
        va, vb = (va, vb) if isinstance(va, list) else ([va], [vb])
        for ta, tb in zip(va, vb):
            torch.testing.assert_close(ta, tb, rtol=0, atol=0)


CONFIGS = ["solov2_light_r18_fpn", "solo_r18_fpn", "decoupled_solo_light_r18_fpn", "decoupled_solo_r18_fpn"]
SMALL_GRIDS = (6, 5, 4, 3, 2)  # keep the class branches cheap; the names do not depend on them


@pytest.mark.parametrize("config", CONFIGS)
def test_mmdet_and_solo_repo_layouts_load_every_tensor(tmp_path, config):
    mm, orig = _checkpoints(config, grids=SMALL_GRIDS)
    meta = {"CLASSES": tuple(f"c{i}" for i in range(C)), "epoch": 36}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete checkpoint loads without a warning
        a = solo_fast.SOLO.from_mmdet(_save(tmp_path, {"meta": meta, "state_dict": mm}, "mm.pth"), config,
                                      num_grids=SMALL_GRIDS)
        b = solo_fast.SOLO.from_mmdet(_save(tmp_path, {"meta": meta, "state_dict": orig}, "orig.pth"), config,
                                      num_grids=SMALL_GRIDS)
    assert a.load_report.format == "mmdet" and b.load_report.format == "solo"
    for model in (a, b):
        assert model.num_classes == C  # read from the class conv's rows
        assert model.class_names == list(meta["CLASSES"])
        assert model.load_report.missing == [] and model.load_report.unexpected == []
        state = model.state_dict()
        # solo_fast names its modules as mmdetection does: every parameter and buffer has a
        # counterpart, and received exactly that tensor.
        assert set(state) == set(mm)
        for key, value in mm.items():
            assert torch.equal(state[key], value), key
    # The same outputs as a model given the weights directly.
    direct = solo_fast.SOLO(config, num_classes=C, num_grids=SMALL_GRIDS)
    direct.load_state_dict(mm)
    ref = _outputs(direct)
    _assert_same_outputs(_outputs(a), ref)
    _assert_same_outputs(_outputs(b), ref)


def test_class_rows_are_not_shifted(tmp_path):
    # SOLO repository: num_classes=81 in its configs, solo_cate has 80 rows, row k = class k
    # (0-based). The class logits must come out in the same order, with no background row.
    mm, orig = _checkpoints("solov2_light_r18_fpn")
    model = solo_fast.SOLO.from_mmdet(_save(tmp_path, orig), "solov2_light_r18_fpn")
    assert model.mask_head.conv_cls.weight.shape[0] == C
    assert torch.equal(model.mask_head.conv_cls.weight, orig["bbox_head.solo_cate.weight"])
    assert torch.equal(model.mask_head.conv_cls.bias, orig["bbox_head.solo_cate.bias"])
    # An explicit num_classes that matches is fine; one counting the background is refused.
    assert solo_fast.SOLO.from_mmdet(_save(tmp_path, orig), "solov2_light_r18_fpn", num_classes=C).num_classes == C
    with pytest.raises(ValueError, match=r"(?s)bbox_head\.solo_cate\.weight.*background.*num_classes=7"):
        solo_fast.SOLO.from_mmdet(_save(tmp_path, orig), "solov2_light_r18_fpn", num_classes=C + 1)
    with pytest.raises(ValueError, match=r"mask_head\.conv_cls\.weight has 7 rows.*num_classes=3"):
        solo_fast.SOLO.from_mmdet(_save(tmp_path, mm), "solov2_light_r18_fpn", num_classes=3)


def test_file_forms(tmp_path):
    from safetensors.torch import save_file

    mm, orig = _checkpoints("decoupled_solo_light_r18_fpn")
    ref = solo_fast.SOLO.from_mmdet(_save(tmp_path, {"state_dict": mm}), "decoupled_solo_light_r18_fpn").state_dict()
    paths = [
        _save(tmp_path, mm, "plain.pt"),  # the state dict itself
        _save(tmp_path, {"module." + k: v for k, v in orig.items()}, "ddp.pth"),  # saved from a DDP wrapper
    ]
    save_file({k: v.contiguous() for k, v in orig.items()}, str(tmp_path / "w.safetensors"))
    paths.append(str(tmp_path / "w.safetensors"))
    for path in paths:
        state = solo_fast.SOLO.from_mmdet(path, "decoupled_solo_light_r18_fpn").state_dict()
        assert all(torch.equal(state[k], ref[k]) for k in ref), path


def test_numpy_scalars_in_meta_are_accepted(tmp_path):
    np = pytest.importorskip("numpy")
    mm, _ = _checkpoints("solov2_light_r18_fpn")
    meta = {"hook_msgs": {"best_score": np.float64(0.3)}, "seed": np.int64(3)}
    model = solo_fast.SOLO.from_mmdet(_save(tmp_path, {"meta": meta, "state_dict": mm}), "solov2_light_r18_fpn")
    assert model.load_report.missing == []


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    mm, orig = _checkpoints("solov2_light_r18_fpn")
    del orig["bbox_head.solo_kernel.bias"]
    orig["bbox_head.extra_conv.weight"] = torch.zeros(3)
    orig["teacher.conv.weight"] = torch.zeros(3)
    for k in [k for k in orig if k.endswith("num_batches_tracked")]:
        del orig[k]  # older checkpoints have no batch counters: not reported
    path = _save(tmp_path, {"state_dict": orig})
    with pytest.warns(UserWarning, match=r"(?s)mask_head\.conv_kernel\.bias.*bbox_head\.extra_conv\.weight"):
        model = solo_fast.SOLO.from_mmdet(path, "solov2_light_r18_fpn")
    assert model.load_report.missing == ["mask_head.conv_kernel.bias"]
    assert model.load_report.unexpected == ["bbox_head.extra_conv.weight", "teacher.conv.weight"]
    assert torch.equal(model.mask_head.conv_kernel.weight, mm["mask_head.conv_kernel.weight"])
    with pytest.raises(ValueError, match=r"(?s)strict.*mask_head\.conv_kernel\.bias.*teacher\.conv\.weight"):
        solo_fast.SOLO.from_mmdet(path, "solov2_light_r18_fpn", strict=True)


@pytest.mark.parametrize("saved, config, match", [
    # another head family
    ("solo_r18_fpn", "solov2_light_r18_fpn",
     r"SOLO head \(key 'mask_head\.(mask_convs|conv_mask_list)\..*'solov2_light_r18_fpn' has a SOLOv2 head"
     r".*looks like.*'solo_r18_fpn'"),
    ("decoupled_solo_r18_fpn", "decoupled_solo_light_r18_fpn", r"Decoupled SOLO head \(key 'mask_head\."),
    # another backbone depth: BasicBlock 2-2-2-2 is ResNet-18, not 34 or 50
    ("solov2_light_r18_fpn", "solov2_light_r34_fpn", r"ResNet-18 as backbone \(key 'backbone\.layer4\.1\."),
    ("solov2_light_r18_fpn", "solov2_light_r50_fpn", r"ResNet-18 as backbone.*ResNet-50"),
    # SOLOv2 (4 convs of 512) vs SOLOv2 Light (2 of 256)
    ("solov2_light_r18_fpn", "solov2_r18_fpn", r"2 stacked head convs \(key 'mask_head\.cls_convs\.1\..*has 4"),
])
def test_checkpoint_for_another_config(tmp_path, saved, config, match):
    mm, _ = _checkpoints(saved)
    with pytest.raises(ValueError, match=match):
        solo_fast.SOLO.from_mmdet(_save(tmp_path, {"state_dict": mm}), config)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    _, orig = _checkpoints("solov2_light_r18_fpn")
    path = _save(tmp_path, orig)
    # Same structure, other widths: a SOLOv2 Light checkpoint with E = 128 against E = 64.
    with pytest.raises(ValueError, match=r"key bbox_head\.solo_kernel\.weight \(solo_fast: mask_head\.conv_kernel"
                                         r"\.weight\) has shape \(128, 256, 3, 3\).*expects \(64, 256, 3, 3\)"):
        solo_fast.SOLO.from_mmdet(path, "solov2_light_r18_fpn", mask_out_channels=64)
    # Other grids: conv_mask_list of S^2 rows.
    mm, _ = _checkpoints("solo_r18_fpn")
    with pytest.raises(ValueError, match=r"mask_head\.conv_mask_list\.0\.weight has shape \(1600, 256, 1, 1\)"):
        solo_fast.SOLO.from_mmdet(_save(tmp_path, mm), "solo_r18_fpn", num_grids=(20, 36, 24, 16, 12))


def test_bad_files(tmp_path):
    import argparse

    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        solo_fast.SOLO.from_mmdet(str(tmp_path / "nothere.pth"), "solo_r18_fpn")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        solo_fast.SOLO.from_mmdet(str(text), "solo_r18_fpn")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        solo_fast.SOLO.from_mmdet(str(tmp_path / "empty.pt"), "solo_r18_fpn")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="safetensors"):
        solo_fast.SOLO.from_mmdet(str(tmp_path / "bad.safetensors"), "solo_r18_fpn")
    with pytest.raises(ValueError, match="not a checkpoint"):
        solo_fast.SOLO.from_mmdet(_save(tmp_path, [1, 2, 3]), "solo_r18_fpn")
    # Arbitrary Python objects are never unpickled (weights_only=True).
    mm, _ = _checkpoints("solov2_light_r18_fpn")
    unsafe = _save(tmp_path, {"state_dict": mm, "args": argparse.Namespace(lr=0.01)}, "unsafe.pth")
    with pytest.raises(ValueError, match=r"weights_only=True.*argparse\.Namespace"):
        solo_fast.SOLO.from_mmdet(unsafe, "solov2_light_r18_fpn")
    # Another detector (Mask R-CNN keys) and deformable convolutions are refused.
    rcnn = {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7), "roi_head.mask_head.conv_logits.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"not a SOLO-family checkpoint.*roi_head"):
        solo_fast.SOLO.from_mmdet(_save(tmp_path, rcnn), "solo_r18_fpn")
    rtmdet = {"backbone.stem.0.conv.weight": torch.zeros(3), "bbox_head.rtm_cls.0.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"not a SOLO-family checkpoint.*bbox_head\.rtm_cls\.0\.weight"):
        solo_fast.SOLO.from_mmdet(_save(tmp_path, rtmdet), "solo_r18_fpn")
    mm["mask_head.kernel_convs.1.conv.conv_offset.weight"] = torch.zeros(27, 256, 3, 3)
    with pytest.raises(ValueError, match=r"deformable convolutions.*kernel_convs\.1\.conv\.conv_offset"):
        solo_fast.SOLO.from_mmdet(_save(tmp_path, mm), "solov2_light_r18_fpn")
    del mm["mask_head.kernel_convs.1.conv.conv_offset.weight"]
    with pytest.raises(ValueError, match="unknown config name 'solov3_r18_fpn'"):
        solo_fast.SOLO.from_mmdet(_save(tmp_path, mm), "solov3_r18_fpn")
