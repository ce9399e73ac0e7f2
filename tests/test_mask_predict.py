"""mask_predict: the "cpu" path (bit-exact) and the fused Triton kernel (interpreter or GPU) vs the reference.

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

The tests of the Triton path and of the shared contract run on every device of
``helpers.DEVICES`` (the interpreter on CPU tensors here, the kernel on CUDA ones); the
inputs are drawn on the CPU and moved, and results are checked on the CPU. Where the
Triton path picks for itself (fp32/fp64 inputs, no out_dtype), a GPU differs from the
interpreter: fp16 GEMM operands instead of "ieee", fp16 soft masks instead of fp32
(AUTO_OPERAND, DEFAULT_SOFT); the bounds above then add that operand rounding and the
soft masks' one rounding (SOFT_ROUNDING), both zero on the CPU.
"""
import math

import pytest
import torch

from solo_fast import ops
from solo_fast.ops import _mask_predict, reference

from helpers import check_mask_predict, device_backends, on, to_cpu, triton_devices


pytestmark = pytest.mark.usefixtures("one_thread")

OPERAND_EPS = {"ieee": 0.0, "fp16": 2.0**-11, "bf16": 2.0**-8}
# What the Triton path picks for fp32/fp64 inputs, and its default soft-mask dtype, per device.
AUTO_OPERAND = {"cpu": "ieee", "cuda": "fp16"}
DEFAULT_SOFT = {"cpu": torch.float32, "cuda": torch.float16}
SOFT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

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


def logit_bound(f, k, eps):
    """The largest logit error of operands rounded by ``eps`` (relative): eps * 2 * max(|k| @ |f|)."""
    return float((eps * 2 * (k.abs() @ f.abs().reshape(f.shape[0], -1))).max()) if k.numel() else 0.0


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


CL_SHAPES = [(9, 32, 12, 20), (40, 256, 25, 42), (1, 7, 1, 1), (70, 33, 17, 21), (130, 64, 5, 9)]


