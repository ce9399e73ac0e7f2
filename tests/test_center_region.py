"""center_region_assign: the compiled op against the reference path (DESIGN.md §2).

Parity is bit-exact: labels, positive cells, their instances and the downsampled mask
targets must be equal, not close.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from solo_fast import ops
from solo_fast._backend import BackendUnavailableError

from helpers import needs_cpp, random_boxes, random_masks

SOLO = dict(num_grids=[40, 36, 24, 16, 12], mask_stride=[4, 4, 8, 16, 16])
SOLOV2 = dict(num_grids=[40, 36, 24, 16, 12], mask_stride=4)
# Scale ranges shrunk to the small test images, overlapping so instances hit two levels.
SMALL_RANGES = ((1, 12), (6, 24), (12, 48), (24, 96), (48, 4096))


# --------------------------------------------------------------------------------------
# Random scenes
# --------------------------------------------------------------------------------------
def random_scene(seed, H, W, max_m=9):
    g = torch.Generator().manual_seed(seed)
    M = int(torch.randint(0, max_m + 1, (1,), generator=g))
    masks = random_masks(g, M, H, W)
    if M >= 2 and float(torch.rand(1, generator=g)) < 0.3:
        masks[-1] = masks[0]  # an exact duplicate: the later one must win every cell
    labels = torch.randint(0, 7, (M,), generator=g)
    boxes = random_boxes(g, masks)
    if float(torch.rand(1, generator=g)) < 0.25:
        masks = masks.bool()
    pos_scale = [0.2, 0.0, 1.0, float(torch.rand(1, generator=g))][int(torch.randint(0, 4, (1,), generator=g))]
    return masks, labels, boxes, pos_scale


def assert_same(got, want, strides):
    assert len(got.labels) == len(want.labels) == len(strides)
    for lvl in range(len(strides)):
        for field in ("labels", "pos_cells", "pos_instance", "mask_targets"):
            a, b = getattr(got, field)[lvl], getattr(want, field)[lvl]
            assert a.dtype == b.dtype, (field, lvl, a.dtype, b.dtype)
            assert a.shape == b.shape, (field, lvl, a.shape, b.shape)
            assert torch.equal(a, b), (field, lvl)
        for other in range(len(strides)):
            same = got.mask_targets[lvl] is got.mask_targets[other]
            assert same == (strides[lvl] == strides[other]), "levels with one stride share one tensor"


def level_strides(cfg):
    s = cfg["mask_stride"]
    return [s] * len(cfg["num_grids"]) if isinstance(s, int) else list(s)


CONFIGS = {
    "solo_64x96": dict(SOLO, pad_shape=(64, 96), scale_ranges=SMALL_RANGES),
    "solo_96x64": dict(SOLO, pad_shape=(96, 64), scale_ranges=SMALL_RANGES),
    "solov2_60x92": dict(SOLOV2, pad_shape=(60, 92), scale_ranges=SMALL_RANGES),
    "odd_strides_66x90": dict(
        num_grids=[5, 7, 3], mask_stride=[1, 2, 3], pad_shape=(66, 90), scale_ranges=((0, 20), (10, 60), (30, 200))
    ),
    "strides_5_6_60x90": dict(num_grids=[12, 9], mask_stride=[5, 6], pad_shape=(60, 90), scale_ranges=((0, 40), (20, 300))),
}


@needs_cpp
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_scenes_match_reference(name):
    cfg = CONFIGS[name]
    H, W = cfg["pad_shape"]
    for seed in range(70):
        masks, labels, boxes, pos_scale = random_scene(1000 * len(name) + seed, H, W)
        kw = dict(cfg, pos_scale=pos_scale, num_classes=7)
        want = ops.center_region_assign(masks, labels, boxes, backend="reference", **kw)
        got = ops.center_region_assign(masks, labels, boxes, backend="cpu", **kw)
        assert_same(got, want, level_strides(cfg))


def rounding_edge_cases(H, grids, pos_scale, limit=300):
    """(2 * centre row, box height) pairs where floor((cy ± 0.5*h*pos_scale) / H * S), in
    float64 and in the reference's operation order, differs from the exact rational value
    or from the order (v * S) / H: only an implementation that rounds exactly like the
    reference gets these cells right."""
    from fractions import Fraction

    cases = []
    for r2 in range(2 * H - 1):
        cy = r2 / 2
        for h in range(1, H):
            for S in grids:
                half = 0.5 * h * pos_scale
                exact_half = Fraction(1, 2) * h * Fraction(pos_scale)
                if any(
                    math.floor((cy + sg * half) / H * S) != v
                    for sg in (-1, 1)
                    for v in (math.floor((cy + sg * half) * S / H), math.floor((cy + sg * exact_half) / H * S))
                ):
                    cases.append((r2, h))
                    break
    step = max(1, len(cases) // limit)
    return cases[::step][:limit]


def pixels_with_centre(r2):
    """One pixel index, or two adjacent ones, whose mean is r2 / 2."""
    return [r2 // 2] if r2 % 2 == 0 else [r2 // 2, r2 // 2 + 1]


@needs_cpp
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("pos_scale", [0.2, 0.3])
def test_rounding_edges_match_reference(pos_scale):
    H = W = 96  # not a power of two: division by H rounds
    grids = [40, 36, 24, 16, 12]
    cases = rounding_edge_cases(H, grids, pos_scale)
    assert len(cases) > 50
    cfg = dict(pad_shape=(H, W), num_grids=grids, scale_ranges=[(0, 1e9)] * 5, pos_scale=pos_scale,
               num_classes=2, mask_stride=4)
    masks, labels, boxes = [], [], []
    for k, (r2, h) in enumerate(cases):
        c2, w = cases[(k * 7 + 3) % len(cases)]  # another edge case on the x axis
        m = torch.zeros(1, H, W, dtype=torch.uint8)
        for r in pixels_with_centre(r2):
            for c in pixels_with_centre(c2):
                m[0, r, c] = 1
        masks.append(m)
        labels.append(torch.tensor([1]))
        boxes.append(torch.tensor([[0.0, 0.0, w, h]], dtype=torch.float64))
    got = ops.center_region_assign_batch(masks, labels, boxes, backend="cpu", **cfg)
    for m, l, b, g in zip(masks, labels, boxes, got):
        assert_same(g, ops.center_region_assign(m, l, b, backend="reference", **cfg), [4] * 5)


@needs_cpp
@pytest.mark.usefixtures("one_thread")
def test_batch_matches_reference_and_single():
    cfg = dict(CONFIGS["solo_64x96"], pos_scale=0.2, num_classes=7)
    scenes = [random_scene(s, 64, 96) for s in range(6)]
    masks, labels, boxes = [s[0] for s in scenes], [s[1] for s in scenes], [s[2] for s in scenes]
    got = ops.center_region_assign_batch(masks, labels, boxes, backend="cpu", **cfg)
    assert len(got) == len(scenes)
    for m, l, b, g in zip(masks, labels, boxes, got):
        assert_same(g, ops.center_region_assign(m, l, b, backend="reference", **cfg), level_strides(cfg))
    assert ops.center_region_assign_batch([], [], backend="cpu", **cfg) == []


def full_size_scenes(cfg):
    """Two 800×1344 images (the benchmark size) of 15 instances each, and the assign config:
    (masks, labels, kw)."""
    H, W = 800, 1344
    kw = dict(cfg, pad_shape=(H, W), pos_scale=0.2, num_classes=80,
              scale_ranges=((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)))
    g = torch.Generator().manual_seed(7)
    masks = [random_masks(g, 15, H, W) for _ in range(2)]
    labels = [torch.randint(0, 80, (15,), generator=g) for _ in range(2)]
    return masks, labels, kw


@needs_cpp
@pytest.mark.parametrize("cfg", [dict(SOLO), dict(SOLOV2)], ids=["solo", "solov2"])
def test_full_size_scenes(cfg):
    """Two images at the benchmark size, 800×1344 with 15 instances each."""
    masks, labels, kw = full_size_scenes(cfg)
    got = ops.center_region_assign_batch(masks, labels, backend="cpu", **kw)
    for m, l, t in zip(masks, labels, got):
        assert_same(t, ops.center_region_assign(m, l, backend="reference", **kw), level_strides(kw))


@needs_cpp
def test_non_contiguous_masks_int32_labels_half_boxes():
    g = torch.Generator().manual_seed(4)
    masks = random_masks(g, 6, 96, 64).transpose(1, 2)  # [6, 64, 96], not contiguous
    assert not masks.is_contiguous()
    labels = torch.randint(0, 7, (6,), generator=g, dtype=torch.int32)
    boxes = (torch.rand(6, 4, generator=g) * 40).sort(1).values.half()  # x1 <= y1 <= x2 <= y2
    cfg = dict(CONFIGS["solo_64x96"], pos_scale=0.2, num_classes=7)
    for b in (None, boxes, boxes.bfloat16()):
        want = ops.center_region_assign(masks, labels, b, backend="reference", **cfg)
        assert_same(ops.center_region_assign(masks, labels, b, backend="cpu", **cfg), want, level_strides(cfg))
        assert_same(ops.center_region_assign(masks.bool(), labels, b, backend="cpu", **cfg), want, level_strides(cfg))


@needs_cpp
def test_no_instances_and_no_candidates():
    cfg = dict(CONFIGS["solo_64x96"], pos_scale=0.2, num_classes=5)
    for masks in (torch.zeros(0, 64, 96, dtype=torch.uint8), torch.zeros(3, 64, 96, dtype=torch.bool)):
        labels = torch.zeros(masks.shape[0], dtype=torch.int64)
        for backend in ("reference", "cpu"):
            t = ops.center_region_assign(masks, labels, backend=backend, **cfg)
            for lvl, S in enumerate(cfg["num_grids"]):
                assert torch.equal(t.labels[lvl], torch.full((S, S), 5, dtype=torch.int64))
                assert t.pos_cells[lvl].dtype == torch.int64 and t.pos_cells[lvl].numel() == 0
                assert t.pos_instance[lvl].dtype == torch.int64 and t.pos_instance[lvl].numel() == 0
                stride = cfg["mask_stride"][lvl]
                assert t.mask_targets[lvl].shape == (masks.shape[0], 64 // stride, 96 // stride)
                assert t.mask_targets[lvl].dtype == torch.uint8 and not t.mask_targets[lvl].any()


# --------------------------------------------------------------------------------------
# Hand-built scenes: the expected cells are counted by hand (see each comment).
# One level, a 4×4 grid over a 64×64 image: cells are 16×16 pixels.
# --------------------------------------------------------------------------------------
BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpp)]
HAND = dict(pad_shape=(64, 64), num_grids=[4], scale_ranges=[(1, 1000)], num_classes=3, mask_stride=4)


def square(r0, r1, c0, c1):
    m = torch.zeros(64, 64, dtype=torch.uint8)
    m[r0 : r1 + 1, c0 : c1 + 1] = 1
    return m


def assign(backend, masks, labels, pos_scale):
    t = ops.center_region_assign(torch.stack(masks), torch.tensor(labels), backend=backend, pos_scale=pos_scale, **HAND)
    return t.pos_cells[0].tolist(), t.pos_instance[0].tolist(), t.labels[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_object_centred_in_a_cell(backend):
    # rows 20..27, cols 36..43: centre (23.5, 39.5) -> cell (1, 2); h = w = 8 and
    # 0.5*8*0.2 = 0.8 keeps (23.5 ± 0.8) / 16 and (39.5 ± 0.8) / 16 in the same cell.
    cells, inst, labels = assign(backend, [square(20, 27, 36, 43)], [2], 0.2)
    assert cells == [1 * 4 + 2] and inst == [0]
    expected = torch.full((4, 4), 3, dtype=torch.int64)
    expected[1, 2] = 2
    assert torch.equal(labels, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_object_on_a_cell_boundary(backend):
    # rows 28..36, cols 8..16: centre (32, 12) on the boundary of rows 1 and 2; h = w = 9,
    # 0.5*9*0.2 = 0.9: rows floor(31.1/16) = 1 .. floor(32.9/16) = 2, column 0 only.
    cells, inst, _ = assign(backend, [square(28, 36, 8, 16)], [1], 0.2)
    assert cells == [4, 8] and inst == [0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_ring_centre_outside_mask(backend):
    # A square ring (outer rows 24..55 × cols 8..39, hole rows 28..51 × cols 12..35): its
    # centre of mass (39.5, 23.5) lies in the hole, in cell (2, 1). With pos_scale 1 the
    # half extent is 16 px, so the box region spans rows 1..3 and cols 0..2, which is also
    # the ±1-cell limit around (2, 1): a full 3×3 block.
    ring = square(24, 55, 8, 39)
    ring[28:52, 12:36] = 0
    assert ring[39, 23] == 0
    cells, inst, _ = assign(backend, [ring], [0], 1.0)
    assert cells == [4, 5, 6, 8, 9, 10, 12, 13, 14] and inst == [0] * 9
    # pos_scale 0.2: half extent 3.2 px, (39.5 ± 3.2) / 16 and (23.5 ± 3.2) / 16 stay in (2, 1).
    cells, _, _ = assign(backend, [ring], [0], 0.2)
    assert cells == [9]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_overlap_later_instance_wins(backend):
    # A: rows/cols 16..31, centre (23.5, 23.5), half extent 8: rows/cols 0..1 -> {0, 1, 4, 5}.
    # B: rows/cols 24..39, centre (31.5, 31.5) in cell (1, 1), half extent 8: rows/cols
    # floor(23.5/16) = 1 .. floor(39.5/16) = 2 -> {5, 6, 9, 10}. Cell 5 goes to the later one.
    a, b = square(16, 31, 16, 31), square(24, 39, 24, 39)
    cells, inst, labels = assign(backend, [a, b], [2, 0], 1.0)
    assert cells == [0, 1, 4, 5, 6, 9, 10]
    assert inst == [0, 0, 0, 1, 1, 1, 1]
    assert labels[1, 1] == 0 and labels[0, 0] == 2
    cells, inst, labels = assign(backend, [b, a], [0, 2], 1.0)
    assert cells == [0, 1, 4, 5, 6, 9, 10]
    assert inst == [1, 1, 1, 1, 0, 0, 0]
    assert labels[1, 1] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_mask_targets(backend):
    # Stride 4, half-pixel centres: output (0, 0) averages rows 1..2 × cols 1..2 with
    # weights 1/4 each, and >= 0.5 needs two of those four pixels.
    m = torch.zeros(3, 64, 64, dtype=torch.uint8)
    m[0, 1, 1] = m[0, 2, 2] = 1  # two of four: 0.5 -> on
    m[1, 1, 1] = 1  # one of four: 0.25 -> off
    m[1, 0, 0] = m[1, 3, 3] = m[1, 0, 3] = 1  # never sampled
    m[2, 4:8, 8:12] = 1  # fills the taps of output (1, 2) only
    t = ops.center_region_assign(m, torch.zeros(3, dtype=torch.int64), backend=backend, pos_scale=0.2, **HAND)
    out = t.mask_targets[0]
    assert out.shape == (3, 16, 16)
    assert out[0].nonzero().tolist() == [[0, 0]]
    assert not out[1].any()
    assert out[2].nonzero().tolist() == [[1, 2]]


@needs_cpp
def test_downsampling_matches_interpolate_on_noise():
    """Every stride that divides the size, dense random 0/1 masks: the integer taps of the
    kernel against F.interpolate(bilinear, align_corners=False) >= 0.5 directly."""
    g = torch.Generator().manual_seed(3)
    H, W = 60, 120
    masks = (torch.rand(4, H, W, generator=g) < 0.5).to(torch.uint8)
    strides = [1, 2, 3, 4, 5, 6, 10, 12]
    t = ops.center_region_assign(
        masks, torch.zeros(4, dtype=torch.int64), backend="cpu", pad_shape=(H, W), num_grids=[3] * len(strides),
        scale_ranges=[(0, 1e9)] * len(strides), num_classes=1, mask_stride=strides,
    )
    for s, got in zip(strides, t.mask_targets):
        want = F.interpolate(masks[None].float(), size=(H // s, W // s), mode="bilinear", align_corners=False)[0]
        assert torch.equal(got, (want >= 0.5).to(torch.uint8)), s


# --------------------------------------------------------------------------------------
# Contract: dispatch, bad input, inputs untouched, the registered op
# --------------------------------------------------------------------------------------
@needs_cpp
def test_auto_picks_the_compiled_op():
    assert ops.available_backends("center_region_assign", "cpu")[:2] == ("reference", "cpu")
    import solo_fast._backend as backend

    assert backend.resolve("center_region_assign", "auto", "cpu")[0] == "cpu"
    with pytest.raises(BackendUnavailableError):
        ops.center_region_assign(
            torch.zeros(0, 64, 64, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), backend="triton",
            pos_scale=0.2, **HAND,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_value_error(backend):
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    labels = torch.tensor([0, 1])
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]])
    call = lambda *a, **kw: ops.center_region_assign(*a, backend=backend, **{**HAND, **kw})  # noqa: E731
    bad = [
        ((masks[0], labels), {}, "3-D"),
        ((masks[:, :32], labels), {}, "pad_shape"),
        ((masks, torch.tensor([0, 3])), {}, "gt_labels"),
        ((masks, torch.tensor([-1, 0])), {}, "gt_labels"),
        ((masks, labels, torch.tensor([[10.0, 0, 5, 10], [5, 5, 20, 20]])), {}, "x2 >= x1"),
        ((masks, labels[:1]), {}, "gt_labels"),
        ((masks, labels, boxes[:1]), {}, "gt_boxes"),
        ((masks, labels), dict(num_grids=[4, 3]), "scale_ranges"),
        ((masks, labels), dict(mask_stride=[4, 8]), "mask_stride"),
        ((masks, labels), dict(mask_stride=5), "mask_stride"),
        ((masks.float(), labels), {}, "dtype"),
    ]
    for args, kw, needle in bad:
        with pytest.raises(ValueError, match=needle):
            call(*args, pos_scale=0.2, **kw)
    batch = lambda *a, **kw: ops.center_region_assign_batch(*a, backend=backend, pos_scale=0.2, **{**HAND, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="gt_labels"):
        batch([masks, masks], [labels])
    with pytest.raises(ValueError, match="gt_boxes"):
        batch([masks], [labels], [boxes, boxes])
    with pytest.raises(ValueError, match=r"gt_labels\[1\]"):
        batch([masks, masks], [labels, torch.tensor([0, 9])])
    with pytest.raises(ValueError, match="scale_ranges"):
        batch([masks], [labels], num_grids=[4, 4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_not_modified(backend):
    masks, labels, boxes, _ = random_scene(11, 64, 96)
    while masks.shape[0] == 0 or boxes is None:
        masks, labels, boxes, _ = random_scene(int(torch.randint(0, 10**6, (1,))), 64, 96)
    boxes = boxes.float()  # float32 boxes are converted inside: the caller's copy must not be
    before = (masks.clone(), labels.clone(), boxes.clone())
    cfg = dict(CONFIGS["solo_64x96"], pos_scale=0.2, num_classes=7)
    ops.center_region_assign(masks, labels, boxes, backend=backend, **cfg)
    ops.center_region_assign_batch([masks], [labels.int()], [boxes], backend=backend, **cfg)
    for a, b in zip((masks, labels, boxes), before):
        assert a.dtype == b.dtype and torch.equal(a, b)


@needs_cpp
def test_opcheck():
    masks, labels, _, _ = random_scene(5, 64, 96)
    masks2 = random_masks(torch.Generator().manual_seed(1), 3, 64, 96)
    args = (
        [masks, masks2],
        [labels, torch.tensor([0, 1, 2])],
        [None, torch.tensor([[0.0, 0, 30, 20], [1, 2, 3, 4], [10, 10, 60, 60]], dtype=torch.float64)],
        [40, 12],
        [1.0, 8.0],
        [24.0, 4096.0],
        0.2,
        7,
        [4, 16],
    )
    # All default checks, test_aot_dispatch_dynamic included: the fake's dynamic sizes
    # for pos_cells / pos_instance must trace.
    result = torch.library.opcheck(torch.ops.solo_fast.center_region_assign.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


# --------------------------------------------------------------------------------------
# CUDA (skipped without a device)
# --------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cuda_matches_reference(name):
    assert "cuda" in ops.available_backends("center_region_assign", "cuda")
    cfg = CONFIGS[name]
    H, W = cfg["pad_shape"]
    scenes = [random_scene(2000 + s, H, W) for s in range(40)]
    for pos_scale in (0.2, 1.0):
        kw = dict(cfg, pos_scale=pos_scale, num_classes=7)
        cuda = [(m.cuda(), l.cuda(), None if b is None else b.cuda()) for m, l, b, _ in scenes]
        got = ops.center_region_assign_batch(*map(list, zip(*cuda)), backend="cuda", **kw)
        for (m, l, b, _), g in zip(scenes, got):
            want = ops.center_region_assign(m, l, b, backend="reference", **kw)
            assert g.labels[0].is_cuda
            g = type(g)(*[[x.cpu() for x in field] for field in g])
            for lvl in range(len(want.labels)):
                for field in ("labels", "pos_cells", "pos_instance", "mask_targets"):
                    assert torch.equal(getattr(g, field)[lvl], getattr(want, field)[lvl]), (field, lvl)


@pytest.mark.cuda
def test_cuda_full_size_batch():
    masks, labels, kw = full_size_scenes(SOLO)
    got = ops.center_region_assign_batch([m.cuda() for m in masks], [l.cuda() for l in labels], backend="cuda", **kw)
    for m, l, t in zip(masks, labels, got):
        want = ops.center_region_assign(m, l, backend="reference", **kw)
        for field in ("labels", "pos_cells", "pos_instance", "mask_targets"):
            for a, b in zip(getattr(t, field), getattr(want, field)):
                assert torch.equal(a.cpu(), b)


def test_batch_errors_name_the_image():
    """Values of a batch are checked at once; an error still names the image at fault."""
    kw = dict(pad_shape=(8, 8), num_grids=[2], scale_ranges=[(1, 100)], num_classes=3, mask_stride=2)
    masks = [torch.ones(1, 8, 8, dtype=torch.uint8)] * 3
    good, bad = torch.tensor([1]), torch.tensor([3])
    assert len(ops.center_region_assign_batch(masks, [good, good, good], **kw)) == 3
    with pytest.raises(ValueError, match=r"gt_labels\[2\].*\[0, 3\)"):
        ops.center_region_assign_batch(masks, [good, good, bad], **kw)
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([[5.0, 0.0, 2.0, 8.0]]), None]
    with pytest.raises(ValueError, match=r"gt_boxes\[1\].*x2 >= x1"):
        ops.center_region_assign_batch(masks, [good] * 3, boxes, **kw)
    boxes[1] = torch.tensor([[0.0, float("nan"), 8.0, 8.0]])
    with pytest.raises(ValueError, match=r"gt_boxes\[1\].*finite"):
        ops.center_region_assign_batch(masks, [good] * 3, boxes, **kw)
