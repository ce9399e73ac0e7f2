"""Small fixes at the edges: numpy/tensor ints for ``evaluate``, the evaluation's cleaned
ground truth cached per dataset, CLI errors that blame only flags the user typed, a
checkpoint folder for ``--checkpoint``, ``--min-size`` named as itself, ``--batch-size 0``."""
import importlib
import json
import os
import warnings

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL_KW, TinyShapes, ground_truth_predict, tiny_coco_dict, tiny_model, tiny_scenes
from PIL import Image

import solo_fast
from solo_fast.cli import main

evaluate_module = importlib.import_module("solo_fast.engine.evaluate")  # the package exports the function


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def shapes():
    """A 2-image stand-in dataset and a tiny model that answers with its ground truth."""
    data = TinyShapes(2)
    model = tiny_model()
    model.predict = ground_truth_predict(data)
    return model, data


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A COCO json and its image folder (one tiny image, 3 categories) and an image file."""
    root = tmp_path_factory.mktemp("split")
    (root / "images").mkdir()
    items = tiny_scenes(1)
    Image.fromarray(items[0][0]).save(root / "images" / "000.png")
    (root / "ann.json").write_text(json.dumps(tiny_coco_dict(items)))
    return str(root / "ann.json"), str(root / "images"), str(root / "images" / "000.png")


@pytest.fixture(scope="module")
def folder_ckpt(tmp_path_factory):
    """A folder written by save_pretrained (model.safetensors inside), 3 classes as `split`."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, **TINY_MODEL_KW).save_pretrained(str(folder))
    assert os.path.isdir(folder)
    return str(folder)


# ---------------------------------------------------------------- 1. numpy / tensor ints
@pytest.mark.parametrize("batch_size,num_workers", [(np.int64(2), np.int32(0)), (torch.tensor(1), torch.tensor(0)),
                                                    (np.uint8(3), 0)])
def test_evaluate_takes_numpy_and_tensor_ints(shapes, batch_size, num_workers):
    model, data = shapes
    stats = evaluate_module.evaluate(model, data, batch_size=batch_size, num_workers=num_workers, verbose=False,
                                     progress=False)
    assert stats["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("key,value", [("batch_size", True), ("batch_size", np.bool_(True)),
                                       ("batch_size", torch.tensor(True)), ("batch_size", 2.0),
                                       ("batch_size", torch.tensor([2])), ("batch_size", np.int64(0)),
                                       ("num_workers", False), ("num_workers", np.int64(-1))])
def test_evaluate_still_refuses_bools_floats_and_bad_ints(shapes, key, value):
    model, data = shapes
    with pytest.raises(ValueError, match=f"^{key}: expected"):
        evaluate_module.evaluate(model, data, **{key: value}, verbose=False, progress=False)


# ---------------------------------------------------------------- 2. ground truth cleaned once
def test_evaluate_cleans_a_datasets_ground_truth_once(shapes, monkeypatch):
    from pycocotools.coco import COCO

    model, _ = shapes
    data = TinyShapes(2)
    # An annotation pycocotools cannot read (2 points): left out, with a warning, at every call.
    bad = dict(data.coco.dataset["annotations"][0], id=999, segmentation=[[1, 1, 5, 5]])
    data.coco.dataset["annotations"].append(bad)
    data.coco.createIndex()
    model.predict = ground_truth_predict(data)
    calls = []
    clean = evaluate_module.evaluable_ground_truth

    def counted(coco):
        calls.append(coco)
        return clean(coco)

    monkeypatch.setattr(evaluate_module, "evaluable_ground_truth", counted)
    stats = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats.append(evaluate_module.evaluate(model, data, verbose=False, progress=False))
        assert any("1 annotation(s)" in str(w.message) for w in caught)
    assert len(calls) == 1 and stats[0] == stats[1] and stats[0]["AP"] == pytest.approx(1.0)
    # Another annotation source: cleaned again, and that one is evaluated.
    other = COCO()
    other.dataset = {**data.coco.dataset, "annotations": data.coco.dataset["annotations"][:1]}
    other.createIndex()
    data.coco = other
    assert evaluate_module.evaluate(model, data, verbose=False, progress=False)["AP"] < 1.0
    assert len(calls) == 2 and calls[-1] is other
    evaluate_module.evaluate(model, data, verbose=False, progress=False)
    assert len(calls) == 2


