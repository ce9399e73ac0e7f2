"""Engine: training loop (checkpoints, log, resume), COCO evaluation, torchrun/DDP on the CPU, CLI.

Everything runs on tiny 64x64 scenes with ``solov2_light_r18_fpn`` and small grids, one
intra-op thread each, so the file stays around a minute on a loaded 2-core machine.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import solo_fast
from solo_fast.data.synthetic import SHAPES
from solo_fast.engine import STAT_NAMES, WarmupStepSchedule, evaluate, train

from helpers import (
    TINY_CAT_IDS, TINY_MODEL_KW, TINY_SIZE, TINY_TRAIN_KW, TinyShapes, ground_truth_predict, tiny_coco_dict,
    tiny_model, tiny_scenes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- schedule
def test_warmup_step_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupStepSchedule(opt, 0.3, warmup_iters=4, milestones=[2, 3], gamma=0.1)
    assert s.step(0, 0) == pytest.approx(0.1)  # warm-up starts at lr / 3
    assert s.lr_at(2, 0) == pytest.approx(0.2)
    assert s.lr_at(4, 0) == pytest.approx(0.3)
    assert s.lr_at(10, 1) == pytest.approx(0.3)
    assert s.lr_at(10, 2) == pytest.approx(0.03)  # the milestone epoch itself runs at the lower lr
    assert s.lr_at(10, 5) == pytest.approx(0.003)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    low = WarmupStepSchedule(opt, 0.3, warmup_iters=4, milestones=[], gamma=0.1, warmup_ratio=0.01)
    assert low.lr_at(0, 0) == pytest.approx(0.003) and low.lr_at(2, 0) == pytest.approx(0.1515)


# ---------------------------------------------------------------- training
def test_train_checkpoint_log_and_resume(tmp_path):
    data = TinyShapes(4)
    out = tmp_path / "run"
    model = train(tiny_model(), data, out_dir=str(out), epochs=1, **TINY_TRAIN_KW)
    assert model.class_names == list(SHAPES)
    ckpt = out / "model.safetensors"
    assert ckpt.is_file() and (out / "config.json").is_file()
    log = (out / "train.log").read_text()
    assert "epoch 1/1 iter 2/2" in log and "loss_mask" in log and "lr" in log
    state = torch.load(out / "last_state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["iteration"] == 2 and state["optimizer"]["state"]
    loaded = solo_fast.SOLO.from_pretrained(str(ckpt))
    assert loaded.class_names == list(SHAPES)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.cpu()), k

    # Resume continues after the saved epoch, to the same weights as one uninterrupted run.
    resumed = train(tiny_model(), data, out_dir=str(out), epochs=2, resume=True, **TINY_TRAIN_KW)
    state = torch.load(out / "last_state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["iteration"] == 4
    log = (out / "train.log").read_text()
    assert "resumed from" in log and "epoch 2/2 iter 2/2" in log and "epoch 1/2" not in log
    straight = train(tiny_model(), data, out_dir=str(tmp_path / "straight"), epochs=2, **TINY_TRAIN_KW)
    for (k, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_train_adamw_and_its_resume(tmp_path):
    data = TinyShapes(2)
    out = tmp_path / "adamw"
    train(tiny_model(), data, out_dir=str(out), epochs=1, optimizer="adamw", warmup_ratio=0.1,
          **{**TINY_TRAIN_KW, "lr": 1e-4})
    state = torch.load(out / "last_state.pt", weights_only=True)
    assert state["optimizer_name"] == "adamw"
    assert any("exp_avg" in s for s in state["optimizer"]["state"].values())  # AdamW's moments, not SGD's buffer
    logged = json.loads((out / "config.json").read_text())["train"]
    assert logged["optimizer"] == "adamw" and logged["warmup_ratio"] == 0.1
    assert "lr 1.000e-05" in (out / "train.log").read_text()  # iteration 1 at lr x warmup_ratio
    with pytest.raises(ValueError, match="optimizer.*adamw"):
        train(tiny_model(), data, out_dir=str(out), epochs=2, resume=True, optimizer="sgd", **TINY_TRAIN_KW)
    with pytest.raises(ValueError, match="optimizer"):
        train(tiny_model(), data, out_dir=str(tmp_path / "b"), epochs=1, optimizer="adam")
    with pytest.raises(ValueError, match="warmup_ratio"):
        train(tiny_model(), data, out_dir=str(tmp_path / "b"), epochs=1, warmup_ratio=0.0)


def test_train_bad_input(tmp_path):
    data = TinyShapes(2)
    with pytest.raises(ValueError, match="epochs"):
        train(tiny_model(), data, out_dir=str(tmp_path), epochs=0)
    with pytest.raises(ValueError, match="lr"):
        train(tiny_model(), data, out_dir=str(tmp_path), epochs=1, lr=-1.0)
    with pytest.raises(ValueError, match="milestones"):
        train(tiny_model(), data, out_dir=str(tmp_path), epochs=1, milestones=[1.5])
    with pytest.raises(ValueError, match="categories"):
        train(solo_fast.SOLO("solov2_light_r18_fpn", num_classes=5, **TINY_MODEL_KW), data, out_dir=str(tmp_path),
              epochs=1)
    with pytest.raises(FileNotFoundError, match="resume"):
        train(tiny_model(), data, out_dir=str(tmp_path / "none"), epochs=1, resume=True)
    # A state written for another architecture is refused with a message, not a load_state_dict traceback.
    train(tiny_model(), data, out_dir=str(tmp_path / "a"), epochs=1, **TINY_TRAIN_KW)
    with pytest.raises(ValueError, match="num_grids"):
        train(tiny_model(num_grids=(5, 5, 4, 3, 2)), data, out_dir=str(tmp_path / "a"), epochs=2, resume=True)
    with pytest.raises(ValueError, match="solov2_light_r34_fpn"):
        train(solo_fast.SOLO("solov2_light_r34_fpn", num_classes=3, **TINY_MODEL_KW), data, out_dir=str(tmp_path / "a"),
              epochs=2, resume=True)


# ---------------------------------------------------------------- evaluation
def test_evaluate_stats_and_json(tmp_path):
    data = TinyShapes(3)
    out_json = tmp_path / "results.json"
    stats = evaluate(tiny_model(), data, batch_size=2, out_json=str(out_json), score_thr=0.0, filter_thr=0.0,
                     max_per_img=5)
    assert list(stats) == list(STAT_NAMES) and all(isinstance(v, float) for v in stats.values())
    results = json.loads(out_json.read_text())
    assert isinstance(results, list) and results, "a random model with score_thr 0 predicts something"
    assert {r["category_id"] for r in results} <= set(TINY_CAT_IDS)
    assert {r["image_id"] for r in results} <= {1, 2, 3}


def test_evaluate_ground_truth_gives_ap_1(monkeypatch, capsys):
    data = TinyShapes(4)
    model = tiny_model()
    monkeypatch.setattr(model, "predict", ground_truth_predict(data))
    stats = evaluate(model, data, batch_size=3)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert stats["AR100"] == pytest.approx(1.0)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in capsys.readouterr().out


def test_evaluate_no_predictions(monkeypatch):
    data = TinyShapes(2)
    model = tiny_model()
    empty = solo_fast.SOLOResult(torch.zeros(0, TINY_SIZE, TINY_SIZE, dtype=torch.bool), torch.zeros(0),
                                 torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    monkeypatch.setattr(model, "predict", lambda images, **kw: [empty] * len(images))
    stats = evaluate(model, data, batch_size=2, verbose=False)
    assert stats["AP"] == 0.0 and stats["AR100"] == 0.0


def test_evaluate_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(tiny_model(), TinyShapes(1), batch_size=0)
    with pytest.raises(ValueError, match="categories"):
        evaluate(solo_fast.SOLO("solov2_light_r18_fpn", num_classes=2, **TINY_MODEL_KW), TinyShapes(1))
    with pytest.raises(ValueError, match="COCO dataset"):
        evaluate(tiny_model(), [(torch.rand(3, 8, 8), {})])


# ---------------------------------------------------------------- torchrun
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import solo_fast
import helpers as T
from solo_fast.engine import train

data, val = T.TinyShapes(4), T.TinyShapes(4, seed=50)
# Evaluation sees the ground truth as predictions: AP 1.0 only if every rank's share is gathered.
solo_fast.SOLO.predict = lambda self, images, **kw: T.ground_truth_predict(val)(images)
model = train(T.tiny_model(), data, out_dir=sys.argv[1], epochs=1, val_dataset=val, **T.TINY_TRAIN_KW)
import torch.distributed as dist
assert not dist.is_initialized(), "train() destroys the group it created"
# A marker file per rank: the two ranks' stdout lines interleave on the shared pipe.
open(os.path.join(sys.argv[1], "done_rank" + os.environ["RANK"]), "w").close()
"""


