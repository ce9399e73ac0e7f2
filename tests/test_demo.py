"""The demo's pipeline end to end at smoke size (its full run, AP >= 0.5 in about 10 minutes
on 2 cores, is measured by hand and recorded in the README/notes, not in CI)."""
import json
import os

import pytest
from PIL import Image

import solo_fast
from solo_fast.cli import main
from solo_fast.demo import QUICK


pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_quick_writes_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["stats"]) >= {"AP", "AP50", "AP75"}
    assert f"mask AP {summary['stats']['AP']:.3f}" in printed
    # The COCOeval table and where the picture and the checkpoint are.
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in printed
    assert summary["picture"] in printed and summary["checkpoint"] in printed
    sheet = Image.open(summary["picture"])
    n = min(8, QUICK.num_val)
    assert sheet.size == (n * QUICK.image_size * 2, 2 * QUICK.image_size * 2)  # n tiles x (truth, prediction)
    model = solo_fast.SOLO.from_pretrained(summary["checkpoint"])
    assert model.class_names == ["circle", "rectangle", "triangle"]
    assert model.cfg["frozen_stages"] == -1 and model.cfg["norm_eval"] is False
    predictions = json.loads((out / "val_predictions.json").read_text())
    assert isinstance(predictions, list)

    # A second run reuses the data it wrote (same recipe) and trains again.
    stamp = os.path.getmtime(out / "data" / "annotations" / "instances_train.json")
    assert main(["demo", "--quick", "--out", str(out), "--epochs", "1"]) == 0
    assert os.path.getmtime(out / "data" / "annotations" / "instances_train.json") == stamp


def test_demo_bad_epochs(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
