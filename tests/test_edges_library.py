"""What users meet at the edges of the library (issue 14): unreadable checkpoints, saves
that are interrupted or cannot be written, models cast to another dtype, images over
OpenCV's size limit, numpy / tensor settings, and predict from several threads.
(Installing and importing: tests/test_packaging.py.)"""
import importlib
import os
import subprocess
import sys
import textwrap
import threading
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import tiny_model, tiny_scenes

import solo_fast

train_mod = importlib.import_module("solo_fast.engine.train")  # (solo_fast.engine.train is also the function)

# Settings under which the tiny random model detects dozens of objects (the default
# thresholds keep none of its low scores).
DETECT = dict(score_thr=0.0, mask_thr=0.3, filter_thr=0.0)


@pytest.fixture(scope="module")
def image():
    return tiny_scenes(1)[0][0]  # 64x64 HWC uint8


def same_results(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.masks, y.masks) and torch.equal(x.labels, y.labels) and torch.equal(x.scores, y.scores)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "torch", "text"])
def test_from_pretrained_names_an_unreadable_file(tmp_path, kind):
    good = tiny_model().save_pretrained(str(tmp_path / "good"))
    data = open(good, "rb").read()
    path = tmp_path / "model.safetensors"
    if kind == "torch":
        torch.save({"w": torch.zeros(2)}, path)
    else:
        path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                          "random": np.random.RandomState(0).bytes(4096), "text": b"not a checkpoint\n"}[kind])
    with pytest.raises(ValueError, match="path: .*model.safetensors"):
        solo_fast.SOLO.from_pretrained(str(path))


def _fail_after_writing(monkeypatch, exc):
    """safetensors' save_file writes part of the file, then ``exc`` interrupts it."""
    import safetensors.torch

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"torn")
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError("disk full")], ids=["interrupt", "error"])
def test_interrupted_saves_keep_the_old_file_and_leave_no_temporary(tmp_path, monkeypatch, exc):
    model = tiny_model()
    path = model.save_pretrained(str(tmp_path / "run"))  # run/model.safetensors
    before = open(path, "rb").read()
    _fail_after_writing(monkeypatch, exc)
    with pytest.raises(type(exc)):
        model.save_pretrained(str(tmp_path / "run"))
    with pytest.raises(type(exc)):
        train_mod._save_model(model, str(tmp_path / "run"))  # training's checkpoint
    monkeypatch.undo()

    def torn_save(obj, f, *a, **k):
        open(f, "wb").write(b"torn")
        raise exc

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(type(exc)):
        train_mod._atomic_torch_save({"step": 1}, str(tmp_path / "run" / "last_state.pt"))  # the resume state
    assert os.listdir(tmp_path / "run") == ["model.safetensors"]
    assert open(path, "rb").read() == before


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoint_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = tiny_model().save_pretrained(str(tmp_path / "run"))
        state = str(tmp_path / "run" / "last_state.pt")
        train_mod._atomic_torch_save({"step": 1}, state)
        with open(tmp_path / "run" / "train.log", "w"):  # any other output, for comparison
            pass
    finally:
        os.umask(old)
    for p in (path, state, tmp_path / "run" / "train.log"):
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask, p


def test_save_pretrained_refuses_paths_it_cannot_write(tmp_path, monkeypatch):
    model = tiny_model()
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(ValueError, match="path: cannot write .*nope.* does not exist"):
        model.save_pretrained(str(missing))
    assert not (tmp_path / "nope").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="path: .*file.* is an existing file, not a folder"):
        model.save_pretrained(str(tmp_path / "file" / "model.safetensors"))
    with pytest.raises(ValueError, match="path: cannot create the folder .*file.*Not a directory"):
        model.save_pretrained(str(tmp_path / "file" / "run"))  # the directory form
    (tmp_path / "run" / "model.safetensors").mkdir(parents=True)
    with pytest.raises(ValueError, match="path: .*model.safetensors.* is an existing folder, not a file"):
        model.save_pretrained(str(tmp_path / "run"))
    # An unwritable directory (made by refusing the file's creation: root writes anyway).
    (tmp_path / "locked").mkdir()
    real_open = os.open

    def refuse(p, *a, **k):
        if str(p).startswith(str(tmp_path / "locked")):
            raise PermissionError(13, "Permission denied", p)
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ValueError, match="path: cannot write .*locked.*Permission denied"):
        model.save_pretrained(str(tmp_path / "locked"))
    monkeypatch.undo()
    assert os.listdir(tmp_path / "locked") == []
    # The directory form still creates missing directories.
    assert solo_fast.SOLO.from_pretrained(model.save_pretrained(str(tmp_path / "a" / "b"))) is not None


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_a_model_cast_to_another_dtype_predicts_and_trains(image, dtype):
    """The transform's fp32 output is cast to the weights' dtype; post-processing returns
    fp32 scores whatever the head's dtype."""
    ref = tiny_model(**DETECT).predict(image)[0]
    model = tiny_model(**DETECT).to(dtype)
    (r,) = model.predict(image)
    assert r.scores.dtype == torch.float32 and r.masks.dtype == torch.bool and len(r.scores) > 0
    if dtype == torch.float64:  # more precise than fp32: the same detections
        assert torch.equal(r.labels, ref.labels) and torch.allclose(r.scores, ref.scores, atol=1e-5)
    chw = torch.from_numpy(image.copy()).permute(2, 0, 1)
    assert torch.equal(model.eval()(chw)[0]["scores"], r.scores)  # eval-mode forward alike
    _, masks, labels = tiny_scenes(1)[0]
    model.train()
    losses = model([chw],
                   [{"masks": torch.from_numpy(masks), "labels": torch.from_numpy(labels)}])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == dtype and bool(torch.isfinite(g).all()) for g in grads)


