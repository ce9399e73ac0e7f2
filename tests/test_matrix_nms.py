"""matrix_nms: the fast backends ("cpu": C++ popcount, "triton": under TRITON_INTERPRET=1 or
on a GPU) against the reference oracle, hand-built known answers, and bad input."""
import math

import pytest
import torch

import solo_fast.ops as ops
from solo_fast.ops import _matrix_nms, reference

from helpers import TRITON_DEVICE, assert_nms_matches_reference, needs_cpp, needs_triton_on

needs_triton = needs_triton_on(TRITON_DEVICE)
BACKENDS = [
    pytest.param("cpu", "cpu", marks=needs_cpp),
    pytest.param("triton", TRITON_DEVICE, marks=needs_triton),
]


def clustered(n, h, w, *, num_classes=3, num_clusters=4, dtype=torch.bool, dup=True, seed=0):
    """Masks built to overlap: jittered boxes around a few centres, one class per centre,
    a sprinkle of pixel noise, and (``dup``) a few exact duplicates."""
    g = torch.Generator().manual_seed(seed)
    cy = torch.randint(0, h, (num_clusters,), generator=g)
    cx = torch.randint(0, w, (num_clusters,), generator=g)
    cls = torch.randint(0, num_classes, (num_clusters,), generator=g)
    c = torch.randint(0, num_clusters, (n,), generator=g)
    hh = torch.randint(1, max(2, h // 2 + 1), (n,), generator=g)
    ww = torch.randint(1, max(2, w // 2 + 1), (n,), generator=g)
    y0 = (cy[c] - hh // 2 + torch.randint(-2, 3, (n,), generator=g)).clamp(0, h - 1)
    x0 = (cx[c] - ww // 2 + torch.randint(-2, 3, (n,), generator=g)).clamp(0, w - 1)
    ys = torch.arange(h)[None, :, None]
    xs = torch.arange(w)[None, None, :]
    m = (ys >= y0[:, None, None]) & (ys < (y0 + hh)[:, None, None])
    m = m & (xs >= x0[:, None, None]) & (xs < (x0 + ww)[:, None, None])
    m ^= torch.rand(n, h, w, generator=g) < 0.03
    labels = cls[c]
    if dup and n >= 4:
        src = torch.randint(0, n, (n // 4,), generator=g)
        dst = torch.randint(0, n, (n // 4,), generator=g)
        m[dst] = m[src]
        labels[dst] = labels[src]
    scores = torch.rand(n, generator=g) * 0.9 + 0.1
    return m.to(dtype), labels, scores


def run(backend, device, masks, labels, scores, **kw):
    return ops.matrix_nms(masks.to(device), labels.to(device), scores.to(device), backend=backend, **kw)


CASES = [
    # (n, h, w, kwargs)
    (0, 8, 8, {}),
    (1, 5, 7, {}),
    (2, 9, 9, {}),
    (2, 1, 1, {}),
    (3, 4, 3, {"kernel": "linear"}),
    (17, 13, 17, {"sigma": 0.5}),
    (33, 31, 29, {"kernel": "linear", "filter_thr": 0.05}),
    (40, 16, 24, {"sigma": 5.0, "nms_pre": 25, "max_num": 10}),
    (57, 21, 19, {"kernel": "linear", "nms_pre": 50, "filter_thr": 0.3, "max_num": 20}),
    (70, 32, 40, {"filter_thr": 0.1}),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("n,h,w,kw", CASES, ids=[f"n{c[0]}_{c[1]}x{c[2]}_{i}" for i, c in enumerate(CASES)])
def test_parity_with_reference(backend, device, n, h, w, kw):
    masks, labels, scores = clustered(n, h, w, seed=n * 7 + h)
    copies = [t.clone() for t in (masks, labels, scores)]
    ref = ops.matrix_nms(masks, labels, scores, backend="reference", **kw)
    out = run(backend, device, masks, labels, scores, **kw)
    assert_nms_matches_reference(out, ref, kw.get("filter_thr", -1.0))
    for t, c in zip((masks, labels, scores), copies):
        assert torch.equal(t, c), "inputs were modified"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("sigma", [0.5, 2.0, 4.0])
def test_decay_parity_uint8_and_given_area(backend, device, kernel, sigma):
    masks, labels, scores = clustered(45, 24, 35, dtype=torch.uint8, seed=int(sigma * 10))
    area = masks.reshape(45, -1).sum(1)
    kw = dict(kernel=kernel, sigma=sigma, mask_area=area)
    ref = ops.matrix_nms(masks, labels, scores, backend="reference", **kw)
    out = run(backend, device, masks, labels, scores, **{**kw, "mask_area": area.to(device)})
    assert_nms_matches_reference(out, ref)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_decay_factors_directly(backend, device, kernel):
    """The N decay factors themselves, with one class (every pair counts) and many classes."""
    decay_fn = {"cpu": _matrix_nms.decay_cpu, "triton": _matrix_nms.decay_triton}[backend]
    for num_classes in (1, 7):
        masks, labels, _ = clustered(60, 20, 22, num_classes=num_classes, num_clusters=3, seed=num_classes)
        area = masks.reshape(60, -1).sum(1)
        ref = reference.matrix_decay(masks, labels, area, kernel, 2.0)
        got = decay_fn(masks.to(device), labels.to(device), area.to(device), kernel, 2.0).cpu()
        assert got.dtype == torch.float32 and got.shape == (60,)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
        assert bool(torch.isfinite(got).all())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ties_keep_input_order(backend, device):
    masks, labels, _ = clustered(24, 12, 12, seed=3)
    scores = torch.tensor([0.5, 0.9, 0.5, 0.7] * 6)
    ref = ops.matrix_nms(masks, labels, scores, backend="reference")
    out = run(backend, device, masks, labels, scores)
    assert_nms_matches_reference(out, ref)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_masks_and_empty_input(backend, device):
    # All-empty masks: union 0, IoU 0, no decay and no NaN.
    masks = torch.zeros(5, 6, 7, dtype=torch.bool)
    labels = torch.zeros(5, dtype=torch.long)
    scores = torch.tensor([0.3, 0.9, 0.2, 0.5, 0.6])
    s, lab, m, k = run(backend, device, masks, labels, scores)
    torch.testing.assert_close(s.cpu(), torch.tensor([0.9, 0.6, 0.5, 0.3, 0.2]))
    assert k.tolist() == [1, 4, 3, 0, 2]
    # Zero-pixel masks: nothing intersects.
    s, _, m, k = run(backend, device, torch.zeros(3, 0, 5, dtype=torch.bool), labels[:3], scores[:3])
    torch.testing.assert_close(s.cpu(), torch.tensor([0.9, 0.3, 0.2]))
    assert k.tolist() == [1, 0, 2] and m.shape == (3, 0, 5)
    # N = 0 returns empty tensors of the right dtypes and shapes.
    s, lab, m, k = run(backend, device, torch.zeros(0, 6, 7, dtype=torch.uint8), torch.zeros(0, dtype=torch.int32),
                       torch.zeros(0, dtype=torch.float16))
    assert (s.dtype, lab.dtype, m.dtype, k.dtype) == (torch.float16, torch.int32, torch.uint8, torch.int64)
    assert s.shape == (0,) and m.shape == (0, 6, 7) and k.shape == (0,)


# --------------------------------------------------------------------------------------
# Known answers, by hand
# --------------------------------------------------------------------------------------
def _boxes_1d(width, spans):
    m = torch.zeros(len(spans), 1, width, dtype=torch.bool)
    for i, (a, b) in enumerate(spans):
        m[i, 0, a:b] = True
    return m


@pytest.mark.parametrize("backend,device", BACKENDS + [pytest.param("reference", "cpu")])
@pytest.mark.parametrize("sigma", [0.5, 2.0, 3.0])
def test_known_answers(backend, device, sigma):
    two = _boxes_1d(8, [(1, 6), (1, 6)])
    same = torch.tensor([2, 2])
    scores = torch.tensor([0.9, 0.8])
    # Identical masks of one class: IoU 1, the lower score decays by exp(-sigma) / to 0.
    s, _, _, k = run(backend, device, two, same, scores, sigma=sigma)
    torch.testing.assert_close(s.cpu(), torch.tensor([0.9, 0.8 * math.exp(-sigma)]), rtol=1e-6, atol=0)
    assert k.tolist() == [0, 1]
    s, _, _, k = run(backend, device, two, same, scores, kernel="linear", sigma=sigma)
    assert s.cpu().tolist() == [pytest.approx(0.9), 0.0] and k.tolist() == [0, 1]
    # The same masks of two classes: no decay.
    s, _, _, _ = run(backend, device, two, torch.tensor([2, 3]), scores, sigma=sigma)
    torch.testing.assert_close(s.cpu(), scores)
    # Compensation: A = [0, 4), B = [2, 6), C = [3, 8), scores A > B > C.
    # iou(A,B) = 2/6, iou(A,C) = 1/8, iou(B,C) = 3/6; comp(B) = 1/3, comp(A) = 0.
    # decay C = min(f(1/8) / f(0), f(1/2) / f(1/3)).
    three = _boxes_1d(8, [(0, 4), (2, 6), (3, 8)])
    lab3 = torch.tensor([1, 1, 1])
    sc3 = torch.tensor([0.9, 0.8, 0.7])
    s, _, _, k = run(backend, device, three, lab3, sc3, sigma=sigma)
    g = lambda x: math.exp(-sigma * x * x)  # noqa: E731
    want = {0: 0.9, 1: 0.8 * g(1 / 3), 2: 0.7 * min(g(1 / 8), g(1 / 2) / g(1 / 3))}
    got = dict(zip(k.tolist(), s.cpu().tolist()))
    assert got == pytest.approx(want, rel=1e-6)
    s, _, _, k = run(backend, device, three, lab3, sc3, kernel="linear")
    want = {0: 0.9, 1: 0.8 * (1 - 1 / 3), 2: 0.7 * min(1 - 1 / 8, (1 - 1 / 2) / (1 - 1 / 3))}
    assert dict(zip(k.tolist(), s.cpu().tolist())) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS + [pytest.param("reference", "cpu")])
def test_linear_duplicates_give_zero_not_nan(backend, device):
    # Three copies: the third's denominator 1 - comp is 0 before the clamp.
    masks = _boxes_1d(10, [(2, 9)] * 3)
    s, _, _, k = run(backend, device, masks, torch.zeros(3, dtype=torch.long), torch.tensor([0.9, 0.8, 0.7]),
                     kernel="linear")
    assert s.cpu().tolist() == [pytest.approx(0.9), 0.0, 0.0] and k.tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------
# Bad input (checked once, in the public wrapper, for every backend)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpp),
                                     pytest.param("triton", marks=needs_triton)])
def test_bad_input_raises_value_error(backend):
    m, lab, sc = clustered(4, 5, 5)
    bad = [
        (dict(masks=m[0]), "masks"),
        (dict(masks=m.float()), "masks"),
        (dict(labels=lab[:3]), "labels"),
        (dict(scores=sc[:2]), "scores"),
        (dict(scores=torch.tensor([0.1, float("nan"), 0.3, 0.4])), "NaN"),
        (dict(kernel="box"), "kernel"),
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=-1.0), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
    ]
    copies = [t.clone() for t in (m, lab, sc)]
    for override, match in bad:
        args = {**dict(masks=m, labels=lab, scores=sc), **override}
        with pytest.raises(ValueError, match=match):
            ops.matrix_nms(args.pop("masks"), args.pop("labels"), args.pop("scores"), backend=backend, **args)
    for t, c in zip((m, lab, sc), copies):
        assert torch.equal(t, c)


# --------------------------------------------------------------------------------------
# Backend plumbing and the C++ op's code paths
# --------------------------------------------------------------------------------------
@needs_cpp
def test_auto_picks_cpu_and_registers_fake():
    assert "cpu" in ops.available_backends("matrix_nms", "cpu")
    masks, labels, scores = clustered(30, 10, 11)
    ref = ops.matrix_nms(masks, labels, scores, backend="reference")
    assert_nms_matches_reference(ops.matrix_nms(masks, labels, scores), ref)
    area = masks.reshape(30, -1).sum(1)
    torch.library.opcheck(torch.ops.solo_fast.matrix_nms_decay_popcount.default, (masks, labels, area, "gaussian", 2.0))
    torch.library.opcheck(torch.ops.solo_fast.matrix_nms_mask_area.default, (masks,))
    assert torch.equal(torch.ops.solo_fast.matrix_nms_mask_area(masks), area)


@needs_cpp
@pytest.mark.parametrize("isa", ["avx512", "popcnt", "generic"])
def test_cpu_isa_paths_agree(monkeypatch, isa):
    """Every runtime-dispatched path (SOLO_FAST_CPU_ISA caps the choice); odd mask sizes hit
    the packing tails (pixels % 64, % 512)."""
    monkeypatch.setenv("SOLO_FAST_CPU_ISA", isa)
    for n, h, w in ((9, 1, 1), (23, 7, 9), (50, 29, 37), (41, 16, 32)):
        for dtype in (torch.bool, torch.uint8):
            masks, labels, _ = clustered(n, h, w, num_classes=2, dtype=dtype, seed=h)
            area = masks.reshape(n, -1).sum(1)
            assert torch.equal(torch.ops.solo_fast.matrix_nms_mask_area(masks), area)
            for kernel in ("gaussian", "linear"):
                ref = reference.matrix_decay(masks, labels, area, kernel, 2.0)
                got = _matrix_nms.decay_cpu(masks, labels, area, kernel, 2.0)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


@needs_cpp
@pytest.mark.parametrize("parallel_work", ["0", None])
def test_cpu_larger_clustered(monkeypatch, parallel_work):
    """More rows than threads x row blocks, one class (all pairs) and many classes; with
    SOLO_FAST_CPU_PARALLEL_WORK=0 every region runs on all intra-op threads."""
    threads = torch.get_num_threads()
    if parallel_work is not None:
        monkeypatch.setenv("SOLO_FAST_CPU_PARALLEL_WORK", parallel_work)
        torch.set_num_threads(max(2, threads))
    try:
        _larger_clustered()
    finally:
        torch.set_num_threads(threads)


def _larger_clustered():
    for num_classes in (1, 20):
        masks, labels, scores = clustered(301, 40, 56, num_classes=num_classes, num_clusters=12, seed=num_classes)
        for kw in ({}, {"kernel": "linear", "filter_thr": 0.05, "max_num": 100}):
            ref = ops.matrix_nms(masks, labels, scores, backend="reference", **kw)
            assert_nms_matches_reference(ops.matrix_nms(masks, labels, scores, backend="cpu", **kw), ref,
                                     kw.get("filter_thr", -1.0))


@needs_triton
def test_triton_every_config_and_split_k():
    """Each intersection config of the autotuner runs (interpreter or GPU), with several
    K splits and masks whose size is not a multiple of 16 (padded copy)."""
    from solo_fast.kernels import matrix_nms as km

    assert km._split_k(70, 31 * 29, 64, 64, 128, 8) > 1
    for h, w in ((31, 29), (16, 32)):
        masks, labels, _ = clustered(70, h, w, num_classes=2, seed=w)
        area = masks.reshape(70, -1).sum(1)
        for kernel in ("gaussian", "linear"):
            ref = reference.matrix_decay(masks, labels, area, kernel, 2.0)
            for cfg in range(len(km._INTER_CONFIGS)):
                got = km.launch_decay(masks.to(TRITON_DEVICE), labels.to(TRITON_DEVICE), area.to(TRITON_DEVICE),
                                      kernel, 2.0, config=cfg).cpu()
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


@needs_triton
@pytest.mark.parametrize("split", [1, 3, 5, 7, 9])
def test_triton_intersections_any_split(split):
    """The intersection kernel alone against a matmul, with grids of more splits than the
    K blocks fill (7 blocks in 5 splits of 2 leaves one split past the end)."""
    from solo_fast.kernels import matrix_nms as km

    n, k = 70, 7 * 128 - 48
    masks = (torch.rand(n, k) < 0.3).to(torch.int8)
    masks[3] = masks[2]
    want = (masks.float() @ masks.float().t()).triu(1).to(torch.int32)
    inter = torch.zeros(n, n, dtype=torch.int32)
    grid = (triton_cdiv(n, 64), triton_cdiv(n, 64), split)
    km._inter_kernel[grid](masks.to(TRITON_DEVICE), inter_dev := inter.to(TRITON_DEVICE), n, k, k, 128, 1024,
                           BLOCK_M=64, BLOCK_N=64, BLOCK_K=128)
    assert torch.equal(inter_dev.cpu(), want)


def triton_cdiv(a, b):
    return (a + b - 1) // b


@needs_triton
def test_triton_op_is_registered():
    masks, labels, _ = clustered(12, 8, 8)
    area = masks.reshape(12, -1).sum(1)
    _matrix_nms.decay_triton(masks.to(TRITON_DEVICE), labels.to(TRITON_DEVICE), area.to(TRITON_DEVICE), "gaussian", 2.0)
    assert hasattr(torch.ops.solo_fast, "matrix_nms_decay")
    got = torch.ops.solo_fast.matrix_nms_decay(masks.to(TRITON_DEVICE), labels.to(TRITON_DEVICE),
                                               area.to(TRITON_DEVICE), "linear", 2.0)
    torch.testing.assert_close(got.cpu(), reference.matrix_decay(masks, labels, area, "linear", 2.0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_auto_and_large():
    masks, labels, scores = clustered(500, 200, 336, num_classes=10, num_clusters=40)
    ref = ops.matrix_nms(masks, labels, scores, backend="reference")
    out = ops.matrix_nms(masks.cuda(), labels.cuda(), scores.cuda())
    assert_nms_matches_reference(out, ref)
