"""Property-based tests (hypothesis): every op's fast backends against the reference over
random shapes and values -- empty inputs, one element, odd sizes, duplicates, ties,
empty and full masks, zero-size boxes, padding wider than the kernel.

Tensors come from a drawn seed plus drawn structure flags (duplicates, ties, empties),
which keeps examples cheap to generate and shrink. The runs are derandomized (the same
examples every run: no flaky CI) and small (the Triton backends run in the interpreter).
"""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from solo_fast import ops  # noqa: E402
from solo_fast.ops import reference  # noqa: E402

from helpers import available, concat_conv, random_boxes, random_masks  # noqa: E402

# The @given bodies below call these two by their former names on purpose: Hypothesis
# derives a derandomized test's examples from the source of its body, so renaming a call
# there would change the examples it runs.
from helpers import assert_nms_matches_reference as assert_matches_reference  # noqa: E402
from helpers import check_mask_predict as check_against_reference  # noqa: E402

SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def fast(op):
    return available(op, among=("cpu", "triton"))


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------- matrix_nms
@st.composite
def nms_case(draw):
    n = draw(st.integers(0, 7))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    masks = torch.rand(n, h, w, generator=g) < draw(st.sampled_from([0.2, 0.5, 0.9]))
    if n >= 2 and draw(st.booleans()):  # duplicates
        masks[n - 1] = masks[0]
    if n >= 1 and draw(st.booleans()):  # an empty mask
        masks[draw(st.integers(0, n - 1))] = False
    labels = torch.randint(0, draw(st.integers(1, 3)), (n,), generator=g)
    if draw(st.booleans()):  # ties
        scores = torch.tensor([0.3, 0.6])[torch.randint(0, 2, (n,), generator=g)]
    else:
        scores = torch.rand(n, generator=g)
    kw = dict(
        kernel=draw(st.sampled_from(["gaussian", "linear"])),
        sigma=draw(st.sampled_from([0.5, 2.0])),
        filter_thr=draw(st.sampled_from([-1.0, 0.05, 0.5])),
        nms_pre=draw(st.sampled_from([-1, 0, 1, 3])),
    )
    dtype = draw(st.sampled_from([torch.bool, torch.uint8]))
    with_area = draw(st.booleans())
    return masks.to(dtype), labels, scores, kw, with_area


@pytest.mark.parametrize("backend", fast("matrix_nms"))
@SETTINGS
@given(case=nms_case(), max_num=st.sampled_from([-1, 1, 4]))
def test_matrix_nms_matches_reference(backend, case, max_num):
    masks, labels, scores, kw, with_area = case
    area = masks.flatten(1).sum(1) if with_area else None
    got = ops.matrix_nms(masks, labels, scores, mask_area=area, backend=backend, **kw)
    ref = ops.matrix_nms(masks, labels, scores, mask_area=area, backend="reference", **kw)
    assert_matches_reference(got, ref, filter_thr=kw["filter_thr"])
    assert bool((got[0][:-1] >= got[0][1:]).all()), "scores must be sorted descending"
    assert bool((got[0] <= scores[got[3]] + 1e-7).all()), "decay never raises a score"
    # max_num keeps a prefix of the uncapped result
    capped = ops.matrix_nms(masks, labels, scores, mask_area=area, backend=backend, max_num=max_num, **kw)
    m = len(got[3]) if max_num <= 0 else min(max_num, len(got[3]))
    assert all(torch.equal(a, b[:m]) for a, b in zip(capped, got))


@pytest.mark.parametrize("backend", fast("matrix_nms"))
@SETTINGS
@given(case=nms_case())
def test_matrix_nms_decay_matches_reference(backend, case):
    """The decay factors alone (before any sort or filter), on inputs already in score order."""
    from solo_fast.ops import _matrix_nms

    masks, labels, _, kw, _ = case
    area = masks.flatten(1).sum(1)
    decay = {"cpu": _matrix_nms.decay_cpu, "triton": _matrix_nms.decay_triton}[backend]
    got = decay(masks, labels, area, kw["kernel"], kw["sigma"])
    want = reference.matrix_decay(masks, labels, area, kw["kernel"], kw["sigma"])
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not bool(torch.isnan(got).any())


