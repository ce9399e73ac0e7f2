"""deform_conv2d (modulated deformable convolution, DCNv2): the reference against conv2d and
hand-computed samples, the fast paths ("cpu": the C++ op; "triton": the Triton kernels, in
the interpreter on CPU tensors or on a GPU) against the reference, forward and backward.

Tolerances. The "cpu" path samples the columns with the reference's formulas in the
reference's order of operations (csrc/common/deform_conv.h, no FMA contraction), so the
columns are bit-identical and only the GEMM's summation order (chunked, grouped) differs:
fp64 within 1e-12 relative, fp32 within 1e-5 (the K = C*KH*KW <= ~100 sums here keep the
observed error near 2e-7). The Triton path sums in BLOCK_K chunks of channels per tap,
and its backward adds with atomics (any order): the same 1e-5 in fp32, 1e-12 in fp64.
fp16/bf16 on the "cpu" path are computed in fp32 like the reference and rounded once:
equal up to one rounding of the output (atol/rtol of one ulp of the dtype).
"""
import pytest
import torch
import torch.nn.functional as F

from solo_fast import _ext, ops
from solo_fast.ops import _deform_conv, reference

from helpers import available, device_backends, no_tf32, on, triton_devices

pytestmark = pytest.mark.usefixtures("one_thread")

OP = "deform_conv2d"
FAST = available(OP, among=("cpu", "triton"))
DEVICE_BACKENDS = device_backends(OP, among=("cpu", "triton"))
ALL_BACKENDS = device_backends(OP, among=("reference", "cpu", "triton"))
CPU_ONLY = pytest.mark.skipif("cpu" not in FAST, reason="solo_fast._C (the compiled CPU ops) is not built")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.fixture(autouse=True)
def _full_fp32():
    with no_tf32():
        yield


