"""Fine-tuning a COCO model on your classes (``SOLO.finetune_from``, ``solo-fast train --init``),
schedules by iterations with a checkpoint interval, and the dataset's category ids travelling
with the model into ``solo-fast predict``'s results.json.

The "COCO checkpoint" is an 80-class model with random weights, saved in mmdetection's
layout with COCO's class names in its ``meta`` (as mmdetection writes them).
"""
import json
import math
import os
import re

import pytest
import torch

import solo_fast
from solo_fast.cli import main
from solo_fast.data import CocoDataset, shapes_image_dir, write_shapes_dataset
from solo_fast.engine.train import WarmupStepSchedule, train

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
SMALL = dict(num_grids=(6, 5, 4, 3, 2), min_size=SIZE, max_size=SIZE)
CONFIG = "solov2_light_r18_fpn"
# mmdetection's CocoDataset classes, in the order of COCO's category ids (1..90 with gaps).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")
# The dataset's classes: two COCO classes (one spelt differently) and a new one, with
# COCO-style category ids that are not 0..C-1.
OURS = ["person", "widget", "Traffic_Light"]
OUR_IDS = [1, 7, 90]
FOCAL_PRIOR_BIAS = math.log(0.01 / 0.99)  # sigmoid(b) = 0.01: every class starts at probability 0.01


def perturbed_state(num_classes, seed=1):
    """A model's state with every float tensor moved off its initial value, so that "equal to
    the checkpoint" cannot hold by a shared random seed."""
    torch.manual_seed(0)
    src = solo_fast.SOLO(CONFIG, num_classes=num_classes, **SMALL)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in src.state_dict().items():
        if not v.is_floating_point():
            state[k] = v.clone()
        elif "running_var" in k:
            state[k] = v * (1 + 0.1 * torch.rand(v.shape, generator=g))
        else:
            state[k] = v + 0.01 * torch.randn(v.shape, generator=g)
    return src, state


@pytest.fixture(scope="module")
def coco_ckpt(tmp_path_factory):
    _, state = perturbed_state(80)
    path = tmp_path_factory.mktemp("ckpt") / "solov2_light_r18_fpn_3x_coco.pth"
    torch.save({"meta": {"CLASSES": COCO_CLASSES, "epoch": 36}, "state_dict": state}, path)
    return str(path), state


def fresh_model(num_classes=3):
    torch.manual_seed(123)  # not the checkpoint's seed
    return solo_fast.SOLO(CONFIG, num_classes=num_classes, **SMALL)


# ---------------------------------------------------------------- loading
def test_coco_checkpoint_into_three_classes(coco_ckpt):
    path, state = coco_ckpt
    torch.manual_seed(123)
    model = solo_fast.SOLO.finetune_from(path, 3, class_names=OURS, category_ids=OUR_IDS, **SMALL)
    assert model.config_name == CONFIG  # the only config with this architecture
    ours = model.state_dict()
    cls_w, cls_b = "mask_head.conv_cls.weight", "mask_head.conv_cls.bias"
    for k, v in ours.items():
        if k not in (cls_w, cls_b):
            assert torch.equal(v, state[k]), k
    # person is COCO's row 0, traffic light row 9; widget is new: the focal prior.
    assert torch.equal(ours[cls_w][0], state[cls_w][0]) and torch.equal(ours[cls_b][0], state[cls_b][0])
    assert torch.equal(ours[cls_w][2], state[cls_w][9]) and torch.equal(ours[cls_b][2], state[cls_b][9])
    assert ours[cls_b][1].item() == pytest.approx(FOCAL_PRIOR_BIAS, abs=1e-6)
    new_row = ours[cls_w][1]
    assert 0.008 < float(new_row.std()) < 0.012  # N(0, 0.01), as a new head's
    assert not any(torch.allclose(new_row, state[cls_w][i]) for i in range(80))
    report = model.load_report
    assert report.kept_rows == {0: 0, 2: 9} and report.prior_rows == [1] and report.class_match == "name"
    assert report.reinitialized == [cls_b, cls_w]
    assert set(report.loaded) == set(ours) - {cls_w, cls_b}
    assert report.missing == [] and report.unexpected == [] and report.mismatched == {}
    assert "'widget'" in str(report) and "row 9" in str(report)
    assert model.class_names == OURS and model.category_ids == OUR_IDS and model.pretrained == "checkpoint"


def test_class_rows_without_names_and_with_the_same_classes(coco_ckpt):
    path, state = coco_ckpt
    model = solo_fast.SOLO.finetune_from(path, 3, **SMALL)  # nothing to match rows by
    bias = model.state_dict()["mask_head.conv_cls.bias"]
    torch.testing.assert_close(bias, torch.full((3,), FOCAL_PRIOR_BIAS), rtol=0, atol=1e-6)
    assert model.load_report.kept_rows == {} and model.load_report.prior_rows == [0, 1, 2]
    # The same 80 classes: the class conv is the checkpoint's, nothing re-initialised.
    same = solo_fast.SOLO.finetune_from(path, 80, **SMALL)
    assert torch.equal(same.state_dict()["mask_head.conv_cls.weight"], state["mask_head.conv_cls.weight"])
    assert same.load_report.reinitialized == [] and same.load_report.class_match == "position"


