"""torch.compile and torch.library.opcheck over every custom op (DESIGN.md §4).

The C++ ops have fake kernels (register_fake); the Triton ops are ``triton_op``s, which
under the Triton interpreter (this machine) are kept opaque with their own fake kernels
(``ops._triton_support.opaque_under_interpreter``), so both kinds trace with FakeTensors,
pass opcheck and run inside compiled graphs on CPU tensors.

Model-level compiles use ``backend="aot_eager"``: it runs Dynamo and AOTAutograd (the
fake kernels, functionalisation, the custom ops as graph nodes), everything but Inductor's
code generation, whose C++ compilation of a whole model took over 6 minutes on this
shared 2-core machine.
"""
import pytest
import torch

import solo_fast
from solo_fast import ops
from solo_fast.ops import _coord_conv, _mask_predict, _matrix_nms

from helpers import available, needs_cpp, needs_triton, two_box_scene


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _nms_inputs(n=6, h=7, w=9):
    g = torch.Generator().manual_seed(n)
    masks = torch.rand(n, h, w, generator=g) > 0.5
    masks[-1] = masks[0]  # a duplicate
    labels = torch.randint(0, 2, (n,), generator=g)
    return masks, labels, masks.flatten(1).sum(1)


# ----------------------------------------------------------------------------- opcheck
@needs_cpp
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("n", [0, 1, 6])
def test_opcheck_matrix_nms_cpp(kernel, n):
    masks, labels, area = _nms_inputs(max(n, 1))
    masks, labels, area = masks[:n], labels[:n], area[:n]
    torch.library.opcheck(torch.ops.solo_fast.matrix_nms_decay_popcount.default, (masks, labels, area, kernel, 2.0))
    torch.library.opcheck(torch.ops.solo_fast.matrix_nms_mask_area.default, (masks,))


@needs_cpp
def test_opcheck_center_region_assign_cpp():
    masks = two_box_scene()[0]
    args = ([masks, masks[:0]], [torch.tensor([0, 1]), torch.zeros(0, dtype=torch.long)], [None, None],
            [4, 3], [1.0, 8.0], [16.0, 64.0], 0.2, 2, [4, 8])
    torch.library.opcheck(torch.ops.solo_fast.center_region_assign.default, args)


@needs_triton
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("n", [0, 1, 6])
def test_opcheck_matrix_nms_triton(kernel, n):
    masks, labels, area = _nms_inputs(max(n, 1))
    torch.library.opcheck(_matrix_nms._triton_op(), (masks[:n], labels[:n], area[:n], kernel, 2.0))


@needs_triton
@pytest.mark.parametrize("operand", ["ieee", "bf16", "fp16"])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_mask_predict_triton(operand, bias):
    op, operands = _mask_predict._triton_op(), _mask_predict._OPERANDS
    dtype = {"ieee": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[operand]
    feats, kern = torch.randn(5, 37).to(dtype), torch.randn(3, 5).to(dtype)
    b = torch.randn(3) if bias else None
    for out_dtype in (torch.float32, torch.float16):
        torch.library.opcheck(op, (feats, kern, b, 0.5, out_dtype, operands[operand]))


@needs_triton
@pytest.mark.parametrize("coords", ["xy", "x", "y"])
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_coord_conv_triton(coords, grad):
    op = _coord_conv._triton_op()
    conv = torch.randn(2, 3, 5, 6, requires_grad=grad)
    w = torch.randn(3, len(coords), 3, 3, requires_grad=grad)
    b = torch.randn(3, requires_grad=grad)
    xs, ys = _coord_conv.coord_vectors(5, 6, coord_src_size=(4, 9))
    torch.library.opcheck(op, (conv, w, b, xs, ys, 1, coords))


# ----------------------------------------------------------------------- compiled ops
def _backends(op):
    return available(op, among=("cpu", "triton"))


@pytest.mark.parametrize("backend", _backends("coord_conv2d"))
def test_compiled_coord_conv2d_fullgraph(backend):
    """The public wrapper (checks, backend choice) traces without a graph break."""
    x, w, b = torch.randn(2, 4, 9, 11), torch.randn(6, 6, 3, 3), torch.randn(6)

    def f(x, w, b):
        return ops.coord_conv2d(x, w, b, coord_src_size=(5, 13), backend=backend).relu()

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w, b)
    torch.testing.assert_close(got, f(x, w, b))


@pytest.mark.parametrize("backend", _backends("mask_predict"))
def test_compiled_mask_predict_fullgraph(backend):
    feats, kern, bias = torch.randn(8, 13, 17), torch.randn(5, 8), torch.randn(5)

    def f(feats, kern, bias):
        return ops.mask_predict(feats, kern, bias, mask_thr=0.4, backend=backend)

    with torch.no_grad():
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(feats, kern, bias)
        want = f(feats, kern, bias)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", _backends("matrix_nms"))
def test_compiled_matrix_nms(backend):
    """Data-dependent checks and filtering graph-break; the result must still be the eager one."""
    masks, labels, _ = _nms_inputs(9, 12, 10)
    scores = torch.rand(9, generator=torch.Generator().manual_seed(1))

    def f(masks, labels, scores):
        return ops.matrix_nms(masks, labels, scores, filter_thr=0.05, backend=backend)

    got = torch.compile(f, backend="aot_eager")(masks, labels, scores)
    for g, w in zip(got, f(masks, labels, scores)):
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------------------ whole model
def test_compiled_model_matches_eager():
    """``torch.compile(model)`` in eval mode on the default (auto) backends: backbone,
    FPN and head compile into graphs with the custom ops as nodes; post-processing
    (data-dependent) graph-breaks; the result equals eager inference."""
    torch.manual_seed(0)
    model = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=3, min_size=128, max_size=128,
                           num_grids=(12, 10, 8, 6, 4)).eval()
    # A random model's scores sit near the 0.01 prior: low thresholds send candidates
    # through mask_predict and Matrix NMS.
    model.config = model.config.replace(score_thr=0.005, filter_thr=0.0)
    img = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0))
    want = model(img[None])[0]
    compiled = torch.compile(model, backend="aot_eager")
    got = compiled(img[None])[0]
    got2 = compiled(img[None])[0]  # cached graphs
    assert len(want["scores"]) > 0
    for g in (got, got2):
        # Compiled convolutions may round differently in the last bit; a random model's
        # soft masks sit at sigmoid(~0) = 0.5, on the threshold, so a handful of pixels
        # (1 of 1.6 M measured) may flip. Everything else is the eager result.
        assert g["masks"].shape == want["masks"].shape
        assert (g["masks"] != want["masks"]).float().mean() < 1e-4
        assert torch.equal(g["labels"], want["labels"])
        torch.testing.assert_close(g["scores"], want["scores"], atol=1e-6, rtol=1e-5)