def make(b, c, h, w, o, k=(3, 3), *, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, offset_groups=1,
         scale=2.0, dtype=torch.float64, bias=True, mask=True, device="cpu", grad=False):
    """x, offset, mask, weight, bias drawn on the CPU (then moved), with fractional offsets of std ``scale``."""
    kh, kw = k
    ho, wo = _deform_conv.output_size((h, w), k, stride, padding, dilation)
    t = [
        torch.randn(b, c, h, w, dtype=dtype),
        torch.randn(b, 2 * offset_groups * kh * kw, ho, wo, dtype=dtype) * scale,
        torch.rand(b, offset_groups * kh * kw, ho, wo, dtype=dtype) if mask else None,
        torch.randn(o, c // groups, kh, kw, dtype=dtype),
        torch.randn(o, dtype=dtype) if bias else None,
    ]
    return [None if v is None else v.to(device).requires_grad_(grad) for v in t]


def kw_of(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, offset_groups=1):
    return dict(stride=stride, padding=padding, dilation=dilation, groups=groups, offset_groups=offset_groups)


def tap_offsets(b, offset_groups, k, ho, wo, dy, dx, dtype=torch.float64):
    """offset [B, 2*G*K, Ho, Wo] with the same (dy, dx) at every tap and pixel."""
    off = torch.empty(b, offset_groups * k, 2, ho, wo, dtype=dtype)
    off[:, :, 0], off[:, :, 1] = dy, dx
    return off.reshape(b, 2 * offset_groups * k, ho, wo)


# --------------------------------------------------------------------------------------------- the function
@pytest.mark.skipif(not _ext.available(), reason="solo_fast._C is not built")
def test_backends_registered():  # a built _C registers the C++ op
    assert "cpu" in ops.available_backends(OP, "cpu")
    assert "triton" in FAST, "the conftest runs Triton in the interpreter on CPU tensors"


CONV_CASES = [
    kw_of(),
    kw_of(stride=(2, 2)),
    kw_of(dilation=(2, 2), padding=(2, 2)),
    kw_of(groups=2, offset_groups=2),
    kw_of(stride=(2, 1), padding=(0, 2), dilation=(1, 2), groups=2, offset_groups=4),
]


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=range(len(CONV_CASES)))
def test_zero_offsets_unit_mask_is_conv2d(device, backend, case):
    x, off, _, w, b = make(2, 4, 7, 9, 6, **case, device=device)
    off = torch.zeros_like(off)
    m = torch.ones(off.shape[0], off.shape[1] // 2, *off.shape[2:], dtype=off.dtype, device=device)
    y = ops.deform_conv2d(x, off, m, w, b, **case, backend=backend)
    ref = F.conv2d(x, w, b, stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                   groups=case["groups"])
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, **TOL[torch.float64])
    # mask=None means all ones
    torch.testing.assert_close(ops.deform_conv2d(x, off, None, w, b, **case, backend=backend), ref,
                               **TOL[torch.float64])


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dy,dx", [(1, -1), (-3, 2), (0, 5), (12, 0)])
def test_integer_offsets_are_a_shifted_conv(device, backend, dy, dx):
    # Every tap moved by (dy, dx) == conv2d of the zero-padded input shifted by (dy, dx)
    # (the zeros come from x's border, not from the conv's own padding).
    x, _, _, w, b = make(2, 4, 7, 9, 6, groups=2, device=device)
    off = tap_offsets(2, 1, 9, 7, 9, dy, dx).to(device)
    y = ops.deform_conv2d(x, off, None, w, b, padding=1, groups=2, backend=backend)
    p = 13
    xp = F.pad(x, (p, p, p, p))[:, :, p - 1 + dy:p - 1 + dy + 9, p - 1 + dx:p - 1 + dx + 11]
    torch.testing.assert_close(y, F.conv2d(xp, w, b, groups=2), **TOL[torch.float64])


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_samples_at_the_border(device, backend):
    # 1x1 kernel, one channel, weight 1: y is the sample itself. Rows H = 4, W = 5.
    x = (torch.arange(20, dtype=torch.float64).reshape(1, 1, 4, 5) + 1).to(device)
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64, device=device)

    def sample(dy, dx):
        off = tap_offsets(1, 1, 1, 4, 5, dy, dx).to(device)
        return ops.deform_conv2d(x, off, None, w, backend=backend)[0, 0]

    # Half a pixel above row 0: only the lower corners are inside (weight 1/2 each row);
    # exactly one pixel above (h = -1) is outside the sampling region: 0.
    torch.testing.assert_close(sample(-0.5, 0.0)[0], 0.5 * x[0, 0, 0])
    torch.testing.assert_close(sample(-1.0, 0.0)[0], torch.zeros(5, dtype=torch.float64, device=device))
    # Half a pixel right of the last column: 0.5 * x[:, W-1]; at w = W (and beyond): 0.
    torch.testing.assert_close(sample(0.0, 0.5)[:, 4], 0.5 * x[0, 0, :, 4])
    torch.testing.assert_close(sample(0.0, 1.0)[:, 4], torch.zeros(4, dtype=torch.float64, device=device))
    # Far outside everywhere: exactly 0; just inside (-1 < h < 0 at the corner): one corner.
    assert sample(-100.0, 7.5).abs().max() == 0
    v = sample(-0.75, -0.75)[0, 0]
    torch.testing.assert_close(v, 0.25 * 0.25 * x[0, 0, 0, 0])
    # Fractional inside: the bilinear mix of four pixels.
    v = sample(0.25, 0.5)[1, 2]
    want = 0.75 * 0.5 * (x[0, 0, 1, 2] + x[0, 0, 1, 3]) + 0.25 * 0.5 * (x[0, 0, 2, 2] + x[0, 0, 2, 3])
    torch.testing.assert_close(v, want)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_mask_scales_each_sample(device, backend):
    x, off, m, w, b = make(1, 4, 6, 5, 3, offset_groups=2, device=device)
    y0 = ops.deform_conv2d(x, off, None, w, None, padding=1, offset_groups=2, backend=backend)
    y2 = ops.deform_conv2d(x, off, torch.full_like(m, 2.0), w, None, padding=1, offset_groups=2, backend=backend)
    torch.testing.assert_close(y2, 2 * y0, **TOL[torch.float64])
    ya = ops.deform_conv2d(x, off, torch.zeros_like(m), w, b, padding=1, offset_groups=2, backend=backend)
    torch.testing.assert_close(ya, b.view(1, -1, 1, 1).expand_as(ya))