def test_from_a_solo_fast_checkpoint(tmp_path):
    src, state = perturbed_state(80, seed=2)
    src.load_state_dict(state)
    src.class_names = list(COCO_CLASSES)
    path = src.save_pretrained(str(tmp_path / "coco"))
    model = solo_fast.SOLO.finetune_from(path, 3, class_names=["car", "widget", "dog"])
    # Config and settings come from the file (num_grids, sizes), not the config's defaults.
    assert model.config_name == CONFIG and model.cfg["num_grids"] == SMALL["num_grids"]
    assert model.load_report.format == "solo_fast" and model.load_report.kept_rows == {0: 2, 2: 16}
    assert torch.equal(model.state_dict()["neck.fpn_convs.0.conv.weight"], state["neck.fpn_convs.0.conv.weight"])


def test_finetune_bad_input(coco_ckpt, tmp_path):
    path, _ = coco_ckpt
    with pytest.raises(ValueError, match="num_classes"):
        solo_fast.SOLO.finetune_from(path, 0)
    with pytest.raises(ValueError, match=r"class_names: expected a sequence of 3 strs"):
        solo_fast.SOLO.finetune_from(path, 3, class_names=["person"])
    with pytest.raises(ValueError, match=r"category_ids: expected a sequence of 3 ints"):
        solo_fast.SOLO.finetune_from(path, 3, category_ids=["1", "7", "90"])
    with pytest.raises(ValueError, match=r"config: .*SOLOv2 head.*'solo_r18_fpn'"):
        solo_fast.SOLO.finetune_from(path, 3, config="solo_r18_fpn")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        solo_fast.SOLO.finetune_from(str(tmp_path / "nothere.pth"), 3)
    # An ImageNet backbone is no detector: that is backbone_weights' job.
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}, tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="not a SOLO-family checkpoint"):
        solo_fast.SOLO.finetune_from(str(tmp_path / "r18.pth"), 3)
    (tmp_path / "notes.pth").write_text("no weights here")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        solo_fast.SOLO.finetune_from(str(tmp_path / "notes.pth"), 3)


# ---------------------------------------------------------------- a dataset with COCO ids
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """4 training images of shapes whose categories are renamed to OURS with ids OUR_IDS."""
    root = str(tmp_path_factory.mktemp("shapes"))
    ann = write_shapes_dataset(root, 4, height=SIZE, width=SIZE, seed=0, size_range=(0.3, 0.7), objects=(1, 3))
    with open(ann) as f:
        data = json.load(f)
    new_id = {c["id"]: i for c, i in zip(data["categories"], OUR_IDS)}
    data["categories"] = [{"id": i, "name": n} for i, n in zip(OUR_IDS, OURS)]
    for a in data["annotations"]:
        a["category_id"] = new_id[a["category_id"]]
    with open(ann, "w") as f:
        json.dump(data, f)
    return ann, shapes_image_dir(root)


def logged_losses(log):
    return [float(x) for x in re.findall(r" loss (\d+\.\d+) grad_norm", log)]


def test_cli_finetune_converges_and_predict_writes_category_ids(coco_ckpt, shapes, tmp_path, capsys):
    path, _ = coco_ckpt
    ann, images = shapes
    out = tmp_path / "run"
    rc = main(["train", "--init", path, "--train-ann", ann, "--train-images", images, "--out", str(out),
               "--max-iters", "30", "--save-every", "10", "--batch-size", "2", "--log-every", "1",
               "--min-size", str(SIZE), "--max-size", str(SIZE), "--num-grids", "6", "5", "4", "3", "2",
               "--flip-prob", "0", "--num-workers", "0"])
    assert rc == 0, capsys.readouterr().err
    log = (out / "train.log").read_text()
    lines = log.splitlines()
    assert "recipe: published, because the model starts from pretrained weights" in lines[0]
    assert "weights: " in lines[1] and "row 9" in lines[1] and "'widget'" in lines[1]
    assert [int(m) for m in re.findall(r"iter (\d+): saved", log)] == [10, 20, 30]
    losses = logged_losses(log)
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    # Converges: the last five iterations' loss well under the first five's.
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5]), losses
    model = solo_fast.SOLO.from_pretrained(str(out / "model.safetensors"))
    assert model.category_ids == OUR_IDS and model.class_names == OURS
    assert json.loads((out / "config.json").read_text())["category_ids"] == OUR_IDS

    # Every class scores well above the prior, so that detections of all three come out.
    with torch.no_grad():
        model.mask_head.conv_cls.bias.fill_(2.0)
    ckpt = model.save_pretrained(str(tmp_path / "confident"))
    image = os.path.join(images, sorted(os.listdir(images))[0])
    rc = main(["predict", image, "--checkpoint", ckpt, "--out", str(tmp_path / "preds"), "--score-thr", "0"])
    assert rc == 0, capsys.readouterr().err
    written = json.loads((tmp_path / "preds" / "results.json").read_text())
    ids = [d["category_id"] for d in written]
    assert ids and set(ids) <= set(OUR_IDS) and set(ids) & {7, 90}  # never the 0-based labels
    expected = solo_fast.SOLO.from_pretrained(ckpt).predict(image, score_thr=0.0)[0]
    assert ids == [OUR_IDS[int(label)] for label in expected.labels]
    assert [d["category_id"] for d in expected.to_coco(0)] == ids  # to_coco's default: the model's ids


