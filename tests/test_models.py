"""Every named config in train and eval mode on the CPU: shapes, dtypes, finite losses, gradients."""
import pytest
import torch

import solo_fast
from solo_fast.modeling import CONFIGS

# Small grids keep the heads cheap on 2 CPU cores; the architecture is otherwise the named one.
SMALL = dict(min_size=96, max_size=128, num_grids=(8, 6, 5, 4, 3), flip_prob=0.0)  # one deterministic loss


def scene(h=96, w=128):
    img = torch.rand(3, h, w)
    masks = torch.zeros(3, h, w, dtype=torch.uint8)
    masks[0, 5:40, 10:50] = 1  # scale ~37: level 0
    masks[1, 30:95, 40:127] = 1  # scale ~75: levels 0 and 1
    masks[2, 60:70, 0:12] = 1  # small, touching the left border
    return img, {"masks": masks, "labels": torch.tensor([0, 2, 1])}


def test_configs_cover_the_published_names():
    for family in ("solo", "decoupled_solo", "decoupled_solo_light", "solov2", "solov2_light"):
        for depth in (18, 34, 50, 101):
            assert f"{family}_r{depth}_fpn" in CONFIGS
    cfg = solo_fast.modeling.get_config("solov2_light_r50_fpn")
    assert cfg["stacked_convs"] == 2 and cfg["feat_channels"] == 256 and cfg["mask_out_channels"] == 128
    assert cfg["scale_ranges"][0] == (1, 56) and (cfg["min_size"], cfg["max_size"]) == (448, 768)
    cfg = solo_fast.modeling.get_config("solov2_r50_fpn")
    assert cfg["feat_channels"] == 512 and cfg["stacked_convs"] == 4 and cfg["mask_out_channels"] == 256


def _grad_ok(module):
    params = [p for p in module.parameters() if p.requires_grad]
    return bool(params) and all(p.grad is not None for p in params) and any(float(p.grad.abs().sum()) > 0 for p in params)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_named_config_train_and_eval(name):
    torch.manual_seed(0)
    model = solo_fast.SOLO(name, num_classes=3, **SMALL)
    img, tgt = scene()
    model.train()
    losses = model([img, img.flip(-1)], [tgt, {"masks": tgt["masks"].flip(-1), "labels": tgt["labels"]}])
    assert set(losses) == {"loss_mask", "loss_cls"}
    for v in losses.values():
        assert v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v)
    assert float(losses["loss_mask"]) > 0
    sum(losses.values()).backward()

    # Frozen stem and stage 1; the rest of the backbone, the neck and each head branch learn.
    assert all(not p.requires_grad for p in model.backbone.conv1.parameters())
    assert all(not p.requires_grad for p in model.backbone.layer1.parameters())
    assert _grad_ok(model.backbone.layer4) and _grad_ok(model.neck)
    head = model.mask_head
    branches = {"cls_convs": head.cls_convs, "conv_cls": head.conv_cls}
    if hasattr(head, "mask_feature_head"):
        branches.update(mask_feature_head=head.mask_feature_head, kernel_convs=head.kernel_convs,
                        conv_kernel=head.conv_kernel)
    elif hasattr(head, "conv_mask_list_x"):
        branches.update(conv_mask_x=head.conv_mask_list_x[0], conv_mask_y=head.conv_mask_list_y[0])
        if head.light:
            branches["mask_convs"] = head.mask_convs
        else:
            branches.update(mask_convs_x=head.mask_convs_x, mask_convs_y=head.mask_convs_y)
    else:
        branches.update(mask_convs=head.mask_convs, conv_mask_0=head.conv_mask_list[0])
    for branch, module in branches.items():
        assert _grad_ok(module), f"no gradient reached {branch}"

    # Batch-norm statistics stay frozen in training mode.
    assert not model.backbone.bn1.training and not model.backbone.layer3[0].bn1.training

    model.eval()
    with torch.no_grad():
        outs = model([img, torch.rand(3, 70, 50)])
    assert len(outs) == 2
    for out, (h, w) in zip(outs, [(96, 128), (70, 50)]):
        n = out["scores"].shape[0]
        assert out["masks"].shape == (n, h, w) and out["masks"].dtype == torch.bool
        assert out["labels"].dtype == torch.int64 and out["boxes"].shape == (n, 4)
        assert torch.all(out["scores"][:-1] >= out["scores"][1:])


@pytest.mark.parametrize("name", ["solo_r18_fpn", "solov2_light_r18_fpn"])
def test_published_grids_forward(name):
    # The real grid sizes (40, 36, 24, 16, 12) on a small image, with a low threshold so
    # that the whole post-processing runs.
    model = solo_fast.SOLO(name, num_classes=2, min_size=128, max_size=160).eval()
    img, _ = scene(120, 150)
    res = model.predict(img, score_thr=0.005, nms_pre=50, max_per_img=10)[0]
    assert res.masks.shape[1:] == (120, 150) and len(res) <= 10
    assert res.labels.dtype == torch.int64