def test_reference_against_torchvision():
    tv = pytest.importorskip("torchvision")
    for case in CONV_CASES:
        x, off, m, w, b = make(2, 4, 7, 9, 6, **case)
        y = reference.deform_conv2d(x, off, m, w, b, **case)
        want = tv.ops.deform_conv2d(x, off, w, b, stride=case["stride"], padding=case["padding"],
                                    dilation=case["dilation"], mask=m)
        torch.testing.assert_close(y, want, **TOL[torch.float64])


# ------------------------------------------------------------------------------------------ fast paths
PARITY_CASES = [
    (dict(b=2, c=4, h=7, w=9, o=6), kw_of()),
    (dict(b=1, c=4, h=9, w=8, o=4), kw_of(stride=(2, 2))),
    (dict(b=1, c=4, h=9, w=8, o=4), kw_of(dilation=(2, 2), padding=(2, 2))),
    (dict(b=2, c=4, h=6, w=7, o=6), kw_of(groups=2, offset_groups=2)),
    (dict(b=1, c=6, h=5, w=11, o=4, k=(1, 1)), kw_of(padding=(0, 0), offset_groups=3)),
    (dict(b=1, c=6, h=7, w=5, o=3, k=(3, 2)), kw_of(stride=(1, 2), padding=(2, 0), dilation=(2, 1), offset_groups=6)),
    (dict(b=1, c=4, h=1, w=1, o=2), kw_of()),
    # 6 channels, groups 2 (3 each) and offset groups 3 (2 each): an offset group spans two conv groups
    (dict(b=1, c=6, h=5, w=6, o=4, bias=False, mask=False), kw_of(groups=2, offset_groups=3)),
]


def _fwd_bwd(args, case, backend):
    x, off, m, w, b = args
    y = ops.deform_conv2d(x, off, m, w, b, **case, backend=backend)
    leaves = [t for t in args if t is not None]
    return y, leaves


def check_parity(device, backend, size, case, dtype):
    size = dict(size)
    args = make(**size, **case, dtype=dtype, grad=True)  # on the CPU, the reference's inputs
    dev_args = [None if t is None else t.detach().to(device).requires_grad_() for t in args]
    ref, leaves = _fwd_bwd(args, case, "reference")
    y, dev_leaves = _fwd_bwd(dev_args, case, backend)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y.cpu(), ref, **TOL[dtype])
    gy = torch.randn_like(ref)
    want = torch.autograd.grad(ref, leaves, gy)
    got = torch.autograd.grad(y, dev_leaves, gy.to(device))
    names = [n for n, t in zip(("x", "offset", "mask", "weight", "bias"), args) if t is not None]
    for name, g, r in zip(names, got, want):
        # relative to the gradient's scale: its entries are sums of O*K products
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(g.cpu() / scale, r / scale, **TOL[dtype], msg=lambda s: f"grad {name}: {s}")


