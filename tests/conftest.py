import os

import pytest
import torch

# The Triton interpreter must be chosen before triton is first imported (DESIGN.md §5):
# without a GPU it runs the Triton kernels on CPU tensors. (Importing torch does not
# import triton.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped otherwise)")
    config.addinivalue_line("markers", "slow: longer tests (still part of the default run)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny shapes gain nothing from intra-op threads, and on a loaded 2-core machine every
    parallel region waits for a scheduler slice: with two threads the small networks of
    these tests ran 10-30x slower there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["brgemm", "avx2"])
def f32_gemm(request):
    """Runs a test once per fp32 GEMM micro-kernel of winograd_conv3x3 / mask_logits that this
    CPU has (torch's brgemm on AVX-512, solo_fast's AVX2 one; both on AVX-512 machines),
    skipping the others; the default choice is restored after."""
    from solo_fast.ops import _brgemm

    if request.param not in _brgemm.available_f32_kernels():
        pytest.skip(f"no {request.param} fp32 GEMM kernel on this CPU/build")
    torch.ops.solo_fast.cpu_gemm_kernel(torch.float32, request.param)
    try:
        yield request.param
    finally:
        torch.ops.solo_fast.cpu_gemm_kernel(torch.float32, "auto")
