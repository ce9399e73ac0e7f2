"""What users meet at the edges of the command line (issue 14): a real folder of images
with a bad file and clashing names, output locations that cannot be written, COCO files
with degenerate polygons, and error messages that name the flag the user typed."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL_KW, TINY_SIZE, tiny_coco_dict, tiny_scenes
from PIL import Image

import solo_fast
from solo_fast._outputs import output_dir, output_file
from solo_fast.cli import main


def run(args, capsys):
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def confident_checkpoint(path, num_classes=3):
    """A tiny model whose class scores all sit well above the thresholds, so it detects."""
    torch.manual_seed(0)
    model = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=num_classes, **TINY_MODEL_KW)
    with torch.no_grad():
        model.mask_head.conv_cls.bias.fill_(2.0)
    return model.save_pretrained(str(path))


def write_split(root, n=2, seed=0, extra_anns=()):
    """PNG images in root/images and root/ann.json (tiny shapes), plus ``extra_anns``."""
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    items = tiny_scenes(n, seed)
    names = [f"{i:03d}.png" for i in range(n)]
    for (img, _, _), name in zip(items, names):
        Image.fromarray(img).save(os.path.join(img_dir, name))
    data = tiny_coco_dict(items, names)
    data["annotations"] += list(extra_anns)
    ann = os.path.join(root, "ann.json")
    with open(ann, "w") as f:
        json.dump(data, f)
    return ann, img_dir


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return confident_checkpoint(tmp_path_factory.mktemp("ckpt"))


# ---------------------------------------------------------------- 1. predict on a real folder
def test_predict_skips_an_unreadable_file_and_keeps_names_apart(tmp_path, capsys, ckpt):
    rgb = (np.random.RandomState(0).rand(40, 60, 3) * 255).astype(np.uint8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("a/x.jpg", "a/x.png", "b/x.jpg"):
        Image.fromarray(rgb).save(tmp_path / name)
    jpeg = (tmp_path / "a/x.jpg").read_bytes()
    (tmp_path / "a/bad.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # a truncated JPEG (sorted first in a/)
    out = tmp_path / "out"
    rc, _, err = run(["predict", tmp_path / "a", tmp_path / "b", "--checkpoint", ckpt, "--out", out,
                      "--score-thr", 0], capsys)
    # The bad file is named (its path, not images[0]), the others are done, the run fails at the end.
    assert rc == 1, err
    assert str(tmp_path / "a/bad.jpg") in err and "images[0]" not in err and "1 of 4" in err, err
    assert "Traceback" not in err
    overlays = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert overlays == ["a/x.jpg.png", "a/x.png.png", "b/x.jpg.png"]
    results = json.loads((out / "results.json").read_text())
    ids = {}
    for d in results:
        ids.setdefault(d["file_name"], set()).add(d["image_id"])
    assert set(ids) == {"a/x.jpg", "a/x.png", "b/x.jpg"}
    assert all(len(v) == 1 for v in ids.values()) and len({min(v) for v in ids.values()}) == 3  # one id per file


def test_predict_one_folder_keeps_bare_names(tmp_path, capsys, ckpt):
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "0.png")
    out = tmp_path / "out"
    rc, _, err = run(["predict", tmp_path, tmp_path / "0.png", "--checkpoint", ckpt, "--out", out], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["0.png.png", "results.json"]  # given twice, predicted once


# ---------------------------------------------------------------- 2. output locations
def test_output_checks(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert output_dir(tmp_path / "new" / "deep", "--out") == str(tmp_path / "new" / "deep")
    assert (tmp_path / "new" / "deep").is_dir() and not list((tmp_path / "new" / "deep").iterdir())
    with pytest.raises(ValueError, match="--out: .*file' is an existing file"):
        output_dir(a_file, "--out")
    with pytest.raises(ValueError, match="--out: cannot create the folder .*file/sub"):
        output_dir(a_file / "sub", "--out")
    with pytest.raises(ValueError, match="out_json: .* is an existing folder"):
        output_file(tmp_path, "out_json")
    with pytest.raises(ValueError, match="out_json: cannot write .*file/r.json': .*file' is an existing file"):
        output_file(a_file / "r.json", "out_json")
    assert output_file(tmp_path / "sub" / "r.json", "p") == str(tmp_path / "sub" / "r.json")
    assert (tmp_path / "sub").is_dir() and not (tmp_path / "sub" / "r.json").exists()
    with pytest.raises(ValueError, match="x: expected a path"):
        output_dir("", "x")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="no /proc")
def test_output_on_a_read_only_filesystem():
    # No file can be created in /proc, root or not.
    with pytest.raises(ValueError, match="--out: cannot write into the folder '/proc'"):
        output_dir("/proc", "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the permission bits say")
def test_output_without_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "old.json").write_text("[]")
    (locked / "old.json").chmod(0o444)
    locked.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="--out: cannot write into the folder"):
            output_dir(locked, "--out")
        with pytest.raises(ValueError, match="--out: cannot create the folder"):
            output_dir(locked / "sub", "--out")
        with pytest.raises(ValueError, match="--out-json: cannot write .*old.json': permission denied"):
            output_file(locked / "old.json", "--out-json")
    finally:
        locked.chmod(0o755)


def test_cli_refuses_bad_outputs_before_the_work(tmp_path, capsys, ckpt, monkeypatch):
    ann, img_dir = write_split(str(tmp_path / "data"), n=1)
    # "Before the work": reading the data or building a model would fail these runs first
    # (the library's own output checks, which also name the flag, come after both).
    import solo_fast.data

    def no_work(*a, **k):
        raise AssertionError("the work started before the output location was checked")
    monkeypatch.setattr(solo_fast.data, "CocoDataset", no_work)
    monkeypatch.setattr(solo_fast.SOLO, "from_pretrained", no_work)
    monkeypatch.setattr(solo_fast.SOLO, "__init__", no_work)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        ["train", "--train-ann", ann, "--train-images", img_dir, "--max-iters", 1, "--out"],
        ["predict", img_dir, "--checkpoint", ckpt, "--out"],
        ["export", "--checkpoint", ckpt, "--height", 64, "--width", 64, "--format", "torch", "--out"],
        ["demo", "--quick", "--out"],
    ]
    for args in cases:
        for bad in (a_file, a_file / "sub"):
            rc, _, err = run(args + [bad], capsys)
            assert rc == 2 and "--out: " in err and str(bad) in err and "Traceback" not in err, (args, err)
    assert a_file.read_text() == "x"
    eval_args = ["eval", "--checkpoint", ckpt, "--ann", ann, "--images", img_dir, "--num-workers", 0, "--out-json"]
    for bad in (tmp_path, a_file / "r.json"):
        rc, _, err = run(eval_args + [bad], capsys)
        assert rc == 2 and "--out-json: " in err and str(bad) in err and "Traceback" not in err, err


def test_library_entry_points_check_their_output_path(tmp_path):
    from solo_fast.data import CocoDataset
    from solo_fast.engine import evaluate, train
    from solo_fast.export import export_onnx

    ann, img_dir = write_split(str(tmp_path / "data"), n=1)
    data = CocoDataset(ann, img_dir)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    model = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, **TINY_MODEL_KW)
    with pytest.raises(ValueError, match="out_dir: .*file' is an existing file"):
        train(model, data, out_dir=str(a_file), max_iters=1)
    with pytest.raises(ValueError, match="out_json: .* is an existing folder"):
        evaluate(model, data, out_json=str(tmp_path))
    pytest.importorskip("onnxscript")
    with pytest.raises(ValueError, match="path: .* is an existing folder"):
        export_onnx(model, str(tmp_path), (64, 64))


# ---------------------------------------------------------------- 3. degenerate polygons in evaluation
def degenerate_anns():
    """Annotations of image 1 that CocoDataset skips (or trims) and pycocotools cannot read."""
    base = dict(image_id=1, category_id=3, area=4.0, bbox=[1, 1, 2, 2], iscrowd=0)
    return [dict(base, id=101, segmentation=[[]]),                     # an empty polygon
            dict(base, id=102, segmentation=[[1, 1, 5, 5]]),           # 2 points: pycocotools reads a box
            dict(base, id=103, segmentation=[[1, 1]]),                 # 1 point
            dict(base, id=104, segmentation=[[2, 2, 20, 2, 20, 20], [0, 0, 3, 3]])]  # one good, one short


def test_evaluate_drops_the_annotations_training_skips(tmp_path, ckpt):
    from solo_fast.data import CocoDataset
    from solo_fast.data.coco import evaluable_ground_truth
    from solo_fast.engine import evaluate

    ann, img_dir = write_split(str(tmp_path), n=2, extra_anns=degenerate_anns())
    data = CocoDataset(ann, img_dir)
    clean, dropped, trimmed = evaluable_ground_truth(data.coco)
    assert (dropped, trimmed) == (3, 1)
    assert clean.anns[104]["segmentation"] == [[2, 2, 20, 2, 20, 20]] and 102 not in clean.anns
    assert data.coco.anns[104]["segmentation"][1] == [0, 0, 3, 3]  # the dataset's own index is untouched
    assert evaluable_ground_truth(clean)[0] is clean
    model = solo_fast.SOLO.from_pretrained(ckpt)
    out_json = tmp_path / "preds.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = evaluate(model, data, out_json=str(out_json), verbose=False, progress=False, score_thr=0.0)
    assert set(stats) >= {"AP", "AP50"}
    assert any("3 annotation(s)" in str(w.message) for w in caught)
    assert json.loads(out_json.read_text())  # the predictions


def test_predictions_are_written_before_cocoeval(tmp_path, ckpt, monkeypatch):
    import importlib

    from solo_fast.data import CocoDataset

    evaluate_module = importlib.import_module("solo_fast.engine.evaluate")  # the package exports the function
    ann, img_dir = write_split(str(tmp_path), n=1)

    def broken(*args, **kwargs):
        raise RuntimeError("COCOeval failed")

    monkeypatch.setattr(evaluate_module, "coco_eval", broken)
    out_json = tmp_path / "preds.json"
    with pytest.raises(RuntimeError):
        evaluate_module.evaluate(solo_fast.SOLO.from_pretrained(ckpt), CocoDataset(ann, img_dir),
                                 out_json=str(out_json), verbose=False, progress=False)
    assert isinstance(json.loads(out_json.read_text()), list)


def test_cli_eval_and_validation_with_degenerate_polygons(tmp_path, capsys, ckpt):
    ann, img_dir = write_split(str(tmp_path / "data"), n=2, extra_anns=degenerate_anns())
    rc, out, err = run(["eval", "--checkpoint", ckpt, "--ann", ann, "--images", img_dir, "--num-workers", 0,
                        "--out-json", tmp_path / "preds.json"], capsys)
    assert rc == 0, err
    assert "mask (segm) AP" in out and (tmp_path / "preds.json").is_file()
    run_dir = tmp_path / "run"
    rc, _, err = run(["train", "--train-ann", ann, "--train-images", img_dir, "--val-ann", ann, "--val-images",
                      img_dir, "--out", run_dir, "--max-iters", 1, "--num-workers", 0, "--batch-size", 2,
                      "--min-size", TINY_SIZE, "--max-size", TINY_SIZE, "--num-grids", 6, 5, 4, 3, 2], capsys)
    assert rc == 0, err
    assert json.loads((run_dir / "metrics.json").read_text())[-1]["iteration"] == 1


# ---------------------------------------------------------------- 4. errors name the flag
def test_cli_errors_name_the_flag(tmp_path, capsys, ckpt):
    ann, img_dir = write_split(str(tmp_path / "data"), n=1)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "img.png")
    predict = ["predict", tmp_path / "img.png", "--checkpoint", ckpt, "--out", tmp_path / "p"]
    train = ["train", "--train-ann", ann, "--train-images", img_dir, "--out", tmp_path / "t", "--max-iters", 1,
             "--num-workers", 0, "--min-size", TINY_SIZE, "--max-size", TINY_SIZE, "--num-grids", 6, 5, 4, 3, 2]
    cases = [
        (predict + ["--draw-thr", "nan"], "--draw-thr"),
        (predict + ["--score-thr", 2], "--score-thr"),
        (["eval", "--checkpoint", ckpt, "--ann", ann, "--images", img_dir, "--num-workers", -1], "--num-workers"),
        (["eval", "--checkpoint", ckpt, "--ann", ann, "--images", img_dir, "--score-thr", 2], "--score-thr"),
        (train + ["--lr", -1], "--lr"),
        (train + ["--warmup-ratio", 2], "--warmup-ratio"),
        (train + ["--flip-prob", 2], "--flip-prob"),
        (train + ["--grad-clip", "nan"], "--grad-clip"),  # was: clipping silently off
        (train + ["--num-workers", -1], "--num-workers"),
        (["export", "--checkpoint", ckpt, "--height", 64, "--width", 64, "--format", "torch", "--out",
          tmp_path / "x", "--topk", 0], "--topk"),
    ]
    for args, flag in cases:
        rc, _, err = run(args, capsys)
        assert rc == 2 and f"error: {flag}: " in err and "Traceback" not in err, (args, err)


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_bad_checkpoint_is_named_by_its_flag(tmp_path, capsys, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    for argv in (["predict", str(img), "--checkpoint", str(bad), "--out", str(tmp_path / "p")],
                 ["export", "--checkpoint", str(bad), "--height", "32", "--width", "32", "--out", str(tmp_path / "e")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--checkpoint:" in err and "bad.safetensors" in err and "Traceback" not in err, err