def test_image_over_opencvs_pixel_limit_is_a_value_error(tmp_path):
    """OpenCV refuses images over OPENCV_IO_MAX_IMAGE_PIXELS (default 2**30, read when cv2 is
    imported): a ValueError naming the file and the variable, not a cv2.error."""
    import cv2

    path = tmp_path / "big.png"
    cv2.imwrite(str(path), np.zeros((20, 30, 3), np.uint8))
    code = textwrap.dedent("""
        import sys
        from solo_fast.modeling.images import load_images  # predict's decoding
        try:
            load_images([sys.argv[1]])
        except ValueError as e:
            print(e)
    """)
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "100"}
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("images[0]: ") and "big.png" in out.stdout, out.stdout
    assert "OPENCV_IO_MAX_IMAGE_PIXELS" in out.stdout, out.stdout


def test_settings_accept_any_real_number(image, tmp_path):
    model = tiny_model()
    given = dict(score_thr=np.float32(0.0), mask_thr=torch.tensor(0.3), filter_thr=Fraction(0),
                 nms_pre=np.int64(50), max_per_img=torch.tensor(7), mask_chunk=np.uint16(64))
    s = model.inference_settings(**given)
    for key in given:  # plain Python numbers, nothing downstream sees a tensor
        assert type(getattr(s, key)) is (int if key in ("nms_pre", "max_per_img", "mask_chunk") else float), key
    plain = dict(score_thr=0.0, mask_thr=0.3, filter_thr=0.0, nms_pre=50, max_per_img=7, mask_chunk=64)
    same_results(model.predict(image, batch_size=np.int64(1), **given), model.predict(image, **plain))
    # At construction too, and the config stays JSON (save_pretrained).
    m = tiny_model(score_thr=np.float64(0.2), max_per_img=np.int32(9))
    assert type(m.config.inference.score_thr) is float and type(m.config.inference.max_per_img) is int
    assert solo_fast.SOLO.from_pretrained(m.save_pretrained(str(tmp_path))).config == m.config
    # Wherever settings enter: list settings element-wise, config.replace, get_config.
    g = tiny_model(num_grids=[np.int64(v) for v in (6, 5, 4, 3, 2)])
    assert g.config.arch.num_grids == (6, 5, 4, 3, 2) and all(type(v) is int for v in g.config.arch.num_grids)
    assert type(m.config.replace(score_thr=np.float32(0.25)).inference.score_thr) is float
    from solo_fast.modeling import configs
    assert type(configs.get_config("solov2_light_r18_fpn", max_per_img=np.int64(3))["max_per_img"]) is int


@pytest.mark.parametrize("key,value", [
    ("score_thr", np.bool_(True)), ("score_thr", torch.tensor(True)), ("score_thr", True),
    ("score_thr", np.float32("nan")), ("mask_thr", torch.tensor(float("nan"))), ("filter_thr", np.float64(1.5)),
    ("score_thr", torch.tensor([0.2])), ("max_per_img", np.float64(5.0)), ("max_per_img", torch.tensor(5.0)),
    ("nms_pre", np.int64(0)), ("max_per_img", "5"),
])
def test_settings_still_refuse_bools_nan_and_non_integers(image, key, value):
    with pytest.raises(ValueError, match=f"^{key}: expected"):
        tiny_model().predict(image, **{key: value})


def test_predict_from_several_threads_keeps_the_mode(image):
    """predict switches to eval mode once for overlapping calls and restores every module's
    own mode (here a train-mode model with one stage in eval) when the last one ends."""
    from solo_fast.modeling import solo as solo_mod

    model = tiny_model()
    model.train()
    model.backbone.layer1.eval()
    modes = [m.training for m in model.modules()]
    expected = model.predict(image, **DETECT)
    for _ in range(4):
        start = threading.Barrier(4)
        results, errors = [None] * 4, []

        def call(i):
            try:
                start.wait()
                results[i] = model.predict(image, **DETECT)
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert [m.training for m in model.modules()] == modes
        for r in results:
            same_results(r, expected)
    assert not solo_mod._EVAL_CALLS
    # A failing call restores the mode too.
    with torch.no_grad():
        model.backbone.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.predict(image)
    assert [m.training for m in model.modules()] == modes and not solo_mod._EVAL_CALLS