def test_torchrun_two_processes_cpu(tmp_path):
    script = tmp_path / "run_ddp.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "done_rank0").is_file() and (out / "done_rank1").is_file()
    assert (out / "model.safetensors").is_file()
    state = torch.load(out / "last_state.pt", weights_only=True)
    # 4 images over 2 ranks at batch 2: one iteration per epoch on each rank
    assert state["epoch"] == 1 and state["iteration"] == 1 and state["world_size"] == 2
    log = (out / "train.log").read_text()
    assert "2 process(es)" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics[-1]["AP"] == pytest.approx(1.0)
    solo_fast.SOLO.from_pretrained(str(out / "model.safetensors"))


# ---------------------------------------------------------------- CLI
def write_split(root, n, seed, split):
    """PNG images in root/split/ and a COCO json; the data layer's generator when it is there."""
    from PIL import Image

    os.makedirs(os.path.join(root, split), exist_ok=True)
    items = tiny_scenes(n, seed)
    names = [f"{i:03d}.png" for i in range(n)]
    for (img, _, _), name in zip(items, names):
        Image.fromarray(img).save(os.path.join(root, split, name))
    ann = os.path.join(root, f"{split}.json")
    with open(ann, "w") as f:
        json.dump(tiny_coco_dict(items, names), f)
    return ann, os.path.join(root, split)