def test_to_coco_uses_the_results_category_ids():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4], masks[1, 4:] = True, True
    fields = (masks, torch.tensor([0.9, 0.5]), torch.tensor([2, 0]), solo_fast.results.masks_to_boxes(masks))
    r = solo_fast.SOLOResult(*fields, category_ids=OUR_IDS)
    assert [d["category_id"] for d in r.to_coco(3)] == [90, 1]
    assert [d["category_id"] for d in r.to_coco(3, category_ids=[5, 6, 7])] == [7, 5]  # an explicit map wins
    assert [d["category_id"] for d in solo_fast.SOLOResult(*fields).to_coco(3)] == [2, 0]  # none: the label
    with pytest.raises(ValueError, match="category_ids"):
        solo_fast.SOLOResult(*fields, category_ids="ab")


# ---------------------------------------------------------------- schedules by iterations
def test_warmup_step_schedule_by_iteration():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupStepSchedule(opt, 0.3, warmup_iters=0, milestones=[3, 5], gamma=0.1, by_iteration=True)
    assert s.lr_at(2, 7) == pytest.approx(0.3)  # the epoch does not count
    assert s.lr_at(3, 0) == pytest.approx(0.03)  # the milestone iteration itself runs at the lower lr
    assert s.lr_at(5, 0) == pytest.approx(0.003)


def test_iteration_schedule_save_every_and_mid_epoch_resume(shapes, tmp_path):
    ann, images = shapes
    data = CocoDataset(ann, images)
    kw = dict(batch_size=3, lr=1e-3, warmup_iters=0, milestones=(2,), log_every=1, seed=0)  # 2 iterations/epoch
    straight = train(fresh_model(), data, out_dir=str(tmp_path / "straight"), max_iters=5, save_every=2, **kw)
    log = (tmp_path / "straight" / "train.log").read_text()
    assert [int(m) for m in re.findall(r"iter (\d+): saved", log)] == [2, 4, 5]
    lrs = [float(x) for x in re.findall(r"iter \d+/5 \(epoch \d, \d/2\) lr (\S+)", log)]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-4])  # milestone 2: from the third iteration
    state = torch.load(tmp_path / "straight" / "last_state.pt", weights_only=True)
    assert (state["iteration"], state["epoch"], state["epoch_step"]) == (5, 2, 1)

    # Stopped after 3 iterations (mid-epoch), then resumed to 5: the same weights as straight.
    part = tmp_path / "part"
    train(fresh_model(), data, out_dir=str(part), max_iters=3, **kw)
    state = torch.load(part / "last_state.pt", weights_only=True)
    assert (state["iteration"], state["epoch"], state["epoch_step"]) == (3, 1, 1)
    resumed = train(fresh_model(), data, out_dir=str(part), max_iters=5, resume=True, **kw)
    assert "resumed from" in (part / "train.log").read_text()
    for (k, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_save_every_epochs(shapes, tmp_path):
    ann, images = shapes
    train(fresh_model(), CocoDataset(ann, images), out_dir=str(tmp_path), epochs=3, save_every=2, batch_size=4,
          lr=1e-3, warmup_iters=0, seed=0)
    log = (tmp_path / "train.log").read_text()
    assert re.search(r"epoch 1 done in [\d.]+s$", log, re.MULTILINE)  # not saved
    assert re.search(r"epoch 2 done in [\d.]+s; saved", log) and re.search(r"epoch 3 done in [\d.]+s; saved", log)


def test_schedule_bad_input(shapes, tmp_path, capsys):
    ann, images = shapes
    data = CocoDataset(ann, images)
    for kw, name in ((dict(epochs=2, max_iters=3), "max_iters"), (dict(max_iters=0), "max_iters"),
                     (dict(max_iters=2, save_every=0), "save_every")):
        with pytest.raises(ValueError, match=name):
            train(fresh_model(), data, out_dir=str(tmp_path / "x"), **kw)
    common = ["train", "--train-ann", ann, "--train-images", images, "--out", str(tmp_path / "o")]
    for extra, needle in ((["--epochs", "2", "--max-iters", "3"], "--max-iters"),
                          (["--init", ann, "--backbone-weights", ann], "--backbone-weights"),
                          (["--init", str(tmp_path / "none.pth")], "none.pth"),
                          (["--frozen-stages", "1", "--max-iters", "1"], "frozen_stages")):
        assert main(common + extra) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
