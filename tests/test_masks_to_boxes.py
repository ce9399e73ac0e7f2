"""ops.masks_to_boxes: the CPU kernel against the reference, bit for bit."""
import pytest
import torch

from solo_fast import ops
from solo_fast.ops import reference

needs_cpu = pytest.mark.skipif("cpu" not in ops.available_backends("masks_to_boxes"),
                               reason="the compiled extension is not built")


def _random_masks(n, h, w, seed):
    """Rectangles, blobs, single pixels, masks touching each border, empty masks."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, h, w, generator=g) > 0.995
    for i in range(n):
        kind = i % 5
        if kind == 0:
            m[i] = False
        elif kind == 1:
            y0, x0 = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
            m[i, y0:, x0:] = True  # touches the bottom and right borders
        elif kind == 2:
            m[i] = False
            m[i, int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))] = True
        elif kind == 3:
            m[i, 0, :] = True  # touches the top, left and right
    return m


@needs_cpu
@pytest.mark.parametrize("shape", [(0, 5, 7), (1, 1, 1), (7, 1, 9), (7, 9, 1), (10, 33, 65), (6, 200, 333)])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_cpu_equals_reference(shape, dtype):
    m = _random_masks(*shape, seed=sum(shape)).to(dtype)
    if dtype == torch.uint8 and m.numel():
        m = m * torch.randint(1, 4, m.shape, dtype=torch.uint8)  # any nonzero value is inside
    before = m.clone()
    got = ops.masks_to_boxes(m, backend="cpu")
    want = reference.masks_to_boxes(m)
    assert got.dtype == torch.float32 and got.shape == (shape[0], 4)
    assert torch.equal(got, want)
    assert torch.equal(m, before)


@needs_cpu
def test_non_contiguous_masks():
    m = _random_masks(8, 40, 50, seed=3)
    view = m.transpose(1, 2)
    assert torch.equal(ops.masks_to_boxes(view, backend="cpu"), reference.masks_to_boxes(view))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="masks"):
        ops.masks_to_boxes(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="masks"):
        ops.masks_to_boxes(torch.zeros(1, 3, 4))  # float


@needs_cpu
def test_opcheck():
    torch.library.opcheck(torch.ops.solo_fast.masks_to_boxes.default, (_random_masks(4, 9, 11, seed=0),),
                          test_utils=("test_schema", "test_faketensor"))