def test_images_without_annotations_train():
    model = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, **SMALL).train()
    img, tgt = scene()
    empty = {"masks": torch.zeros(0, 96, 128, dtype=torch.uint8), "labels": torch.zeros(0, dtype=torch.long)}
    losses = model([img], [empty])
    assert float(losses["loss_mask"]) == 0 and torch.isfinite(losses["loss_cls"])
    sum(losses.values()).backward()
    losses = model([img, img], [empty, tgt])
    assert float(losses["loss_mask"]) > 0


def test_loss_matches_hand_computation():
    """Focal over all cells / (num_pos + 1) and dice over positives / num_pos, recomputed here."""
    torch.manual_seed(1)
    model = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, **SMALL).train()
    img, tgt = scene()
    losses = model([img], [tgt])
    batch, metas, masks = model.transform([img], [tgt["masks"]], training=True)
    t = solo_fast.ops.center_region_assign(
        masks[0], tgt["labels"], pad_shape=metas[0].pad_shape, num_grids=list(model.cfg["num_grids"]),
        scale_ranges=model.cfg["scale_ranges"], num_classes=3, mask_stride=4)
    out = model.extract(batch)
    num_pos = sum(c.numel() for c in t.pos_cells)
    assert num_pos > 0
    probs, labels = [], []
    for lvl, cls in enumerate(out["cls"]):
        probs.append(cls[0].sigmoid().permute(1, 2, 0).reshape(-1, 3))
        labels.append(t.labels[lvl].reshape(-1))
    p, lab = torch.cat(probs), torch.cat(labels)
    y = torch.zeros_like(p)
    fg = lab < 3
    y[fg.nonzero()[:, 0], lab[fg]] = 1
    pt = torch.where(y == 1, p, 1 - p)
    at = torch.where(y == 1, 0.25, 0.75)
    focal = (-at * (1 - pt) ** 2 * torch.log(pt)).sum() / (num_pos + 1)
    torch.testing.assert_close(losses["loss_cls"], focal, rtol=1e-4, atol=1e-6)
    feats = out["mask_feats"][0]
    dice = []
    for lvl, cells in enumerate(t.pos_cells):
        for c, inst in zip(cells.tolist(), t.pos_instance[lvl].tolist()):
            k = out["kernels"][lvl][0].reshape(feats.shape[0], -1)[:, c]
            pm = torch.einsum("e,ehw->hw", k, feats).sigmoid()
            q = t.mask_targets[lvl][inst].float()
            dice.append(1 - 2 * (pm * q).sum() / ((pm * pm).sum() + (q * q).sum() + 0.002))
    torch.testing.assert_close(losses["loss_mask"], 3 * torch.stack(dice).mean(), rtol=1e-4, atol=1e-6)


def test_solov2_r50_builds_with_published_sizes():
    model = solo_fast.SOLO("solov2_r50_fpn", num_classes=80)
    head = model.mask_head
    assert head.conv_cls.out_channels == 80 and head.conv_kernel.out_channels == 256
    assert head.kernel_convs[0].conv.in_channels == 258  # 256 features + 2 coordinates
    assert len(head.kernel_convs) == 4 and head.kernel_convs[1].conv.out_channels == 512
    assert model.neck.lateral_convs[0].conv.in_channels == 256 and model.neck.lateral_convs[3].conv.in_channels == 2048


def test_frozen_stages_and_norm_eval_settings():
    """From scratch one wants nothing frozen and live BatchNorm statistics."""
    model = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, frozen_stages=-1, norm_eval=False, **SMALL).train()
    assert all(p.requires_grad for p in model.backbone.parameters())
    bn = model.backbone.bn1
    assert bn.training
    before = bn.running_mean.clone()
    img, tgt = scene()
    model([img], [tgt])
    assert not torch.equal(before, bn.running_mean)
    frozen = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, **SMALL).train()
    before = frozen.backbone.layer2[0].bn1.running_mean.clone()
    frozen([img], [tgt])
    assert torch.equal(before, frozen.backbone.layer2[0].bn1.running_mean)


def test_typed_config_round_trips_and_is_read_only():
    from solo_fast.modeling import configs

    model = solo_fast.SOLO("decoupled_solo_light_r18_fpn", num_classes=4, **SMALL)
    c = model.config
    assert (c.arch.depth, c.arch.head, c.input.min_size, c.input.train_min_size) == (18, "decoupled_light", 96, (96,))
    assert c.inference.score_thr == 0.1 and c.loss.scale_ranges == configs.SCALE_RANGES_DECOUPLED_LIGHT
    flat = dict(model.cfg)
    assert configs.SOLOConfig.from_dict(flat) == c and set(flat) == set(configs.BASE) | {"name", "num_classes"}
    with pytest.raises(TypeError):
        model.cfg["score_thr"] = 0.5  # the mapping is a view; settings change through config.replace
    changed = c.replace(score_thr=0.3, frozen_stages=-1)
    assert changed.inference.score_thr == 0.3 and changed.arch.frozen_stages == -1 and c.inference.score_thr == 0.1
    with pytest.raises(ValueError, match="score_thr"):
        c.replace(score_thr=2.0)
    with pytest.raises(ValueError, match="no_such"):
        c.replace(no_such=1)
