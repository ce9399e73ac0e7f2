"""ops.cell_masks: SOLO's masks of selected cells, fast (only the selected rows of the 1x1
conv) against the reference (all S^2 maps as published, then gathered)."""
import pytest
import torch
import torch.nn.functional as F

import solo_fast
from solo_fast import ops
from solo_fast.ops.reference import mask_stats


def _case(n=49, c=16, h=9, w=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, h, w, generator=g), torch.randn(n, c, 1, 1, generator=g) * 0.3, torch.randn(n, generator=g)


def _by_hand(feat, weight, bias, cells, size=None):
    """Written from the definition: the dense conv, sigmoid, resize, then the rows."""
    soft = F.conv2d(feat[None].double(), weight.double(), bias.double()).sigmoid()
    if size is not None:
        soft = F.interpolate(soft, size=size, mode="bilinear", align_corners=False)
    return soft[0][cells].float()


CELLS = [[0], [3, 3, 17], [48, 0, 25], list(range(49))]  # one, duplicates, borders/unsorted, all


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("cells", CELLS, ids=lambda c: f"K{len(c)}")
@pytest.mark.parametrize("size", [None, (9, 11), (18, 22), (5, 7)])
def test_matches_the_definition(backend, cells, size):
    feat, weight, bias = _case()
    cells = torch.tensor(cells)
    soft = ops.cell_masks(feat, weight, bias, cells, size=size, backend=backend)
    expected = _by_hand(feat, weight, bias, cells, size)
    assert soft.shape == expected.shape
    torch.testing.assert_close(soft, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [None, (18, 22)])
def test_fast_equals_reference_with_statistics(size):
    feat, weight, bias = _case(seed=1)
    cells = torch.tensor([5, 0, 48, 5, 30])
    ref = ops.cell_masks(feat, weight, bias, cells, size=size, mask_thr=0.5, backend="reference")
    fast = ops.cell_masks(feat, weight, bias, cells, size=size, mask_thr=0.5, backend="cpu")
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-6)
    # Statistics belong to the returned soft masks (at ``size``), whichever path made them.
    for out in (ref, fast):
        for got, want in zip(out[1:], mask_stats(out[0], 0.5)[1:]):
            assert torch.equal(got, want)
    assert int(ref[2].sum()) > 0


def test_weight_as_a_matrix_and_empty_cells():
    feat, weight, bias = _case()
    cells = torch.tensor([1, 2])
    for backend in ("reference", "cpu"):
        a = ops.cell_masks(feat, weight, bias, cells, backend=backend)
        b = ops.cell_masks(feat, weight[:, :, 0, 0], bias, cells, backend=backend)
        assert torch.equal(a, b)
        empty = ops.cell_masks(feat, weight, bias, cells[:0], size=(4, 6), mask_thr=0.5, backend=backend)
        assert empty[0].shape == (0, 4, 6) and empty[2].shape == (0,)


def test_gradients_match_the_dense_conv():
    """Training takes the positive cells' rows only: the same gradients as the dense conv."""
    feat, weight, bias = _case()
    cells = torch.tensor([0, 3, 3, 17, 48])
    grads = {}
    for backend in ("reference", "cpu"):
        f, w, b = (t.clone().requires_grad_() for t in (feat, weight, bias))
        out = ops.cell_masks(f, w, b, cells, backend=backend)
        grads[backend] = torch.autograd.grad(out, [f, w, b], torch.linspace(-1, 1, out.numel()).view_as(out))
    for a, b in zip(grads["cpu"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    f, w, b = (t.double().requires_grad_() for t in (feat[:4, :3, :4], weight[:6, :4], bias[:6]))
    assert torch.autograd.gradcheck(lambda f, w, b: ops.cell_masks(f, w, b, torch.tensor([1, 5, 1]), backend="cpu"),
                                    (f, w, b))


def test_dense_reports_the_reference():
    assert not ops.cell_masks_are_dense("cpu")
    assert ops.cell_masks_are_dense("cpu", backend="reference")
    with solo_fast.use_backend("reference"):
        assert ops.cell_masks_are_dense("cpu")


@pytest.mark.parametrize("make,match", [
    (lambda f, w, b: (f[0], w, b, torch.tensor([0])), "feat"),
    (lambda f, w, b: (f, w[:, :3], b, torch.tensor([0])), "weight"),
    (lambda f, w, b: (f, w.expand(-1, -1, 3, 3), b, torch.tensor([0])), "weight"),
    (lambda f, w, b: (f, w, b[:5], torch.tensor([0])), "bias"),
    (lambda f, w, b: (f, w, b, torch.tensor([0.0])), "cells"),
    (lambda f, w, b: (f, w, b, torch.tensor([49])), "cells"),
    (lambda f, w, b: (f, w, b, torch.tensor([-1])), "cells"),
])
def test_bad_input(make, match):
    args = make(*_case())
    with pytest.raises(ValueError, match=match):
        ops.cell_masks(*args)
    with pytest.raises(ValueError, match="size"):
        ops.cell_masks(*_case(), torch.tensor([0]), size=(0, 4))
    with pytest.raises(ValueError, match="mask_thr"):
        ops.cell_masks(*_case(), torch.tensor([0]), mask_thr=1.5)