# ---------------------------------------------------------------- 3. only typed flags are named
def test_cli_names_a_flag_only_when_the_user_typed_it(tmp_path, capsys, monkeypatch):
    import solo_fast.cli as cli

    def refuse(args):
        raise ValueError("score_thr: expected a number in [0, 1], got 5.0")

    monkeypatch.setattr(cli, "cmd_predict", refuse)
    base = ["predict", tmp_path / "a.png"]
    rc, _, err = run(base, capsys)  # the value came from elsewhere: the library's name stays
    assert rc == 2 and "error: score_thr: expected" in err and "--score-thr" not in err, err
    for typed in (["--score-thr", "0.5"], ["--score-thr=0.5"], ["--score", "0.5"]):  # argparse's spellings
        rc, _, err = run(base + typed, capsys)
        assert rc == 2 and "error: --score-thr: expected" in err, (typed, err)


def test_a_bad_setting_saved_in_a_checkpoint_is_not_blamed_on_a_flag(tmp_path, capsys, folder_ckpt, split):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = os.path.join(folder_ckpt, "model.safetensors")
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["solo_fast_config"])
    config["score_thr"] = 5.0
    meta["solo_fast_config"] = json.dumps(config)
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(src), str(bad), metadata=meta)
    predict = ["predict", split[2], "--checkpoint", bad, "--out", tmp_path / "p"]
    for argv in (predict, predict + ["--score-thr", "0.5"]):
        rc, _, err = run(argv, capsys)
        assert rc == 2 and "error: --checkpoint: " in err and "bad.safetensors" in err, err
        assert "score_thr: expected" in err and "--score-thr:" not in err and "Traceback" not in err, err


# ---------------------------------------------------------------- 4. a checkpoint folder
def test_predict_takes_a_checkpoint_folder(tmp_path, capsys, split):
    torch.manual_seed(0)
    folder = tmp_path / "model"
    solo_fast.SOLO("solov2_light_r18_fpn", num_classes=2, min_size=64, max_size=96).save_pretrained(str(folder))
    assert folder.is_dir()
    out = tmp_path / "p"
    rc, _, err = run(["predict", split[2], "--checkpoint", folder, "--out", out], capsys)
    assert rc == 0, err
    assert isinstance(json.loads((out / "results.json").read_text()), list) and (out / "000.png.png").is_file()


def test_eval_takes_a_checkpoint_folder(tmp_path, capsys, folder_ckpt, split):
    ann, images, _ = split
    rc, out, err = run(["eval", "--checkpoint", folder_ckpt, "--ann", ann, "--images", images, "--num-workers", 0],
                       capsys)
    assert rc == 0 and "mask (segm) AP" in out, err


def test_a_missing_checkpoint_or_an_empty_folder_names_the_flag(tmp_path, capsys, split):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "missing.safetensors", tmp_path / "empty"):
        for argv in (["predict", split[2], "--checkpoint", path, "--out", tmp_path / "p"],
                     ["eval", "--checkpoint", path, "--ann", split[0], "--images", split[1]],
                     ["export", "--checkpoint", path, "--height", 64, "--width", 64, "--format", "torch",
                      "--out", tmp_path / "x"]):
            rc, _, err = run(argv, capsys)
            assert rc == 2 and f"error: --checkpoint: no checkpoint at {str(path)!r}" in err, (argv, err)
            assert "Traceback" not in err


# ---------------------------------------------------------------- 5. --min-size named as itself
def test_a_bad_min_size_is_named_as_itself(tmp_path, capsys):
    with pytest.raises(ValueError, match="^min_size: expected a positive int, got 0"):
        solo_fast.modeling.configs.get_config("solov2_light_r18_fpn", min_size=0)
    with pytest.raises(ValueError, match="^train_min_size: "):  # a bad training scale is still its own
        solo_fast.modeling.configs.get_config("solov2_light_r18_fpn", min_size=64, train_min_size=(0,))
    ann = tmp_path / "ann.json"
    ann.write_text("{}")
    (tmp_path / "images").mkdir()
    train = ["train", "--train-ann", ann, "--train-images", tmp_path / "images", "--out", tmp_path / "t"]
    rc, _, err = run(train + ["--min-size", 0], capsys)
    assert rc == 2 and "error: --min-size: expected a positive int, got 0" in err, err
    rc, _, err = run(train + ["--min-size", 64, "--train-min-size", 64, 0], capsys)
    assert rc == 2 and "error: --train-min-size: " in err, err


# ---------------------------------------------------------------- --batch-size 0
def test_batch_size_zero_names_the_flag(capsys, folder_ckpt, split):
    ann, images, _ = split
    ckpt = os.path.join(folder_ckpt, "model.safetensors")  # a file: this was right before the folder fix too
    rc, _, err = run(["eval", "--checkpoint", ckpt, "--ann", ann, "--images", images, "--num-workers", 0,
                      "--batch-size", 0], capsys)
    assert rc == 2 and "error: --batch-size: expected a positive int, got 0" in err and "Traceback" not in err, err
