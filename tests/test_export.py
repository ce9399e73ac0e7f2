"""solo_fast.export: the static-shape program and its ONNX file against SOLO.predict."""
import numpy as np
import pytest
import torch

import solo_fast
from solo_fast.cli import main as cli_main
from solo_fast.export import ExportableSOLO, export_onnx, export_program, stable_argsort_desc

H, W = 128, 160
CONFIGS = ("solov2_light_r18_fpn", "solo_r18_fpn", "decoupled_solo_light_r18_fpn")
# Small grids keep the (cell, class) pairs over score_thr under the default topk (500), the
# case where the export computes exactly what predict does.
GRIDS = (12, 10, 8, 6, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(name: str) -> solo_fast.SOLO:
    torch.manual_seed(0)
    narrow = dict(fpn_channels=64, feat_channels=64, stacked_convs=2, num_grids=GRIDS)
    if name.startswith("solov2"):
        narrow.update(mask_feat_channels=64, mask_out_channels=64)
    # min/max size = the image size: predict does not resize a 128×160 image.
    model = solo_fast.SOLO(name, num_classes=3, min_size=H, max_size=W, **narrow).eval()
    head = model.mask_head
    with torch.no_grad():
        # Untrained classifiers score every cell at the 0.01 prior: let two classes fire.
        head.conv_cls.bias[0] = -1.0
        head.conv_cls.bias[1] = -1.5
        # Untrained SOLO / Decoupled mask convs give (almost) empty masks: spread them.
        for attr, bias in (("conv_mask_list", 0.0), ("conv_mask_list_x", 1.0), ("conv_mask_list_y", 1.0)):
            for conv in getattr(head, attr, []):
                conv.weight.normal_(0, 0.05)
                conv.bias.fill_(bias)
    return model


def image(h=H, w=W, seed=1) -> torch.Tensor:
    return torch.rand((3, h, w), generator=torch.Generator().manual_seed(seed))


def assert_matches(outputs, result, *, score_atol=1e-4, mask_agree=0.999):
    masks, scores, labels, num_valid = (o.detach() if isinstance(o, torch.Tensor) else torch.from_numpy(np.asarray(o))
                                        for o in outputs)
    n = int(num_valid)
    assert n == len(result.scores)
    assert torch.equal(labels[:n], result.labels)
    torch.testing.assert_close(scores[:n], result.scores, atol=score_atol, rtol=0)
    if n:
        agree = (masks[:n].bool() == result.masks).float().mean().item()
        assert agree >= mask_agree, agree
    # Past num_valid: zero-filled.
    assert not masks[n:].any() and not scores[n:].any() and bool((labels[n:] == -1).all())


@pytest.fixture(scope="module", params=CONFIGS)
def exported(request):
    model = small_model(request.param)
    program = export_program(model, (H, W))
    return model, program


def test_program_matches_predict(exported):
    model, program = exported
    img = image()
    with torch.no_grad():
        outputs = program.module()(img[None])
    assert [tuple(o.shape) for o in outputs] == [(100, H, W), (100,), (100,), ()]
    assert outputs[0].dtype == torch.bool and outputs[2].dtype == torch.int64 and outputs[3].dtype == torch.int64
    assert int(outputs[3]) > 10  # the weights above give real detections to compare
    for backend in ("reference", "auto"):
        with solo_fast.use_backend(backend):
            assert_matches(outputs, model.predict(img)[0])


def test_onnx_roundtrip(exported, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'solo_fast[export]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'solo_fast[export]')")
    model, program = exported
    path = export_onnx(program, str(tmp_path / "model.onnx"))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["masks", "scores", "labels", "num_valid"]
    for seed in (1, 2):
        img = image(seed=seed)
        outputs = session.run(None, {"image": img[None].numpy()})
        with solo_fast.use_backend("reference"):
            assert_matches(outputs, model.predict(img)[0])


def test_resize_crop_and_settings():
    # An input size the model's transform resizes (and pads): the crop and the resize back
    # to the input size run inside; settings as predict's overrides.
    model = small_model("solov2_light_r18_fpn")
    settings = dict(score_thr=0.2, filter_thr=0.1, max_per_img=30, nms_pre=200)
    wrapper = ExportableSOLO(model, (100, 150), **settings).eval()
    assert wrapper.img_shape == (107, 160) and wrapper.pad_shape == (128, 160)
    img = image(100, 150, seed=3)
    with torch.no_grad():
        outputs = wrapper(img[None])
    assert outputs[0].shape == (30, 100, 150)
    with solo_fast.use_backend("reference"):
        assert_matches(outputs, model.predict(img, **settings)[0])
    # Fewer Matrix NMS entries than max_per_img: padded to max_per_img.
    with torch.no_grad():
        masks, scores, labels, n = ExportableSOLO(model, (100, 150), nms_pre=20, max_per_img=30)(img[None])
    assert masks.shape == (30, 100, 150) and 0 < int(n) <= 20 and bool((labels[20:] == -1).all())
    # Nothing over score_thr: no detections, the outputs keep their shapes.
    with torch.no_grad():
        masks, scores, labels, n = ExportableSOLO(model, (100, 150), score_thr=0.99)(img[None])
    assert int(n) == 0 and masks.shape == (100, 100, 150) and not masks.any() and bool((labels == -1).all())
    # topk below the candidate count: still sorted, valid entries first.
    with torch.no_grad():
        _, scores, labels, n = ExportableSOLO(model, (100, 150), topk=10)(img[None])
    n = int(n)
    assert 0 < n <= 10 and bool((scores[:n] > 0).all()) and bool((scores[:n].diff() <= 0).all())


def test_stable_argsort_desc():
    key = torch.tensor([0.5, 1.0, 0.5, -1.0, 1.0, 0.2])
    assert stable_argsort_desc(key, 6).tolist() == torch.sort(key, descending=True, stable=True).indices.tolist()
    assert stable_argsort_desc(key, 3).tolist() == [1, 4, 0]


def test_bad_arguments(tmp_path):
    model = small_model("solov2_light_r18_fpn")
    cases = [
        (dict(input_size=(128,)), "input_size"),
        (dict(input_size=(128, 0)), "input_size"),
        (dict(input_size=(128.0, 160)), "input_size"),
        (dict(input_size=(H, W), topk=0), "topk"),
        (dict(input_size=(H, W), score_thr=1.5), "score_thr"),
        (dict(input_size=(H, W), max_per_img=0), "max_per_img"),
        (dict(input_size=(H, W), nms_sigma=3.0), "nms_sigma"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            ExportableSOLO(model, **kwargs)
    wrapper = ExportableSOLO(model, (H, W))
    with pytest.raises(ValueError, match="image"):
        wrapper(torch.rand(1, 3, H, W + 32))
    with pytest.raises(ValueError, match="image"):
        wrapper(torch.zeros(1, 3, H, W, dtype=torch.uint8))
    with pytest.raises(ValueError, match="model"):
        export_program(torch.nn.Linear(2, 2), (H, W))
    with pytest.raises(ValueError, match="input_size"):
        export_onnx(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="path"):
        export_onnx(model, "", (H, W))


def test_cli_export_torch(tmp_path, capsys):
    model = small_model("solov2_light_r18_fpn")
    ckpt = model.save_pretrained(str(tmp_path / "ckpt"))
    out = tmp_path / "export"
    assert cli_main(["export", "--checkpoint", ckpt, "--height", "64", "--width", "96", "--format", "torch",
                     "--out", str(out)]) == 0
    program = torch.export.load(str(out / "model.pt2"))
    with torch.no_grad():
        masks, scores, labels, n = program.module()(image(64, 96)[None])
    assert masks.shape == (100, 64, 96) and scores.shape == (100,)
    assert "model.pt2" in capsys.readouterr().out
    # Bad input: an error message naming the flag, exit code 2.
    assert cli_main(["export", "--config", "solov2_light_r18_fpn", "--height", "0", "--width", "96",
                     "--out", str(out)]) == 2
    assert "--height" in capsys.readouterr().err
