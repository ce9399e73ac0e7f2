"""ImageNet backbone weights (``SOLO(..., backbone_weights=PATH)``) and the training recipe
chosen with and without pretrained weights (``solo_fast.engine.train.plan``).

The weight files are built here with the key layouts of the files people have:
torchvision's published ResNets (written from torchvision's ResNet definition, below) and
mmpretrain / mmdetection checkpoints (the same names under ``backbone.``).
"""
import json

import pytest
import torch

import solo_fast
from solo_fast.checkpoint.backbone import BackboneReport
from solo_fast.data.synthetic import draw_scene
from solo_fast.engine.train import TrainOptions, plan, train

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
SMALL = dict(num_grids=(6, 5, 4, 3, 2), min_size=SIZE, max_size=SIZE)


def torchvision_resnet(depth, seed=0):
    """A state dict with the names and shapes of torchvision's ``resnet{depth}`` (torchvision
    ``models/resnet.py``): stem ``conv1`` (64, 3, 7, 7) + ``bn1``; ``layer1..4`` with 64, 128,
    256, 512 planes of BasicBlocks (``conv1`` 3x3, ``bn1``, ``conv2`` 3x3, ``bn2``; expansion 1)
    or Bottlenecks (``conv1`` 1x1, ``conv2`` 3x3, ``conv3`` 1x1 to 4x planes, ``bn1..3``;
    expansion 4); ``downsample.0`` (1x1 conv) + ``downsample.1`` (BN) on a stage's first block
    when its stride is 2 or its input width differs from planes x expansion; the 1000-class
    classifier ``fc``. BatchNorms have weight, bias, running_mean, running_var and
    num_batches_tracked. Random values, different for every tensor."""
    kind, counts = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                    50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}[depth]
    expansion = 1 if kind == "basic" else 4
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, out_c, in_c, k):
        sd[f"{name}.weight"] = torch.randn(out_c, in_c, k, k, generator=g) * 0.05

    def bn(name, c):
        sd[f"{name}.weight"] = torch.rand(c, generator=g) + 0.5
        sd[f"{name}.bias"] = torch.randn(c, generator=g) * 0.1
        sd[f"{name}.running_mean"] = torch.randn(c, generator=g) * 0.1
        sd[f"{name}.running_var"] = torch.rand(c, generator=g) + 0.5
        sd[f"{name}.num_batches_tracked"] = torch.tensor(1234)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), counts), start=1):
        stride = 1 if stage == 1 else 2
        for b in range(n):
            p = f"layer{stage}.{b}"
            if kind == "basic":
                conv(f"{p}.conv1", planes, inplanes, 3), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            else:
                conv(f"{p}.conv1", planes, inplanes, 1), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    sd["fc.weight"] = torch.randn(1000, 512 * expansion, generator=g) * 0.01
    sd["fc.bias"] = torch.zeros(1000)
    return sd


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    sd = torchvision_resnet(18)
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(sd, path)
    return sd, str(path)


def backbone_landed(model, sd, reference):
    """Every torchvision tensor (but fc) is in the parameter of the same name, every other
    tensor of the model equals the same-seed model built without weights."""
    state = model.state_dict()
    backbone = {k[len("backbone."):] for k in state if k.startswith("backbone.")}
    assert backbone == {k for k in sd if not k.startswith("fc.")}  # one parameter per torchvision key
    for k, v in state.items():
        if k.startswith("backbone."):
            assert torch.equal(v, sd[k[len("backbone."):]]), k
        else:
            assert torch.equal(v, reference[k]), k


def built(config, **kw):
    torch.manual_seed(0)
    return solo_fast.SOLO(config, num_classes=3, **SMALL, **kw)


# ---------------------------------------------------------------- the file layouts
def test_torchvision_resnet18_lands_in_the_backbone(r18):
    sd, path = r18
    model = built("solov2_light_r18_fpn", backbone_weights=path)
    backbone_landed(model, sd, built("solov2_light_r18_fpn").state_dict())
    report = model.load_report
    assert isinstance(report, BackboneReport) and report.format == "torchvision"
    assert report.unused == ["fc.bias", "fc.weight"]  # the ImageNet classifier: reported, not an error
    assert set(report.loaded) == {"backbone." + k for k in sd if not k.startswith("fc.")}
    assert model.pretrained == "backbone" and model.weights_path == path
    assert "fc.weight" in str(report)


def test_torchvision_resnet50(tmp_path):
    sd = torchvision_resnet(50, seed=1)
    path = tmp_path / "resnet50-11ad3fa6.pth"
    torch.save(sd, path)
    model = built("solov2_light_r50_fpn", backbone_weights=str(path))
    backbone_landed(model, sd, built("solov2_light_r50_fpn").state_dict())
    assert "layer1.0.downsample.0.weight" in sd  # the Bottleneck stage whose width changes at stride 1
    assert model.load_report.unused == ["fc.bias", "fc.weight"]


