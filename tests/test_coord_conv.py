"""coord_conv2d: fast paths ("cpu", "triton" under the interpreter or on a GPU) vs conv2d over the concatenation.

The parity tests run on every device of ``helpers.DEVICES`` with the fast backends there
("cpu" and "triton" on CPU tensors here, "triton" on CUDA ones); the inputs are drawn on
the CPU and moved, so each device sees the same values.
"""
import pytest
import torch

from solo_fast import ops

from helpers import available, concat_conv, device_backends, no_tf32, triton_devices


pytestmark = pytest.mark.usefixtures("one_thread")

FAST = available("coord_conv2d", among=("cpu", "triton"))
SIZES = {"xy": 2, "x": 1, "y": 1}
DEVICE_BACKENDS = device_backends("coord_conv2d", among=("cpu", "triton"))


@pytest.fixture(autouse=True)
def _full_fp32():
    """CUDA convolutions in fp32, not TF32, for the fp32 tolerances below (no-op on the CPU)."""
    with no_tf32():
        yield


def make(b, c, h, w, o, coords, k=(3, 3), dtype=torch.float32, bias=True, grad=False, device="cpu"):
    """x, weight and bias (or None), drawn on the CPU and moved to ``device``, leaves."""
    x = torch.randn(b, c, h, w, dtype=dtype).to(device).requires_grad_(grad)
    weight = torch.randn(o, c + SIZES[coords], *k, dtype=dtype).to(device).requires_grad_(grad)
    bb = torch.randn(o, dtype=dtype).to(device).requires_grad_(grad) if bias else None
    return x, weight, bb


def test_backends_registered():
    assert "cpu" in ops.available_backends("coord_conv2d", "cpu")
    assert "triton" in FAST, "the conftest runs Triton in the interpreter on CPU tensors"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("coords", ["xy", "x", "y"])
@pytest.mark.parametrize("src", [None, (5, 13), (19, 4)])
@pytest.mark.parametrize("padding", [0, 1])
def test_forward_parity(device, backend, coords, src, padding):
    x, w, b = make(2, 5, 9, 11, 6, coords, device=device)
    y = ops.coord_conv2d(x, w, b, padding=padding, coords=coords, coord_src_size=src, backend=backend)
    ref = concat_conv(x, w, b, padding, coords, src)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("k,padding", [((1, 1), 0), ((3, 5), 2), ((5, 5), 1), ((3, 3), 3)])