# ---------------------------------------------------------------- center_region_assign
@st.composite
def assign_case(draw):
    strides = draw(st.sampled_from([1, 2, 4, [1, 2], [2, 4, 2]]))
    levels = len(strides) if isinstance(strides, list) else draw(st.integers(1, 3))
    unit = max(strides) if isinstance(strides, list) else strides
    H, W = unit * draw(st.integers(1, 6)), unit * draw(st.integers(1, 6))
    M = draw(st.integers(0, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    masks = random_masks(g, M, H, W)
    if M >= 2 and draw(st.booleans()):  # duplicate instances: the last one wins
        masks[M - 1] = masks[0]
    boxes = random_boxes(g, masks)
    grids = [draw(st.integers(1, 7)) for _ in range(levels)]
    ranges = []
    for _ in range(levels):
        lo = draw(st.sampled_from([0.0, 1.0, 2.0, 4.0]))
        ranges.append((lo, lo + draw(st.sampled_from([0.0, 3.0, 8.0, 100.0]))))
    num_classes = draw(st.integers(1, 4))
    labels = torch.randint(0, num_classes, (M,), generator=g)
    cfg = dict(pad_shape=(H, W), num_grids=grids, scale_ranges=ranges,
               pos_scale=draw(st.sampled_from([0.0, 0.2, 1.0])), num_classes=num_classes,
               mask_stride=strides)
    return masks, labels, boxes, cfg


def _assert_targets_equal(got, want):
    for field, a, b in zip(want._fields, got, want):
        assert len(a) == len(b), field
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and torch.equal(x, y), field


@pytest.mark.parametrize("backend", [b for b in fast("center_region_assign")])
@SETTINGS
@given(case=assign_case(), as_bool=st.booleans())
def test_center_region_assign_matches_reference(backend, case, as_bool):
    masks, labels, boxes, cfg = case
    if as_bool:
        masks = masks.bool()
    got = ops.center_region_assign(masks, labels, boxes, backend=backend, **cfg)
    want = ops.center_region_assign(masks, labels, boxes, backend="reference", **cfg)
    _assert_targets_equal(got, want)
    for lab, cells, inst, S in zip(got.labels, got.pos_cells, got.pos_instance, cfg["num_grids"]):
        assert lab.shape == (S, S)
        assert bool((cells[1:] > cells[:-1]).all()), "pos_cells ascending"
        assert torch.equal(lab.reshape(-1)[cells], labels.long()[inst])
        assert int((lab != cfg["num_classes"]).sum()) == cells.numel()


@pytest.mark.parametrize("backend", [b for b in fast("center_region_assign")])
@SETTINGS
@given(cases=st.lists(assign_case(), min_size=1, max_size=3))
def test_center_region_assign_batch_matches_per_image(backend, cases):
    cfg = cases[0][3]
    H, W = cfg["pad_shape"]
    imgs = [(m, lab, b) for m, lab, b, c in cases if c["pad_shape"] == (H, W)]
    got = ops.center_region_assign_batch([i[0] for i in imgs], [i[1] for i in imgs], [i[2] for i in imgs],
                                         backend=backend, **cfg)
    for (m, lab, b), t in zip(imgs, got):
        _assert_targets_equal(t, ops.center_region_assign(m, lab, b, backend="reference", **cfg))


# -------------------------------------------------------------------------- coord_conv2d
@pytest.mark.parametrize("backend", fast("coord_conv2d"))
@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 7), st.integers(1, 7), st.integers(1, 3)),
    kernel=st.sampled_from([(1, 1), (3, 3), (1, 3), (3, 1), (5, 3)]),
    padding=st.integers(0, 3),
    coords=st.sampled_from(["xy", "x", "y"]),
    src=st.one_of(st.none(), st.tuples(st.integers(1, 9), st.integers(1, 9))),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_coord_conv2d_matches_reference(backend, shape, kernel, padding, coords, src, bias, seed):
    b, c, h, w, o = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    weight = torch.randn(o, c + len(coords), *kernel, generator=g)
    bb = torch.randn(o, generator=g) if bias else None
    if h + 2 * padding < kernel[0] or w + 2 * padding < kernel[1]:
        with pytest.raises(ValueError, match="x: spatial size"):
            ops.coord_conv2d(x, weight, bb, padding=padding, coords=coords, coord_src_size=src, backend=backend)
        return
    got = ops.coord_conv2d(x, weight, bb, padding=padding, coords=coords, coord_src_size=src, backend=backend)
    want = concat_conv(x.double(), weight.double(), None if bb is None else bb.double(), padding, coords, src)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


# -------------------------------------------------------------------------- mask_predict
@pytest.mark.parametrize("backend", fast("mask_predict"))
@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 7), st.integers(1, 7), st.integers(0, 5)),
    bias=st.booleans(),
    mask_thr=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]),
    dup=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_mask_predict_matches_reference(backend, shape, bias, mask_thr, dup, seed):
    e, h, w, k = shape
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(e, h, w, generator=g)
    kern = torch.randn(k, e, generator=g)
    if dup and k >= 2:
        kern[k - 1] = kern[0]  # duplicate kernels give identical masks
    b = torch.randn(k, generator=g) if bias else None
    if dup and k >= 2 and b is not None:
        b[k - 1] = b[0]  # a duplicate is the whole row: kernel and bias
    got = ops.mask_predict(f, kern, b, mask_thr=mask_thr, backend=backend)
    if backend == "cpu":  # documented bit-exact
        want = reference.mask_predict(f, kern, b, mask_thr=mask_thr)
        assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(got, want))
    else:
        check_against_reference(got, f, kern, b, mask_thr, 0.0, soft_atol=1e-6)
    soft, binary, area, maskness = got
    assert torch.equal(area, binary.sum((1, 2)))
    assert bool(((maskness > mask_thr) | (area == 0)).all()) and bool((maskness <= 1).all())
    if dup and k >= 2:
        assert torch.equal(binary[k - 1], binary[0])