def test_mmpretrain_and_mmdet_prefixed_checkpoints(r18, tmp_path):
    sd, _ = r18
    # mmpretrain: classifier under head.*; a detector: neck and heads come along. Both in
    # mmengine's layout (state_dict + meta).
    nested = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    extra = {"head.fc.weight": torch.zeros(1000, 512), "head.fc.bias": torch.zeros(1000),
             "neck.lateral_convs.0.conv.weight": torch.zeros(256, 64, 1, 1)}
    path = tmp_path / "resnet18_8xb32_in1k.pth"
    torch.save({"meta": {"epoch": 100, "mmpretrain_version": "1.2.0"}, "state_dict": {**nested, **extra}}, path)
    model = built("solov2_light_r18_fpn", backbone_weights=str(path))
    backbone_landed(model, sd, built("solov2_light_r18_fpn").state_dict())
    assert model.load_report.format == "mmdet" and model.load_report.unused == sorted(extra)


def test_safetensors(r18, tmp_path):
    from safetensors.torch import save_file

    sd, _ = r18
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = built("solov2_light_r18_fpn", backbone_weights=str(path))
    backbone_landed(model, sd, built("solov2_light_r18_fpn").state_dict())


# ---------------------------------------------------------------- what is refused
def test_missing_and_misshaped_keys(r18, tmp_path):
    sd, _ = r18
    missing = {k: v for k, v in sd.items() if k != "layer3.1.bn2.running_var"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"backbone_weights: .*has no 'layer3\.1\.bn2\.running_var'.*\(256,\)"):
        built("solov2_light_r18_fpn", backbone_weights=str(tmp_path / "missing.pth"))
    wrong = dict(sd, **{"layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"key 'layer2\.0\.conv1\.weight'.*shape \(128, 64, 1, 1\).*"
                                         r"expects \(128, 64, 3, 3\)"):
        built("solov2_light_r18_fpn", backbone_weights=str(tmp_path / "wrong.pth"))
    # A ResNet-50 file for a ResNet-18 config: the first key of another shape, and what the file holds.
    torch.save(torchvision_resnet(50), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight.*\(64, 64, 1, 1\).*\(64, 64, 3, 3\)"
                                         r".*the file holds ResNet-50"):
        built("solov2_light_r18_fpn", backbone_weights=str(tmp_path / "r50.pth"))
    # mmdetection names in messages keep their prefix.
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in missing.items()}}, tmp_path / "mm.pth")
    with pytest.raises(ValueError, match=r"has no 'backbone\.layer3\.1\.bn2\.running_var'"):
        built("solov2_light_r18_fpn", backbone_weights=str(tmp_path / "mm.pth"))


