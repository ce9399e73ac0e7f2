"""ops.winograd_conv3x3 (Winograd F(2x2, 3x3) on the CPU) against F.conv2d, its reference;
its checks; WinogradConv2d; and its place in the CPU fast network."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import solo_fast
from solo_fast import ops
from solo_fast.modeling.fast_network import FastNetwork

usable32 = ops.brgemm_reads(torch.float32)
usable16 = ops.brgemm_reads(torch.bfloat16)
needs32 = pytest.mark.skipif(not usable32, reason="no fp32 Winograd kernel on this CPU/build (AVX-512 brgemm or "
                                                  "AVX2 + FMA)")
needs16 = pytest.mark.skipif(not usable16, reason="no bf16 Winograd kernel on this CPU/build (AVX512-BF16 "
                                                  "brgemm without AMX packing)")

# (N, C, O, H, W): single pixels, odd sizes (partial tiles at the bottom/right), odd channel
# counts (bf16's pair padding), output channels off the 64-wide GEMM blocks, batches, and
# enough tiles for several blocks per image (C = 256 fills a block's V with 24 fp32 tiles).
SHAPES = [(1, 1, 1, 1, 1), (1, 3, 5, 1, 7), (1, 5, 7, 2, 2), (2, 3, 70, 9, 8), (1, 7, 130, 5, 3),
          (1, 256, 65, 21, 19), (3, 64, 64, 6, 11), (1, 129, 3, 13, 1)]


def _data(n, c, o, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(o, c, 3, 3, generator=g)
    b = torch.randn(o, generator=g)
    return x, wt, b


def _exact(x, wt, b):
    return F.conv2d(x.double(), wt.double(), None if b is None else b.double(), padding=1)


def _bound(x, wt, b):
    """Sum of the magnitudes of every term of each output: the scale of its rounding error."""
    return F.conv2d(x.double().abs(), wt.double().abs(), None if b is None else b.double().abs(), padding=1)


@needs32
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp32_matches_conv2d(shape, with_bias, f32_gemm):
    x, wt, b = _data(*shape)
    b = b if with_bias else None
    got = ops.winograd_conv3x3(x.contiguous(memory_format=torch.channels_last), ops.winograd_pack(wt), b)
    assert got.dtype == torch.float32 and got.shape == (shape[0], shape[2], shape[3], shape[4])
    assert got.is_contiguous(memory_format=torch.channels_last)
    # fp32 F(2x2, 3x3): a few units of rounding of the terms' magnitudes (2**-24 = 6e-8);
    # a wrong transform or tile border is off by the size of a term.
    err = (got.double() - _exact(x, wt, b)).abs()
    assert (err <= 1e-6 * _bound(x, wt, b) + 1e-30).all(), float((err / _bound(x, wt, b)).max())


@needs16
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_within_three_times_the_direct_bf16_error(shape):
    x, wt, b = _data(*shape, seed=1)
    xb = x.bfloat16()
    got = ops.winograd_conv3x3(xb, ops.winograd_pack(wt, torch.bfloat16), b)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    exact = _exact(xb.float(), wt, b)  # the function of the bf16 input and the fp32 weights
    scale = _bound(xb.float(), wt, b).max()
    err = (got.double() - exact).abs().max() / scale
    direct = F.conv2d(xb, wt.bfloat16(), b.bfloat16(), padding=1)
    err_direct = (direct.double() - exact).abs().max() / scale
    # Normwise: Winograd's rounding scales with the transformed tiles, not with each
    # output's own terms. bf16's unit of rounding is 2**-8; Winograd rounds the transformed
    # input and weights once each and the output once, the direct conv the weights and the
    # output (measured: 1.2-1.7x the direct error).
    assert err <= 3 * max(float(err_direct), 2.0**-9), (float(err), float(err_direct))


@needs32
def test_layouts_and_inputs_untouched():
    x, wt, b = _data(1, 6, 9, 7, 5)
    packed = ops.winograd_pack(wt)
    copies = [t.clone() for t in (x, wt, b, packed)]
    nchw = ops.winograd_conv3x3(x, packed, b)  # NCHW in: read through a channels-last copy
    cl = ops.winograd_conv3x3(x.contiguous(memory_format=torch.channels_last), packed, b.double())
    assert torch.equal(nchw, cl)
    for t, c in zip((x, wt, b, packed), copies):
        assert torch.equal(t, c)


@needs32
def test_empty_batch():
    x, wt, b = _data(1, 4, 6, 5, 5)
    got = ops.winograd_conv3x3(x[:0], ops.winograd_pack(wt), b)
    assert got.shape == (0, 6, 5, 5)


@needs32
def test_packed_weights_are_the_transform():
    # U = G g G^T: a 3x3 kernel that is 1 at the centre gives G's middle column products.
    wt = torch.zeros(1, 1, 3, 3)
    wt[0, 0, 1, 1] = 1.0
    u = ops.winograd_pack(wt)[:, 0, 0].reshape(4, 4)
    g = torch.tensor([0.0, 0.5, -0.5, 0.0])
    torch.testing.assert_close(u, torch.outer(g, g), rtol=0, atol=0)


@needs32
def test_bad_input_is_named():
    x, wt, b = _data(1, 4, 6, 5, 5)
    packed = ops.winograd_pack(wt)
    with pytest.raises(ValueError, match="weight"):
        ops.winograd_pack(torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError, match="dtype"):
        ops.winograd_pack(wt, torch.float16)
    with pytest.raises(ValueError, match="packed"):
        ops.winograd_conv3x3(x[:, :3], packed, b)
    with pytest.raises(ValueError, match="packed"):
        ops.winograd_conv3x3(x.bfloat16(), packed, b)  # packed for fp32
    with pytest.raises(ValueError, match="x: expected dtype"):
        ops.winograd_conv3x3(x.double(), packed, b)
    with pytest.raises(ValueError, match="x"):
        ops.winograd_conv3x3(x[0], packed, b)
    with pytest.raises(ValueError, match="bias"):
        ops.winograd_conv3x3(x, packed, b[:5])
    with pytest.raises(ValueError, match="weight"):
        ops.winograd_pack(torch.zeros(4, 0, 3, 3))
    with pytest.raises(ValueError, match="bias: .*no gradient"):
        ops.winograd_conv3x3(x, packed, b.clone().requires_grad_())
    with pytest.raises(ValueError, match="x: .*no gradient"):
        ops.winograd_conv3x3(x.requires_grad_(), packed, b)


@needs32
def test_module_eligibility_and_fallback():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    assert ops.WinogradConv2d.eligible(conv)
    for other in (nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.Conv2d(8, 16, 3, padding=2, dilation=2),
                  nn.Conv2d(8, 16, 1), nn.Conv2d(8, 16, 3, padding=1, groups=2),
                  nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect")):
        assert not ops.WinogradConv2d.eligible(other)
    mod = ops.WinogradConv2d(conv, torch.float32)
    x = torch.randn(2, 8, 9, 10)
    with torch.no_grad():
        want = conv(x)
        torch.testing.assert_close(mod(x), want, atol=1e-5, rtol=1e-5)
    # An input that needs a gradient takes the conv's own weights through F.conv2d.
    y = mod(x.requires_grad_())
    assert y.requires_grad
    torch.testing.assert_close(y, want, atol=0, rtol=0)


def _swapped(net):
    return sum(isinstance(m, ops.WinogradConv2d) for p in net.parts for m in p.modules())


@needs32
def test_fast_network_swaps_only_profitable_convs(monkeypatch):
    model = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3).eval()
    net = FastNetwork([model.backbone, model.neck, model.mask_head])
    convs = [m for p in net.parts for m in p.modules() if isinstance(m, ops.WinogradConv2d)]
    assert convs and all(min(m.in_channels, m.out_channels) >= 128 for m in convs)
    # ResNet-18's first stage (64 channels) keeps oneDNN's direct conv, and the CoordConv
    # layers' convs (read by ops.coord_conv2d, never called) are left as they are.
    assert not isinstance(net.parts[0].layer1[0].conv1, ops.WinogradConv2d)
    head = net.parts[2]
    assert head.kernel_convs[0].coords and type(head.kernel_convs[0].conv) is nn.Conv2d
    assert isinstance(head.kernel_convs[1].conv, ops.WinogradConv2d)
    assert net.winograd == len(convs)
    monkeypatch.setenv("SOLO_FAST_CPU_WINOGRAD", "0")
    assert _swapped(FastNetwork([model.backbone, model.neck, model.mask_head])) == 0


@needs16
def test_fast_network_packs_bf16_from_fp32_weights():
    model = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3).eval()
    net = FastNetwork([model.backbone, model.neck, model.mask_head], torch.bfloat16)
    # An FPN conv: no BatchNorm folded into it, so the model's own weight is what was packed.
    name, conv = next((n, m) for n, m in net.parts[1].named_modules() if isinstance(m, ops.WinogradConv2d))
    assert conv.packed.dtype == torch.bfloat16 and conv.weight.dtype == torch.bfloat16
    fp32_weight = dict(model.neck.named_modules())[name].weight.detach()
    # The GEMM operand was rounded once from the fp32 weights, not from their bf16 copy.
    assert torch.equal(conv.packed, ops.winograd_pack(fp32_weight, torch.bfloat16))
    assert not torch.equal(conv.packed, ops.winograd_pack(fp32_weight.bfloat16().float(), torch.bfloat16))


@needs32
def test_opcheck():
    x, wt, b = _data(1, 4, 6, 5, 3)
    packed = ops.winograd_pack(wt)
    torch.library.opcheck(torch.ops.solo_fast.winograd_conv3x3.default,
                          (x.contiguous(memory_format=torch.channels_last), packed, b, 6),
                          test_utils=("test_schema", "test_faketensor"))
