"""ops.binary_masks_x4: the CPU kernel against the reference (F.interpolate, crop, maybe
F.interpolate again, then >), bit for bit; and post-processing's use of it."""
import pytest
import torch
import torch.nn.functional as F

import solo_fast
from solo_fast import ops
from solo_fast.modeling import postprocess
from solo_fast.ops import _binary_masks, reference

needs_cpu = pytest.mark.skipif("cpu" not in ops.available_backends("binary_masks_x4"),
                               reason="no extension, or its arithmetic is not this torch's (checked at first use)")


def _check_cpu(shape, crop, thr, size=None):
    g = torch.Generator().manual_seed(sum(shape) + sum(crop) + (sum(size) if size else 0))
    soft = torch.rand(*shape, generator=g)
    if soft.numel() and thr != "probe":
        soft.view(-1)[::7] = thr  # values on the threshold, and pixels whose blend lands on it
    before = soft.clone()
    out = tuple(size or crop)
    if thr == "probe":  # thresholds at the reference's own values: a one-ulp difference flips a pixel
        values = _binary_masks._soft_values(soft, crop, out) if soft.numel() else torch.zeros(0)
        thresholds = _binary_masks.probe_thresholds(values, 16).tolist() if values.numel() else [0.5]
    else:
        thresholds = [thr]
    for t in thresholds:
        got = ops.binary_masks_x4(soft, crop, t, size, backend="cpu")
        want = reference.binary_masks_x4(soft, crop, t, size)
        assert got.dtype == torch.bool and got.shape == (shape[0], *out)
        assert torch.equal(got, want), t
    assert torch.equal(soft, before)


@needs_cpu
@pytest.mark.parametrize("shape,crop", [((3, 13, 21), (52, 84)), ((2, 13, 21), (50, 81)), ((1, 1, 1), (4, 4)),
                                        ((1, 1, 1), (1, 3)), ((4, 2, 9), (8, 1)), ((0, 5, 5), (20, 20)),
                                        ((2, 50, 84), (200, 333)), ((3, 7, 5), (0, 20))])
@pytest.mark.parametrize("thr", [0.5, 0.3, 0.0, 1.0, "probe"])
def test_cpu_equals_reference(shape, crop, thr):
    # Small outputs (H + W <= 128) are resized by another torch kernel, and the op hands
    # them to the reference; the larger shapes run the kernel.
    _check_cpu(shape, crop, thr)


@needs_cpu
@pytest.mark.parametrize("shape,crop,size", [
    ((2, 13, 21), (50, 81), (97, 154)),     # up
    ((2, 13, 21), (50, 81), (41, 90)),      # down
    ((2, 13, 21), (50, 81), (50, 160)),     # one side alone
    ((2, 13, 21), (50, 81), (120, 81)),
    ((1, 112, 192), (448, 747), (800, 1333)),  # solov2_light's test size on an 800x1333 photo
    ((1, 100, 168), (400, 667), (240, 320)),   # a photo enlarged for the test size
    ((3, 9, 49), (7, 159), (129, 273)),     # a crop far from the padded size
    ((2, 31, 5), (12, 5), (77, 20)),        # second output H + W <= 128: the reference
    ((2, 19, 12), (25, 12), (17, 134)),     # first output 4 (h + w) <= 128: the reference
    ((0, 13, 21), (50, 81), (97, 154)),
])
@pytest.mark.parametrize("thr", [0.5, "probe"])
def test_cpu_equals_reference_resized_back(shape, crop, size, thr):
    # Output rows come 64 to a work item: 800 rows start items whose first rows need the
    # first resize's rows in descending order (a row cache that dropped the other row of a
    # pair gave a wrong row 768 here).
    _check_cpu(shape, crop, thr, size)


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
def test_final_masks_take_the_kernel_where_masks_are_x4_of_the_pad(monkeypatch):
    calls = []
    real = ops.binary_masks_x4
    monkeypatch.setattr(ops, "binary_masks_x4", lambda *a, **k: calls.append(a) or real(*a, **k))
    soft = torch.rand(3, 40, 56)
    for ori in ((150, 210), (300, 420), (101, 97)):  # not resized, resized back up, down
        out = postprocess.final_masks(soft, (160, 224), (150, 210), ori, 0.5)
        assert len(calls) == 1 and out.shape == (3, *ori)
        with solo_fast.use_backend("reference"):  # the published chunked resizes
            assert torch.equal(out, postprocess.final_masks(soft, (160, 224), (150, 210), ori, 0.5))
        assert len(calls) == 1
        calls.clear()
    postprocess.final_masks(soft, (160, 226), (150, 210), (150, 210), 0.5)  # not x4: the chunked path
    assert not calls


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="soft"):
        ops.binary_masks_x4(torch.rand(4, 4), (8, 8), 0.5)
    with pytest.raises(ValueError, match="crop"):
        ops.binary_masks_x4(torch.rand(1, 4, 4), (17, 8), 0.5)
    with pytest.raises(ValueError, match="crop"):
        ops.binary_masks_x4(torch.rand(1, 4, 4), (8.0, 8), 0.5)
    with pytest.raises(ValueError, match="mask_thr"):
        ops.binary_masks_x4(torch.rand(1, 4, 4), (8, 8), "0.5")
    with pytest.raises(ValueError, match="size"):
        ops.binary_masks_x4(torch.rand(1, 4, 4), (8, 8), 0.5, (8,))
    with pytest.raises(ValueError, match="size"):
        ops.binary_masks_x4(torch.rand(1, 4, 4), (8, 8), 0.5, (0, 8))
    with pytest.raises(ValueError, match="size"):
        ops.binary_masks_x4(torch.rand(1, 4, 4), (0, 8), 0.5, (5, 8))


@needs_cpu
def test_opcheck():
    torch.library.opcheck(torch.ops.solo_fast.binary_masks_x4.default, (torch.rand(2, 20, 30), 77, 118, 90, 140, 0.5),
                          test_utils=("test_schema", "test_faketensor"))
