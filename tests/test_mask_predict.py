"""mask_predict: the "cpu" path (bit-exact) and the fused Triton kernel (interpreter) vs the reference.

Tolerances of the Triton path (DESIGN.md §2: binary/area/maskness come from the fp32
logits). Its logits differ from the reference's by the summation order over E ("ieee"
operands) plus the operands' rounding (fp16: 2**-11 relative, bf16: 2**-8, per operand).
So the tests bound each pixel's logit error by
    rounding * (|kernels| @ |features|) + 1e-5
and require binary to match wherever the reference logit is farther than that from the
threshold's logit, area to differ by at most the number of such ambiguous pixels, and
maskness to match (within the soft error) on masks without ambiguous pixels. With inputs
exactly representable in the operand dtype whose products sum exactly in fp32, every
mode must give binary and area exactly, maskness and soft up to the sigmoid's last bits.
"""
import math

import pytest
import torch

from solo_fast import ops
from solo_fast.ops import reference


pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TRITON = "triton" in ops.available_backends("mask_predict", "cpu")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton unavailable")
OPERAND_EPS = {"ieee": 0.0, "fp16": 2.0**-11, "bf16": 2.0**-8}

SHAPES = [  # K, E, H, W
    (0, 5, 3, 4),
    (1, 3, 5, 7),
    (1, 1, 1, 1),
    (37, 19, 9, 13),
    (70, 33, 17, 21),
    (5, 256, 8, 16),
]


def make(k, e, h, w, dtype=torch.float32, bias=True):
    features = torch.randn(e, h, w).to(dtype)
    kernels = (torch.randn(k, e) / math.sqrt(max(e, 1))).to(dtype)
    b = torch.randn(k).to(dtype) if bias else None
    return features, kernels, b


def dyadic(*shape, scale=8, top=16):
    """Multiples of 1/scale in [-top/scale, top/scale]: exact in fp16 and bf16; products and sums exact in fp32."""
    return torch.randint(-top, top + 1, shape).float() / scale


# --------------------------------------------------------------------------------------
# "cpu": the same function as the reference, bit for bit
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask_thr", [0.5, 0.3])
def test_cpu_bit_exact(shape, bias, mask_thr):
    f, k, b = make(*shape, bias=bias)
    got = ops.mask_predict(f, k, b, mask_thr=mask_thr, backend="cpu")
    want = reference.mask_predict(f, k, b, mask_thr=mask_thr)
    for name, g, w in zip(("soft", "binary", "area", "maskness"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), name


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.float64])
def test_cpu_dtypes(out_dtype, in_dtype):
    f, k, b = make(23, 40, 12, 17, dtype=in_dtype)
    got = ops.mask_predict(f, k, b, out_dtype=out_dtype, backend="cpu")
    want = reference.mask_predict(f, k, b, out_dtype=out_dtype)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert torch.equal(g, w)


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_cpu_chunked_maskness_bit_exact(chunk):
    from solo_fast.ops._mask_predict import mask_predict_cpu

    f, k, b = make(37, 19, 9, 13)
    got = mask_predict_cpu(f, k, b, chunk=chunk)
    want = reference.mask_predict(f, k, b)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_cpu_model_sized():
    # A SOLOv2 mask-feature map of a padded 800x1344 input at stride 4 is 200x336 -- use
    # a quarter of it to keep the test short; H*W a multiple of 64 as in the model.
    f, k, b = make(130, 256, 100, 168)
    got = ops.mask_predict(f, k, b, backend="cpu")
    want = reference.mask_predict(f, k, b)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", ["cpu"] + (["triton"] if HAS_TRITON else []))
def test_grad_falls_back_to_reference_graph(backend):
    f, k, b = make(6, 8, 5, 7)
    k.requires_grad_(True)
    soft = ops.mask_predict(f, k, b, backend=backend)[0]
    soft_ref = reference.mask_predict(f, k, b)[0]
    g = torch.randn_like(soft)
    torch.testing.assert_close(torch.autograd.grad(soft, k, g)[0], torch.autograd.grad(soft_ref, k, g)[0])


