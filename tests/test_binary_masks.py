"""ops.binary_masks_x4: the CPU kernel against the reference (F.interpolate, then >), bit
for bit; and post-processing's use of it."""
import pytest
import torch
import torch.nn.functional as F

import solo_fast
from solo_fast import ops
from solo_fast.modeling import postprocess
from solo_fast.ops import _binary_masks, reference

needs_cpu = pytest.mark.skipif("cpu" not in ops.available_backends("binary_masks_x4"),
                               reason="no extension, or its arithmetic is not this torch's (checked at first use)")


@needs_cpu
@pytest.mark.parametrize("shape,crop", [((3, 13, 21), (52, 84)), ((2, 13, 21), (50, 81)), ((1, 1, 1), (4, 4)),
                                        ((1, 1, 1), (1, 3)), ((4, 2, 9), (8, 1)), ((0, 5, 5), (20, 20)),
                                        ((2, 50, 84), (200, 333)), ((3, 7, 5), (0, 20))])
@pytest.mark.parametrize("thr", [0.5, 0.3, 0.0, 1.0, "probe"])
def test_cpu_equals_reference(shape, crop, thr):
    # Small outputs (H + W <= 128) are resized by another torch kernel, and the op hands
    # them to the reference; the larger shapes run the kernel.
    g = torch.Generator().manual_seed(sum(shape) + sum(crop))
    soft = torch.rand(*shape, generator=g)
    if soft.numel() and thr != "probe":
        soft.view(-1)[::7] = thr  # values on the threshold, and pixels whose blend lands on it
    before = soft.clone()
    if thr == "probe":  # thresholds at the reference's own values: a one-ulp difference flips a pixel
        values = torch.nn.functional.interpolate(soft[:, None], size=(4 * shape[1], 4 * shape[2]), mode="bilinear",
                                                 align_corners=False)[:, 0, : crop[0], : crop[1]]
        thresholds = _binary_masks.probe_thresholds(values, 16).tolist() if values.numel() else [0.5]
    else:
        thresholds = [thr]
    for t in thresholds:
        got = ops.binary_masks_x4(soft, crop, t, backend="cpu")
        want = reference.binary_masks_x4(soft, crop, t)
        assert got.dtype == torch.bool and got.shape == (shape[0], *crop)
        assert torch.equal(got, want), t
    assert torch.equal(soft, before)


def test_reference_is_one_interpolate_and_a_threshold():
    soft = torch.rand(2, 6, 10)
    s = F.interpolate(soft[None], size=(24, 40), mode="bilinear", align_corners=False)[0]
    assert torch.equal(reference.binary_masks_x4(soft, (21, 37), 0.5), s[:, :21, :37] > 0.5)


@needs_cpu
def test_half_precision_soft_masks_are_resized_in_fp32():
    soft = torch.rand(2, 6, 10).half()
    assert torch.equal(ops.binary_masks_x4(soft, (24, 40), 0.5, backend="cpu"),
                       reference.binary_masks_x4(soft, (24, 40), 0.5))


@needs_cpu
def test_final_masks_take_the_kernel_only_where_it_applies(monkeypatch):
    calls = []
    real = ops.binary_masks_x4
    monkeypatch.setattr(ops, "binary_masks_x4", lambda *a, **k: calls.append(a) or real(*a, **k))
    soft = torch.rand(3, 16, 24)
    out = postprocess.final_masks(soft, (64, 96), (60, 90), (60, 90), 0.5)
    assert len(calls) == 1 and out.shape == (3, 60, 90)
    with solo_fast.use_backend("reference"):  # the chunked resizes
        assert torch.equal(out, postprocess.final_masks(soft, (64, 96), (60, 90), (60, 90), 0.5))
    assert len(calls) == 1
    postprocess.final_masks(soft, (64, 96), (60, 90), (120, 180), 0.5)  # resized back: the chunked path
    postprocess.final_masks(soft, (64, 98), (60, 90), (60, 90), 0.5)  # not x4
    assert len(calls) == 1


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="soft"):
        ops.binary_masks_x4(torch.rand(4, 4), (8, 8), 0.5)
    with pytest.raises(ValueError, match="crop"):
        ops.binary_masks_x4(torch.rand(1, 4, 4), (17, 8), 0.5)
    with pytest.raises(ValueError, match="crop"):
        ops.binary_masks_x4(torch.rand(1, 4, 4), (8.0, 8), 0.5)
    with pytest.raises(ValueError, match="mask_thr"):
        ops.binary_masks_x4(torch.rand(1, 4, 4), (8, 8), "0.5")


@needs_cpu
def test_opcheck():
    torch.library.opcheck(torch.ops.solo_fast.binary_masks_x4.default, (torch.rand(2, 20, 30), 77, 118, 0.5),
                          test_utils=("test_schema", "test_faketensor"))