def test_files_that_are_not_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone_weights.*nothere.pth"):
        built("solov2_light_r18_fpn", backbone_weights=str(tmp_path / "nothere.pth"))
    (tmp_path / "notes.pth").write_text("these are not weights")
    with pytest.raises(ValueError, match="backbone_weights: .*not a PyTorch checkpoint"):
        built("solov2_light_r18_fpn", backbone_weights=str(tmp_path / "notes.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="backbone_weights: .*not a checkpoint"):
        built("solov2_light_r18_fpn", backbone_weights=str(tmp_path / "list.pth"))
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"not a ResNet checkpoint.*encoder\.weight"):
        built("solov2_light_r18_fpn", backbone_weights=str(tmp_path / "other.pth"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="backbone_weights: .*safetensors"):
        built("solov2_light_r18_fpn", backbone_weights=str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="backbone_weights: expected the path"):
        built("solov2_light_r18_fpn", backbone_weights=123)


# ---------------------------------------------------------------- the recipe
def test_recipe_with_and_without_weights(r18, tmp_path):
    _, path = r18
    opts = TrainOptions(out_dir=str(tmp_path), batch_size=2)
    # The published recipe (mmdetection configs/solov2): frozen stem + layer1, norm_eval, SGD
    # momentum 0.9, weight decay 1e-4, lr 0.01 per 16 images, warm-up 500 iterations from
    # lr/3, 12 epochs with lr drops at 8 and 11.
    p = plan(built("solov2_light_r18_fpn", backbone_weights=path), opts, iters_per_epoch=1000, world_size=4)
    a = p.options
    assert (p.recipe, p.frozen_stages, p.norm_eval) == ("published", 1, True)
    assert (a.optimizer, a.momentum, a.weight_decay, a.warmup_iters, a.epochs, a.milestones) == \
        ("sgd", 0.9, 1e-4, 500, 12, (8, 11))
    assert a.lr == pytest.approx(0.01 * 2 * 4 / 16) and a.warmup_ratio == pytest.approx(1 / 3)
    assert "pretrained" in p.reason
    # From scratch (the demo's recipe): nothing frozen, live BatchNorm, AdamW lr 3e-4, weight
    # decay 0.05, warm-up from 3 %; 500 warm-up iterations at most a fifth of the run.
    p = plan(built("solov2_light_r18_fpn"), opts, iters_per_epoch=10)
    a = p.options
    assert (p.recipe, p.frozen_stages, p.norm_eval) == ("from scratch", -1, False)
    assert (a.optimizer, a.lr, a.weight_decay, a.warmup_ratio) == ("adamw", 3e-4, 0.05, 0.03)
    assert a.warmup_iters == 12 * 10 // 5 and a.milestones == (8, 11)
    assert "random weights" in p.reason
    # What the caller sets is kept; an optimizer chosen explicitly brings its own numbers.
    p = plan(built("solov2_light_r18_fpn", frozen_stages=-1), TrainOptions(out_dir=str(tmp_path), lr=0.5,
                                                                           optimizer="sgd", epochs=24),
             iters_per_epoch=1000)
    assert (p.frozen_stages, p.norm_eval, p.options.lr, p.options.weight_decay) == (-1, False, 0.5, 1e-4)
    assert p.options.milestones == (16, 22)  # mmdetection's 2x schedule
    assert p.explicit == ("optimizer", "lr", "frozen_stages")
    # With max_iters the milestones are iterations.
    p = plan(built("solov2_light_r18_fpn", backbone_weights=path), TrainOptions(out_dir=str(tmp_path), max_iters=1200),
             iters_per_epoch=7)
    assert p.options.milestones == (800, 1100) and p.options.epochs is None and p.options.save_every == 1000


def test_freezing_random_layers_is_refused(r18, tmp_path):
    _, path = r18
    opts = TrainOptions(out_dir=str(tmp_path / "never"))
    with pytest.raises(ValueError, match=r"frozen_stages: 1 freezes the stem and layer1 .*random weights"):
        plan(built("solov2_light_r18_fpn", frozen_stages=1), opts, iters_per_epoch=1)
    with pytest.raises(ValueError, match=r"norm_eval: True .*random weights"):
        plan(built("solov2_light_r18_fpn", frozen_stages=-1, norm_eval=True), opts, iters_per_epoch=1)
    # With pretrained weights the same settings are the caller's to choose.
    p = plan(built("solov2_light_r18_fpn", frozen_stages=2, backbone_weights=path), opts, iters_per_epoch=1)
    assert p.frozen_stages == 2
    # Refused before anything is written.
    with pytest.raises(ValueError, match="frozen_stages"):
        train(built("solov2_light_r18_fpn", frozen_stages=0), scenes(1), out_dir=str(tmp_path / "never"), max_iters=1)
    assert not (tmp_path / "never").exists()


def scenes(n):
    out = []
    for s in range(100):
        img, masks, labels = draw_scene(SIZE, SIZE, num_objects=2, seed=s)
        if len(labels):
            out.append((torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous(),
                        {"masks": torch.from_numpy(masks), "labels": torch.from_numpy(labels).long()}))
        if len(out) == n:
            return out


def test_training_applies_the_recipe(r18, tmp_path):
    sd, path = r18
    data = scenes(2)
    kw = dict(batch_size=2, max_iters=2, log_every=1, lr=0.01)
    model = train(built("solov2_light_r18_fpn", backbone_weights=path), data, out_dir=str(tmp_path / "pre"), **kw)
    first = (tmp_path / "pre" / "train.log").read_text().splitlines()[0]
    assert "recipe: published, because the model starts from pretrained weights" in first and path in first
    assert "SGD" in first and "stem + layer1 frozen" in first and "BatchNorm statistics frozen" in first
    state = model.state_dict()
    # Frozen stem and layer1, BatchNorm statistics everywhere untouched; layer2 learnt.
    for k, v in sd.items():
        if k.startswith(("conv1.", "bn1.", "layer1.")) or "running_" in k:
            assert torch.equal(state["backbone." + k], v), k
    assert not torch.equal(state["backbone.layer2.0.conv1.weight"], sd["layer2.0.conv1.weight"])
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())
    assert json.loads((tmp_path / "pre" / "config.json").read_text())["recipe"]["name"] == "published"

    model = train(built("solov2_light_r18_fpn"), data, out_dir=str(tmp_path / "scratch"), **kw)
    first = (tmp_path / "scratch" / "train.log").read_text().splitlines()[0]
    assert first.split(" ", 2)[2].startswith("recipe: from scratch, because the model starts from random weights")
    assert "AdamW" in first and "nothing frozen" in first and "BatchNorm learns its statistics" in first
    assert model.cfg["frozen_stages"] == -1 and model.cfg["norm_eval"] is False
    assert all(p.requires_grad for p in model.backbone.parameters())
    saved = solo_fast.SOLO.from_pretrained(str(tmp_path / "scratch" / "model.safetensors"))
    assert saved.cfg["frozen_stages"] == -1 and saved.cfg["norm_eval"] is False