# --------------------------------------------------------------------------------------
# "triton" (interpreter on this machine)
# --------------------------------------------------------------------------------------
def check_against_reference(got, f, k, b, mask_thr, eps, soft_atol):
    soft, binary, area, maskness = got
    ref_soft, ref_binary, ref_area, ref_maskness = reference.mask_predict(f, k, b, mask_thr=mask_thr)
    assert binary.dtype == torch.bool and area.dtype == torch.int64 and maskness.dtype == torch.float32
    assert soft.shape == ref_soft.shape == binary.shape
    if k.shape[0] == 0:
        assert area.shape == (0,) and maskness.shape == (0,)
        return
    e, h, w = f.shape
    f64 = f.double().reshape(e, -1)
    k64 = k.double()
    logit = (k64 @ f64).reshape(-1, h, w)
    bound = (eps * 2 * (k64.abs() @ f64.abs()) + 1e-5).reshape(-1, h, w)
    if b is not None:
        logit = logit + b.double()[:, None, None]
    thr_logit = math.log(mask_thr / (1 - mask_thr)) if 0 < mask_thr < 1 else math.copysign(math.inf, mask_thr - 0.5)
    ambiguous = (logit - thr_logit).abs() <= bound
    assert torch.equal(binary[~ambiguous], ref_binary[~ambiguous])
    n_amb = ambiguous.sum((1, 2))
    assert bool(((area - ref_area).abs() <= n_amb).all())
    clean = n_amb == 0
    torch.testing.assert_close(maskness[clean], ref_maskness[clean], atol=soft_atol, rtol=1e-5)
    torch.testing.assert_close(soft.float(), ref_soft, atol=soft_atol, rtol=0)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("precision", ["ieee", "fp16", "bf16"])
def test_triton_random(shape, precision):
    from solo_fast.ops._mask_predict import mask_predict_triton

    f, k, b = make(*shape)
    got = mask_predict_triton(f, k, b, precision=precision)
    assert got[0].dtype == torch.float32  # default out dtype on CPU tensors
    # sigmoid' <= 1/4: the soft error is at most a quarter of the logit error.
    eps = OPERAND_EPS[precision]
    bound = float((eps * 2 * (k.abs() @ f.abs().reshape(f.shape[0], -1))).max()) if k.numel() else 0.0
    check_against_reference(got, f, k, b, 0.5, eps, soft_atol=bound / 4 + 1e-6)