def run_cli(args, capsys):
    from solo_fast.cli import main

    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


needs_coco_dataset = pytest.mark.skipif(not hasattr(__import__("solo_fast.data").data, "CocoDataset"),
                                        reason="solo_fast.data.CocoDataset has not landed yet")


@needs_coco_dataset
def test_cli_train_and_eval(tmp_path, capsys):
    train_ann, train_dir = write_split(str(tmp_path), 4, 0, "train")
    val_ann, val_dir = write_split(str(tmp_path), 2, 100, "val")
    out = tmp_path / "run"
    common = ["--config", "solov2_light_r18_fpn", "--train-ann", train_ann, "--train-images", train_dir,
              "--out", out, "--batch-size", 2, "--lr", 0.002, "--warmup-iters", 2, "--min-size", TINY_SIZE,
              "--max-size", TINY_SIZE, "--num-grids", 6, 5, 4, 3, 2, "--log-every", 1, "--num-workers", 0]
    scratch = ["--frozen-stages", -1, "--live-bn"]
    rc, _, err = run_cli(["train", *common, "--epochs", 1, *scratch], capsys)
    assert rc == 0, err
    assert (out / "model.safetensors").is_file() and (out / "train.log").is_file()
    saved = solo_fast.SOLO.from_pretrained(str(out / "model.safetensors")).cfg
    assert saved["frozen_stages"] == -1 and saved["norm_eval"] is False
    # Resuming with other frozen stages: the optimizer state would not fit; said clearly.
    rc, _, err = run_cli(["train", *common, "--epochs", 2, "--resume", "--frozen-stages", 1], capsys)
    assert rc == 2 and "frozen_stages" in err and "Traceback" not in err, err
    rc, _, err = run_cli(["train", *common, "--epochs", 2, "--resume", *scratch, "--val-ann", val_ann,
                          "--val-images", val_dir], capsys)
    assert rc == 0, err
    assert torch.load(out / "last_state.pt", weights_only=True)["epoch"] == 2
    assert json.loads((out / "metrics.json").read_text())[-1]["epoch"] == 2

    res = tmp_path / "res.json"
    rc, stdout, err = run_cli(["eval", "--checkpoint", out / "model.safetensors", "--ann", val_ann, "--images", val_dir,
                               "--out-json", res, "--score-thr", 0.0, "--num-workers", 0], capsys)
    assert rc == 0, err
    assert "Average Precision" in stdout and "AP " in stdout
    assert isinstance(json.loads(res.read_text()), list)

    # A checkpoint for another number of classes: a message and exit 2, no traceback.
    other = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=5, **TINY_MODEL_KW).save_pretrained(str(tmp_path / "c5"))
    rc, _, err = run_cli(["eval", "--checkpoint", other, "--ann", val_ann, "--images", val_dir], capsys)
    assert rc == 2 and "5 classes" in err and "Traceback" not in err
    # Resuming with another config than the state's.
    rc, _, err = run_cli(["train", *common, "--epochs", 3, "--resume", *scratch, "--config", "solov2_light_r34_fpn"],
                         capsys)
    assert rc == 2 and "solov2_light_r18_fpn" in err and "Traceback" not in err


