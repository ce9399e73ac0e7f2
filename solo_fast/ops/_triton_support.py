"""When the Triton backends can run: shared by every Triton-backed op."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors with numpy (DESIGN.md §5)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    # find_spec, not import: importing solo_fast must not import triton.
    return importlib.util.find_spec("triton") is not None


def triton_available(device_type: str) -> bool:
    """On CUDA tensors with triton installed; under ``TRITON_INTERPRET=1`` on CPU tensors too."""
    if not triton_importable():
        return False
    if device_type == "cuda":
        return torch.cuda.is_available() or interpreting()
    return device_type == "cpu" and interpreting()