@needs_triton
@pytest.mark.parametrize("mask_thr", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_triton_thresholds_and_padding_lanes(mask_thr):
    # 37 masks x 9*13 pixels leave partial tiles; their padding lanes (logit 0, soft 0.5)
    # must not count for mask_thr < 0.5.
    f, k, b = make(37, 19, 9, 13)
    got = ops.mask_predict(f, k, b, mask_thr=mask_thr, backend="triton")
    check_against_reference(got, f, k, b, mask_thr, 0.0, soft_atol=1e-6)


@needs_triton
@pytest.mark.parametrize("precision", ["ieee", "fp16", "bf16"])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_exact_on_representable_inputs(precision, bias):
    from solo_fast.ops._mask_predict import mask_predict_triton

    e, h, w, k = 48, 11, 15, 41
    f = dyadic(e, h, w)
    kern = dyadic(k, e, scale=16)
    b = dyadic(k) if bias else None
    soft, binary, area, maskness = mask_predict_triton(f, kern, b, precision=precision)
    ref_soft, ref_binary, ref_area, ref_maskness = reference.mask_predict(f, kern, b)
    assert torch.equal(binary, ref_binary)
    assert torch.equal(area, ref_area)
    # Same logits; only the sigmoid's implementation (numpy here, torch there) and the
    # order of the maskness sums (per-tile partials + atomics) differ.
    torch.testing.assert_close(soft, ref_soft, atol=3e-7, rtol=0)
    torch.testing.assert_close(maskness, ref_maskness, atol=1e-6, rtol=1e-6)


@needs_triton
@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_inputs_auto_mode(in_dtype):
    # fp16/bf16 inputs pick same-dtype operands; exactly representable values make the
    # result independent of that choice.
    f = dyadic(32, 9, 10).to(in_dtype)
    k = dyadic(19, 32, scale=16).to(in_dtype)
    b = dyadic(19).to(in_dtype)
    soft, binary, area, maskness = ops.mask_predict(f, k, b, out_dtype=torch.float16, backend="triton")
    ref = reference.mask_predict(f, k, b, out_dtype=torch.float16)
    assert soft.dtype == torch.float16
    assert torch.equal(binary, ref[1]) and torch.equal(area, ref[2])
    torch.testing.assert_close(soft, ref[0], atol=2.0**-11, rtol=0)  # one fp16 rounding of the same value
    torch.testing.assert_close(maskness, ref[3], atol=1e-6, rtol=1e-6)


@needs_triton
def test_triton_out_dtypes():
    f, k, b = make(9, 16, 6, 7)
    for out_dtype, atol in ((torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8), (torch.float32, 1e-6)):
        soft = ops.mask_predict(f, k, b, out_dtype=out_dtype, backend="triton")[0]
        assert soft.dtype == out_dtype
        torch.testing.assert_close(soft.float(), reference.mask_predict(f, k, b)[0], atol=atol + 1e-6, rtol=0)


@needs_triton
def test_triton_non_contiguous_and_fp64_inputs():
    f, k, b = make(12, 20, 7, 9, dtype=torch.float64)
    f_t = f.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    k_t = k.t().contiguous().t()
    got = ops.mask_predict(f_t, k_t, b, backend="triton")
    check_against_reference(got, f, k, b, 0.5, 0.0, soft_atol=1e-6)


# --------------------------------------------------------------------------------------
# Shared contract
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu"] + (["triton"] if HAS_TRITON else []))
def test_inputs_not_modified(backend):
    f, k, b = make(10, 12, 5, 6)
    copies = [t.clone() for t in (f, k, b)]
    ops.mask_predict(f, k, b, backend=backend)
    for t, c in zip((f, k, b), copies):
        assert torch.equal(t, c)


def test_auto_picks_cpu_path():
    from solo_fast import _backend

    assert _backend.resolve("mask_predict", "auto", "cpu")[0] == "cpu"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(features=torch.randn(8, 30)), "features: expected a 3-D"),
        (dict(features=torch.randn(1, 8, 5, 6)), "features: expected a 3-D"),
        (dict(kernels=torch.randn(4, 7)), "kernels: expected 8 columns"),
        (dict(kernels=torch.randn(4, 8, 1)), "kernels: expected a 2-D"),
        (dict(bias=torch.randn(3)), "bias"),
        (dict(mask_thr=1.5), "mask_thr"),
        (dict(out_dtype=torch.int32), "out_dtype"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(features=torch.randn(8, 5, 6), kernels=torch.randn(4, 8), bias=torch.randn(4))
    args.update(kwargs)
    f, k, b = args.pop("features"), args.pop("kernels"), args.pop("bias")
    with pytest.raises(ValueError, match=match):
        ops.mask_predict(f, k, b, **args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_triton_model_size(dtype):
    f, k, b = make(500, 256, 200, 336, dtype=dtype)
    f, k, b = f.cuda(), k.cuda(), b.cuda()
    got = ops.mask_predict(f, k, b, backend="triton")
    assert got[0].dtype == torch.float16
    check_against_reference(
        [t.cpu() for t in got], f.cpu(), k.cpu(), b.cpu(), 0.5, OPERAND_EPS["fp16"], soft_atol=2e-3
    )