@pytest.mark.parametrize("device,backend", [p for p in DEVICE_BACKENDS if p.values[1] == "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size,case", PARITY_CASES, ids=range(len(PARITY_CASES)))
def test_cpu_matches_reference(device, backend, size, case, dtype):
    check_parity(device, backend, size, case, dtype)


@CPU_ONLY
@pytest.mark.parametrize("threads", ["0", None])
def test_cpu_small_chunks_and_threads(monkeypatch, threads):
    # Chunks of 5 pixels (the last one partial, several per image) and, with
    # SOLO_FAST_CPU_PARALLEL_WORK=0, every region on the thread pool: same numbers.
    monkeypatch.setattr(_deform_conv, "column_chunk", lambda *a, **k: 5)
    if threads is not None:
        monkeypatch.setenv("SOLO_FAST_CPU_PARALLEL_WORK", threads)
    torch.set_num_threads(2)
    try:
        check_parity("cpu", "cpu", dict(b=2, c=4, h=6, w=7, o=6), kw_of(groups=2, offset_groups=2), torch.float64)
    finally:
        torch.set_num_threads(1)


# More than one tile along the kernels' blocked dimensions (interpreter blocks 64/32/16):
# 72 pixels, 33 input and 35 output channels per group, so program offsets, partial tiles
# and multi-chunk accumulation run here too -- in the forward and data kernels on every
# axis; the weight kernel's 64 output channels per program stay one tile.
MULTI_TILE = (dict(b=1, c=66, h=9, w=8, o=70), kw_of(groups=2, offset_groups=3))
# fp32 on the shapes that exercise the kernels' tiling and group logic, fp64 once (the
# interpreter is slow).
TRITON_CASES = ([PARITY_CASES[i] + (torch.float32,) for i in (0, 3, 4, 5, 7)] + [MULTI_TILE + (torch.float32,)]
                + [PARITY_CASES[0] + (torch.float64,)])


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("size,case,dtype", TRITON_CASES, ids=range(len(TRITON_CASES)))
def test_triton_matches_reference(device, size, case, dtype):
    check_parity(device, "triton", size, case, dtype)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(device, backend, dtype):
    x, off, m, w, b = make(1, 4, 6, 7, 5, dtype=dtype, device=device, scale=1.0)
    y = ops.deform_conv2d(x, off, m, w, b, padding=1, backend=backend)
    ref = reference.deform_conv2d(*(t.cpu().float() for t in (x, off, m, w, b)), padding=(1, 1))
    assert y.dtype == dtype
    # "cpu" and the interpreter compute in fp32 and round once; a GPU's tensor cores
    # also round the sampled columns to the dtype.
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * (4 if device == "cuda" else 1)
    torch.testing.assert_close(y.cpu().float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@CPU_ONLY
def test_autocast_follows_conv2d():
    x, off, m, w, b = make(1, 4, 6, 7, 5, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.deform_conv2d(x, off, m, w, b, padding=1, backend="cpu")
        assert F.conv2d(x, w, b, padding=1).dtype == y.dtype == torch.bfloat16
    ref = ops.deform_conv2d(*(t.bfloat16() for t in (x, off, m, w, b)), padding=1, backend="reference")
    torch.testing.assert_close(y, ref, rtol=1.6e-2, atol=1.6e-2 * ref.abs().max().item())


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_empty_batch(device, backend):
    x, off, m, w, b = make(0, 4, 7, 9, 6, stride=(2, 2), device=device, grad=True)
    y = ops.deform_conv2d(x, off, m, w, b, stride=2, padding=1, backend=backend)
    assert y.shape == (0, 6, 4, 5)
    gx, goff, gm, gw, gb = torch.autograd.grad(y.sum(), [x, off, m, w, b])
    assert gx.shape == x.shape and goff.shape == off.shape and gm.shape == m.shape
    assert gw.abs().max() == 0 and gb.abs().max() == 0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck(backend):
    if backend not in ops.available_backends(OP, "cpu"):
        pytest.skip(f"{backend} is not available")
    # Offsets away from integers: the bilinear weights are piecewise linear in them and the
    # finite differences must not straddle a kink.
    x, off, m, w, b = make(1, 4, 5, 6, 4, groups=2, offset_groups=2, grad=True)
    with torch.no_grad():
        off.copy_(torch.floor(off) + 0.25 + 0.5 * torch.rand_like(off))
    fn = lambda *a: ops.deform_conv2d(*a, padding=1, groups=2, offset_groups=2, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, off, m, w, b))


@pytest.mark.parametrize("device", triton_devices())
def test_gradcheck_triton(device):
    x, off, m, w, b = make(1, 2, 4, 4, 2, device=device, grad=True)
    with torch.no_grad():
        off.copy_(torch.floor(off) + 0.25 + 0.5 * torch.rand_like(off))
    fn = lambda *a: ops.deform_conv2d(*a, padding=1, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, off, m, w, b), fast_mode=True)


@CPU_ONLY
def test_opcheck_cpp():
    x, off, m, w, b = make(2, 4, 5, 6, 6, groups=2, offset_groups=2, grad=True)
    args = [1, 1], [1, 1], [1, 1], 2, 2
    torch.library.opcheck(torch.ops.solo_fast.deform_conv2d_forward.default, (x, off, m, w, b, *args, 7))
    torch.library.opcheck(torch.ops.solo_fast.deform_conv2d_forward.default, (x, off, m, w, None, *args, 100))
    g = torch.randn(2, 6, 5, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.solo_fast.deform_conv2d_backward.default,
                          (g, x.detach(), off.detach(), m.detach(), w.detach(), *args, 7))


@pytest.mark.parametrize("device", triton_devices())
def test_opcheck_triton(device):
    x, off, m, w, b = make(1, 2, 4, 5, 2, device=device, grad=True)
    torch.library.opcheck(_deform_conv._triton_op(), (x, off, m, w, b, [1, 1], [1, 1], [1, 1], 1, 1))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_inputs_not_modified(device, backend):
    args = make(1, 4, 5, 6, 4, device=device)
    before = [t.clone() for t in args]
    ops.deform_conv2d(*args, padding=1, backend=backend)
    for t, t0 in zip(args, before):
        assert torch.equal(t, t0)


def test_auto_picks_cpu_path():
    if "cpu" not in FAST:
        pytest.skip("no compiled op")
    from solo_fast._backend import resolve

    assert resolve(OP, "auto", "cpu")[0] == "cpu"


# ----------------------------------------------------------------------------------------- bad input
def _good():
    x, off, m, w, b = make(1, 4, 5, 6, 4, dtype=torch.float32)
    return dict(x=x, offset=off, mask=m, weight=w, bias=b)


BAD = [
    (dict(x=torch.randn(4, 5, 6)), "x: expected a 4-D tensor"),
    (dict(x=torch.randint(0, 3, (1, 4, 5, 6))), "x: expected dtype"),
    (dict(offset=torch.randn(1, 9, 5, 6)), r"offset: expected shape \(1, 18, 5, 6\)"),
    (dict(offset=torch.randn(1, 18, 4, 6)), r"offset: expected shape \(1, 18, 5, 6\)"),
    (dict(mask=torch.randn(1, 18, 5, 6)), r"mask: expected shape \(1, 9, 5, 6\)"),
    (dict(weight=torch.randn(4, 3, 3, 3)), "weight: expected 4 input channels per group"),
    (dict(bias=torch.randn(5)), "bias: expected 4 entries"),
    (dict(bias=torch.randn(4, dtype=torch.float64)), "bias: expected the dtype of x"),
    (dict(offset=torch.randn(1, 18, 5, 6, dtype=torch.float64)), "offset: expected the dtype of x"),
    (dict(kw=dict(stride=0)), "stride: expected a positive int"),
    (dict(kw=dict(stride=(1, 2, 3))), "stride: expected a positive int"),
    (dict(kw=dict(dilation=(1, 0))), "dilation: expected a positive int"),
    (dict(kw=dict(padding=-1)), "padding: expected a non-negative int"),
    (dict(kw=dict(padding=1.0)), "padding: expected a non-negative int"),
    (dict(kw=dict(groups=3)), "groups: expected a divisor of x's 4 channels"),
    (dict(kw=dict(groups=0)), "groups: expected a positive int"),
    (dict(kw=dict(offset_groups=3)), "offset_groups: expected a divisor"),
    (dict(kw=dict(offset_groups=True)), "offset_groups: expected a positive int"),
    (dict(x=torch.randn(1, 4, 1, 1), kw=dict(padding=0)), "gives no output pixel"),
    (dict(kw=dict(backend="nope")), "backend: expected one of"),
]


@pytest.mark.parametrize("bad,match", BAD, ids=[m for _, m in BAD])
def test_bad_input(bad, match):
    args = _good()
    kw = dict(padding=1)
    kw.update(bad.pop("kw", {}))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ops.deform_conv2d(args["x"], args["offset"], args["mask"], args["weight"], args["bias"], **kw)


def test_bad_groups_for_output_channels():
    x, off, m, _, _ = make(1, 4, 5, 6, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="groups: expected a divisor of weight's 3 output channels"):
        ops.deform_conv2d(x, off, m, torch.randn(3, 2, 3, 3), padding=1, groups=2)


def test_devices_must_match():
    a = _good()
    with pytest.raises(ValueError, match="one device"):
        ops.deform_conv2d(a["x"], a["offset"], a["mask"].to("meta"), a["weight"], padding=1)


# ---------------------------------------------------------------------------------------- memory bound
def test_column_chunk():
    # Cin=256, 3x3, fp32: 9216 B of columns + 9 * 85 B of corner table per pixel.
    per_pixel = 256 * 9 * 4 + 9 * _deform_conv.table_bytes(4)
    assert per_pixel == 9981
    assert _deform_conv.column_chunk(256, 9, 40000, 4, budget=16 << 20) == (16 << 20) // per_pixel == 1680
    assert _deform_conv.column_chunk(256, 9, 40000, 4) == _deform_conv.COLUMN_BUDGET_BYTES // per_pixel
    assert _deform_conv.column_chunk(256, 9, 100, 4) == 100  # never more than the pixels
    assert _deform_conv.column_chunk(100000, 9, 50, 8, budget=1024) == 1  # at least one
    assert _deform_conv.column_chunk(4, 1, 0, 4) == 1
    # one channel: the table, not the columns, bounds the chunk
    assert _deform_conv.column_chunk(1, 9, 10 ** 8, 4, budget=1 << 20) == (1 << 20) // (9 * (4 + 85))


@CPU_ONLY
def test_cpu_forward_never_allocates_the_column_matrix():
    # The full columns of Cin=256, 3x3 at 200x200 would be 256*9*40000*4 B = 369 MB; the
    # C++ op samples them in chunks of column_chunk(...) pixels into one buffer of at most
    # COLUMN_BUDGET_BYTES. Every allocation through ATen (at::empty inside the op included)
    # is an event of the memory profiler; an event's cpu_memory_usage covers its children,
    # so the largest one bounds every single allocation. (~0.2 s with one thread.)
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, 256, 200, 200)
    off = torch.rand(1, 18, 200, 200) * 2 - 1  # |offset| < 1
    m = torch.rand(1, 9, 200, 200)
    w = torch.randn(4, 256, 3, 3)
    full = 256 * 9 * 200 * 200 * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = ops.deform_conv2d(x, off, m, w, padding=1, backend="cpu")
    assert y.shape == (1, 4, 200, 200)
    events = [e for e in prof.events() if e.name.startswith(("aten::", "solo_fast::"))]
    assert any(e.name == "aten::empty" and e.cpu_memory_usage > 0 for e in events), "no allocation recorded"
    largest = max(e.cpu_memory_usage for e in events)
    assert largest <= _deform_conv.COLUMN_BUDGET_BYTES + y.numel() * 4 < full // 8, (largest, full)
    # The values, on an interior window (taps reach 1 + |offset| < 2 pixels): the reference
    # on a 16x16 crop needs only that crop's columns.
    crop = ops.deform_conv2d(x[:, :, 50:66, 70:86], off[:, :, 50:66, 70:86], m[:, :, 50:66, 70:86], w, padding=1,
                             backend="reference")
    # (fp32 sums over K = 2304 in another order: atol relative to the outputs' scale)
    torch.testing.assert_close(y[:, :, 52:64, 72:84], crop[:, :, 2:14, 2:14], rtol=1e-5,
                               atol=1e-5 * crop.abs().max().item())


def test_fp64_is_left_alone_under_autocast():
    x, off, m, w, b = make(1, 4, 6, 7, 5)  # float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.deform_conv2d(x, off, m, w, b, padding=1)
        conv = torch.nn.functional.conv2d(x, w, b, padding=1)
    assert y.dtype == conv.dtype == torch.float64
    torch.testing.assert_close(y, reference.deform_conv2d(x, off, m, w, b, padding=(1, 1)), atol=1e-12, rtol=0)
