import os

# The Triton interpreter must be chosen before triton is first imported (DESIGN.md §5):
# it lets the Triton kernels run on CPU tensors on machines without a GPU.
if not os.environ.get("CUDA_VISIBLE_DEVICES_FOR_TRITON"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