def test_kernel_sizes_and_wide_padding(device, backend, k, padding):
    # padding > kernel//2 makes whole output rows/columns see only zero-padded coordinates.
    x, w, b = make(1, 3, 6, 7, 4, "xy", k=k, device=device)
    y = ops.coord_conv2d(x, w, b, padding=padding, backend=backend)
    torch.testing.assert_close(y, concat_conv(x, w, b, padding, "xy", None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("hw", [(1, 1), (1, 8), (7, 1), (2, 2)])
def test_degenerate_maps(device, backend, hw):
    # linspace(-1, 1, 1) == [-1]: a 1-pixel-wide map has x == -1, not 0.
    x, w, b = make(3, 2, *hw, 5, "xy", device=device)
    y = ops.coord_conv2d(x, w, b, padding=1, backend=backend)
    torch.testing.assert_close(y, concat_conv(x, w, b, 1, "xy", None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_no_bias_channels_last_batch(device, backend):
    x, w, _ = make(3, 4, 8, 5, 7, "xy", bias=False, device=device)
    x = x.to(memory_format=torch.channels_last)
    y = ops.coord_conv2d(x, w, None, padding=1, coord_src_size=(3, 3), backend=backend)
    torch.testing.assert_close(y, concat_conv(x, w, None, 1, "xy", (3, 3)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
# Rounded to dtype once at the end (plus the conv's own low-precision accumulation);
# atol is relative to max |ref|.
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.bfloat16, 2e-2, 2e-2), (torch.float16, 4e-3, 4e-3)],
                         ids=["bf16", "fp16"])
def test_low_precision(device, backend, dtype, atol, rtol):
    x, w, b = make(1, 8, 6, 9, 5, "xy", device=device)
    y = ops.coord_conv2d(x.to(dtype), w.to(dtype), b.to(dtype), backend=backend)
    assert y.dtype == dtype
    ref = concat_conv(x.to(dtype).float(), w.to(dtype).float(), b.to(dtype).float(), 1, "xy", None)
    torch.testing.assert_close(y.float(), ref, atol=atol * ref.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("coords,src", [("xy", None), ("x", (4, 9)), ("y", (11, 3)), ("xy", (5, 5))])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_reference(device, backend, coords, src, bias):
    x, w, b = make(2, 3, 7, 6, 4, coords, dtype=torch.float64, bias=bias, grad=True, device=device)
    inputs = (x, w) + ((b,) if bias else ())
    y = ops.coord_conv2d(x, w, b, padding=1, coords=coords, coord_src_size=src, backend=backend)
    ref = ops.coord_conv2d(x, w, b, padding=1, coords=coords, coord_src_size=src, backend="reference")
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    for name, a, e in zip(("x", "weight", "bias"), got, want):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("coords,src", [("xy", None), ("x", (3, 5)), ("y", None)])
def test_gradcheck(backend, coords, src):
    x, w, b = make(2, 2, 4, 5, 3, coords, dtype=torch.float64, grad=True)

    def fn(x, w, b):
        return ops.coord_conv2d(x, w, b, padding=1, coords=coords, coord_src_size=src, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("device", triton_devices())
def test_gradcheck_triton(device):
    x, w, b = make(1, 2, 3, 4, 2, "xy", dtype=torch.float64, grad=True, device=device)
    fn = lambda x, w, b: ops.coord_conv2d(x, w, b, padding=1, coord_src_size=(2, 5), backend="triton")  # noqa: E731
    # fast_mode: a few random directional derivatives; the full Jacobian would be ~200
    # interpreted launches, and test_gradients_match_reference already compares every entry.
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)


@pytest.mark.parametrize("device,backend", device_backends("coord_conv2d", among=("cpu", "triton", "reference")))
def test_inputs_not_modified(device, backend):
    x, w, b = make(2, 3, 5, 5, 4, "xy", device=device)
    copies = [t.clone() for t in (x, w, b)]
    ops.coord_conv2d(x, w, b, backend=backend)
    for t, c in zip((x, w, b), copies):
        assert torch.equal(t, c)


def test_auto_picks_cpu_path():
    from solo_fast import _backend

    name, _ = _backend.resolve("coord_conv2d", "auto", "cpu")
    assert name == "cpu"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight=torch.randn(4, 5, 3, 3)), "weight: expected 6 input channels"),
        (dict(coords="z"), "coords"),
        (dict(coords="yx"), "coords"),
        (dict(x=torch.randn(4, 7, 7)), "x: expected a 4-D"),
        (dict(bias=torch.randn(3)), "bias"),
        (dict(padding=-1), "padding"),
        (dict(coord_src_size=(0, 4)), "coord_src_size"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(x=torch.randn(1, 4, 7, 7), weight=torch.randn(4, 6, 3, 3), bias=torch.randn(4))
    args.update(kwargs)
    x, w, b = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(ValueError, match=match):
        ops.coord_conv2d(x, w, b, **args)


@pytest.mark.cuda
@pytest.mark.parametrize("coords,src", [("xy", None), ("x", None), ("y", (40, 40)), ("xy", (25, 38))])
# atol is relative to max |ref| (of the output, and of each gradient).
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-4, 1e-4), (torch.float16, 1e-2, 1e-2)],
                         ids=["fp32", "fp16"])
def test_cuda_triton(coords, src, dtype, atol, rtol):
    """Model-sized channels in fp32 and fp16, forward and backward (the parity tests above
    run on CUDA too, with gradients in fp64)."""
    x, w, b = make(2, 16, 25, 38, 32, coords, dtype=dtype, grad=True, device="cuda")
    y = ops.coord_conv2d(x, w, b, coords=coords, coord_src_size=src, backend="triton")
    ref = ops.coord_conv2d(x, w, b, coords=coords, coord_src_size=src, backend="reference")
    torch.testing.assert_close(y, ref, atol=atol * ref.abs().max().item(), rtol=rtol)
    g = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(a, e, atol=atol * e.abs().max().item(), rtol=rtol)