def test_cli_bad_input(tmp_path, capsys):
    ann, img_dir = write_split(str(tmp_path), 1, 0, "train")
    cases = [
        (["train", "--train-ann", tmp_path / "missing.json", "--train-images", img_dir, "--out", tmp_path / "o"],
         "missing.json"),
        (["train", "--train-ann", ann, "--train-images", tmp_path / "nodir", "--out", tmp_path / "o"], "nodir"),
        (["train", "--train-ann", ann, "--train-images", img_dir, "--val-ann", ann, "--out", tmp_path / "o"],
         "--val-images"),
        (["train", "--train-ann", ann, "--train-images", img_dir, "--out", tmp_path / "o", "--config", "nope"],
         "nope"),
        (["train", "--train-ann", ann, "--train-images", img_dir, "--out", tmp_path / "fresh", "--resume"],
         "last_state.pt"),
        (["eval", "--checkpoint", tmp_path / "none.safetensors", "--ann", ann, "--images", img_dir],
         "none.safetensors"),
        (["eval", "--checkpoint", ann, "--ann", ann, "--images", img_dir], "checkpoint"),
    ]
    for args, needle in cases:
        rc, _, err = run_cli(args, capsys)
        assert rc == 2, (args, err)
        assert needle in err and "Traceback" not in err, (args, err)


@needs_coco_dataset
def test_cli_corrupt_image_in_a_worker(tmp_path, capsys):
    # The dataset's error surfaces from a DataLoader worker: still one line, no worker traceback.
    ann, img_dir = write_split(str(tmp_path), 2, 0, "train")
    with open(os.path.join(img_dir, "001.png"), "wb") as f:
        f.write(b"not a png")
    rc, _, err = run_cli(["train", "--train-ann", ann, "--train-images", img_dir, "--out", tmp_path / "o",
                          "--epochs", 1, "--batch-size", 2, "--num-workers", 1, "--min-size", TINY_SIZE,
                          "--max-size", TINY_SIZE, "--num-grids", 6, 5, 4, 3, 2], capsys)
    assert rc == 2 and "001.png" in err and "Traceback" not in err, err


@pytest.mark.cuda
def test_train_cuda_autocast(tmp_path):
    data = TinyShapes(2)
    model = train(tiny_model(), data, out_dir=str(tmp_path), epochs=1, device="cuda", **TINY_TRAIN_KW)
    assert model.device.type == "cuda"
    log = (tmp_path / "train.log").read_text()
    assert "autocast" in log and " loss nan" not in log
    assert torch.load(tmp_path / "last_state.pt", weights_only=True)["iteration"] == 1