@pytest.mark.parametrize("shape", CL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_channels_last_features(shape, dtype):
    # The CPU fast network hands SOLOv2's mask features on channels-last, in bf16 under
    # precision="bf16" (heads.py any_layout_outputs): their [H*W, E] rows are the operand
    # of the brgemm GEMM (mask_logits) as they lie. The same function as the reference up
    # to the summation order: products of bf16 values are exact in fp32.
    f, k, b = make(*shape)
    f, k = f.to(dtype), k.to(dtype).float()  # bf16-valued kernels in fp32, as the network gives them
    f_cl = f[None].contiguous(memory_format=torch.channels_last)[0]
    assert not f_cl.is_contiguous() or shape[2] * shape[3] == 1
    if ops.brgemm_reads(dtype) and shape[0] and not f_cl.is_contiguous():
        assert _mask_predict._channels_last_rows(f_cl, k) is not None  # the brgemm path runs
    got = ops.mask_predict(f_cl, k, b, backend="cpu")
    check_mask_predict(got, f_cl, k, b, 0.5, eps=2.0**-22, soft_atol=1e-6)


@pytest.mark.parametrize("shape", CL_SHAPES)
def test_cpu_channels_last_fp32_each_gemm_kernel(shape, f32_gemm):
    f, k, b = make(*shape)
    f_cl = f[None].contiguous(memory_format=torch.channels_last)[0]
    if shape[0] and not f_cl.is_contiguous():
        assert _mask_predict._channels_last_rows(f_cl, k) is not None
    check_mask_predict(ops.mask_predict(f_cl, k, b, backend="cpu"), f_cl, k, b, 0.5, eps=2.0**-22, soft_atol=1e-6)


@pytest.mark.skipif(not ops.brgemm_reads(torch.float32), reason="no fp32 GEMM micro-kernel on this CPU/build")
def test_mask_logits_without_bias_and_opcheck():
    f, k, _ = make(70, 33, 17, 21, bias=False)
    f_cl = f[None].contiguous(memory_format=torch.channels_last)[0]
    check_mask_predict(ops.mask_predict(f_cl, k, None, backend="cpu"), f_cl, k, None, 0.5, eps=2.0**-22,
                       soft_atol=1e-6)
    rows = _mask_predict._channels_last_rows(f_cl, k)
    torch.library.opcheck(torch.ops.solo_fast.mask_logits.default, (rows, k, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_cpu_channels_last_bf16_features_with_fp32_kernels_are_exact():
    # Kernels that bf16 cannot hold: the brgemm path would round them, so the reference's
    # fp32 GEMM runs, bit for bit.
    f, k, b = make(9, 32, 12, 20)
    f_cl = f.bfloat16()[None].contiguous(memory_format=torch.channels_last)[0]
    assert _mask_predict._channels_last_rows(f_cl, k) is None
    for g, w in zip(ops.mask_predict(f_cl, k, b, backend="cpu"), reference.mask_predict(f_cl, k, b)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("device,backend", device_backends("mask_predict", among=("cpu", "triton")))
def test_grad_falls_back_to_reference_graph(device, backend):
    f, k, b = on(device, *make(6, 8, 5, 7))
    k.requires_grad_(True)
    soft = ops.mask_predict(f, k, b, backend=backend)[0]
    soft_ref = reference.mask_predict(f, k, b)[0]
    g = torch.randn_like(soft)
    torch.testing.assert_close(torch.autograd.grad(soft, k, g)[0], torch.autograd.grad(soft_ref, k, g)[0])


# --------------------------------------------------------------------------------------
# "triton" (interpreter on this machine)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("precision", ["ieee", "fp16", "bf16"])
def test_triton_random(device, shape, precision):
    from solo_fast.ops._mask_predict import mask_predict_triton

    f, k, b = make(*shape)
    got = to_cpu(mask_predict_triton(*on(device, f, k, b), precision=precision))
    assert got[0].dtype == DEFAULT_SOFT[device]  # default out dtype: fp32 on CPU tensors
    # sigmoid' <= 1/4: the soft error is at most a quarter of the logit error.
    eps = OPERAND_EPS[precision]
    bound = logit_bound(f, k, eps)
    check_mask_predict(got, f, k, b, 0.5, eps, soft_atol=bound / 4 + 1e-6 + SOFT_ROUNDING[got[0].dtype])


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("mask_thr", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_triton_thresholds_and_padding_lanes(device, mask_thr):
    # 37 masks x 9*13 pixels leave partial tiles; their padding lanes (logit 0, soft 0.5)
    # must not count for mask_thr < 0.5.
    f, k, b = make(37, 19, 9, 13)
    got = to_cpu(ops.mask_predict(*on(device, f, k, b), mask_thr=mask_thr, backend="triton"))
    eps = OPERAND_EPS[AUTO_OPERAND[device]]  # 0.0 on the CPU
    soft_atol = logit_bound(f, k, eps) / 4 + 1e-6 + SOFT_ROUNDING[got[0].dtype]  # 1e-6 on the CPU
    check_mask_predict(got, f, k, b, mask_thr, eps, soft_atol=soft_atol)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("precision", ["ieee", "fp16", "bf16"])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_exact_on_representable_inputs(device, precision, bias):
    from solo_fast.ops._mask_predict import mask_predict_triton

    e, h, w, k = 48, 11, 15, 41
    f = dyadic(e, h, w)
    kern = dyadic(k, e, scale=16)
    b = dyadic(k) if bias else None
    soft, binary, area, maskness = to_cpu(mask_predict_triton(*on(device, f, kern, b), precision=precision))
    ref_soft, ref_binary, ref_area, ref_maskness = reference.mask_predict(f, kern, b)
    assert torch.equal(binary, ref_binary)
    assert torch.equal(area, ref_area)
    # Same logits; only the sigmoid's implementation (numpy here, torch there) and the
    # order of the maskness sums (per-tile partials + atomics) differ.
    assert soft.dtype == DEFAULT_SOFT[device]
    torch.testing.assert_close(soft.float(), ref_soft, atol=3e-7 + SOFT_ROUNDING[soft.dtype], rtol=0)
    torch.testing.assert_close(maskness, ref_maskness, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_inputs_auto_mode(device, in_dtype):
    # fp16/bf16 inputs pick same-dtype operands; exactly representable values make the
    # result independent of that choice.
    f = dyadic(32, 9, 10).to(in_dtype)
    k = dyadic(19, 32, scale=16).to(in_dtype)
    b = dyadic(19).to(in_dtype)
    soft, binary, area, maskness = to_cpu(ops.mask_predict(*on(device, f, k, b), out_dtype=torch.float16,
                                                           backend="triton"))
    ref = reference.mask_predict(f, k, b, out_dtype=torch.float16)
    assert soft.dtype == torch.float16
    assert torch.equal(binary, ref[1]) and torch.equal(area, ref[2])
    torch.testing.assert_close(soft, ref[0], atol=2.0**-11, rtol=0)  # one fp16 rounding of the same value
    torch.testing.assert_close(maskness, ref[3], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", triton_devices())
# atol: one rounding to the out dtype, plus 1e-6 in the test
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float16, 2.0**-11, 0), (torch.bfloat16, 2.0**-8, 0),
                                               (torch.float32, 1e-6, 0)], ids=["fp16", "bf16", "fp32"])
def test_triton_out_dtypes(device, dtype, atol, rtol):
    f, k, b = make(9, 16, 6, 7)
    soft = ops.mask_predict(*on(device, f, k, b), out_dtype=dtype, backend="triton")[0].cpu()
    assert soft.dtype == dtype
    operand_err = logit_bound(f, k, OPERAND_EPS[AUTO_OPERAND[device]]) / 4  # 0.0 on the CPU
    torch.testing.assert_close(soft.float(), reference.mask_predict(f, k, b)[0], atol=atol + 1e-6 + operand_err,
                               rtol=rtol)


@pytest.mark.parametrize("device", triton_devices())
def test_triton_non_contiguous_and_fp64_inputs(device):
    f, k, b = make(12, 20, 7, 9, dtype=torch.float64)
    f_t, k_t, b_t = on(device, f, k, b)
    f_t = f_t.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    k_t = k_t.t().contiguous().t()
    got = to_cpu(ops.mask_predict(f_t, k_t, b_t, backend="triton"))
    eps = OPERAND_EPS[AUTO_OPERAND[device]]  # 0.0 on the CPU
    soft_atol = logit_bound(f, k, eps) / 4 + 1e-6 + SOFT_ROUNDING[got[0].dtype]  # 1e-6 on the CPU
    check_mask_predict(got, f, k, b, 0.5, eps, soft_atol=soft_atol)


# --------------------------------------------------------------------------------------
# Shared contract
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", device_backends("mask_predict", among=("reference", "cpu", "triton")))
def test_inputs_not_modified(device, backend):
    f, k, b = on(device, *make(10, 12, 5, 6))
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
    check_mask_predict(
        [t.cpu() for t in got], f.cpu(), k.cpu(), b.cpu(), 0.5, OPERAND_EPS["fp16"], soft_atol=2e-3
    )
