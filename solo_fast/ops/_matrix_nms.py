"""Fast backends of ``matrix_nms`` (DESIGN.md §2).

Both replace only :func:`reference.matrix_decay` (the N decay factors of masks already
sorted by score); sorting, ``nms_pre``, ``filter_thr`` and ``max_num`` stay in
:func:`reference.matrix_nms`, single-sourced.

- "cpu": ``torch.ops.solo_fast.matrix_nms_decay_popcount`` (csrc/cpu/matrix_nms_kernel.cpp),
  bit-packed masks and popcounts, and ``matrix_nms_mask_area`` for the default areas.
- "triton": ``torch.ops.solo_fast.matrix_nms_decay``, a ``torch.library.triton_op`` over
  kernels/matrix_nms.py: int8 tensor-core intersections. It runs on CUDA tensors, and on
  CPU tensors under ``TRITON_INTERPRET=1`` (DESIGN.md §5).
"""
from __future__ import annotations

import functools

import torch

from ._triton_support import lazy_triton_op, opaque_under_interpreter
from .. import _backend, _ext
from . import reference

_CPP_OP = "solo_fast::matrix_nms_decay_popcount"


# --------------------------------------------------------------------------------------
# "cpu": the compiled C++ op
# --------------------------------------------------------------------------------------
def _cpp_loaded() -> bool:
    return _ext.available() and hasattr(torch.ops.solo_fast, "matrix_nms_decay_popcount")


def cpu_available(device_type: str) -> bool:
    return device_type == "cpu" and _cpp_loaded()


def decay_cpu(masks: torch.Tensor, labels: torch.Tensor, areas: torch.Tensor, kernel: str, sigma: float) -> torch.Tensor:
    """Drop-in for :func:`reference.matrix_decay` on the C++ op."""
    return torch.ops.solo_fast.matrix_nms_decay_popcount(masks, labels, areas, kernel, float(sigma))


def matrix_nms_cpu(masks, labels, scores, *, mask_area=None, **kwargs):
    """:func:`reference.matrix_nms` on the C++ decay.

    The default ``mask_area`` is counted by the C++ op too (nonzero pixels, which is the
    reference's sum for 0/1 masks): torch's ``sum`` over a bool [500, 200 * 336] tensor
    alone took 120-220 ms on this 2-core CPU, ten times the whole C++ decay.
    """
    if mask_area is None and masks.shape[0] > 0:
        mask_area = torch.ops.solo_fast.matrix_nms_mask_area(masks)
    return reference.matrix_nms(masks, labels, scores, mask_area=mask_area, decay_fn=decay_cpu, **kwargs)


if _cpp_loaded():

    @torch.library.register_fake(_CPP_OP)
    def _decay_popcount_fake(masks, labels, areas, kernel, sigma):
        return masks.new_empty((masks.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("solo_fast::matrix_nms_mask_area")
    def _mask_area_fake(masks):
        return masks.new_empty((masks.shape[0],), dtype=torch.int64)


_backend.register("matrix_nms", "cpu", cpu_available)(matrix_nms_cpu)


# --------------------------------------------------------------------------------------
# "triton": the triton_op
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _triton_op():
    """Defines ``solo_fast::matrix_nms_decay`` on first use, so importing solo_fast never imports triton."""
    from torch.library import triton_op

    from solo_fast.kernels import matrix_nms as kernels

    @triton_op("solo_fast::matrix_nms_decay", mutates_args=())
    def matrix_nms_decay(
        masks: torch.Tensor, labels: torch.Tensor, areas: torch.Tensor, kernel: str, sigma: float
    ) -> torch.Tensor:
        return kernels.launch_decay(masks, labels, areas, kernel, sigma)

    def fake(masks, labels, areas, kernel, sigma):
        return masks.new_empty((masks.shape[0],), dtype=torch.float32)

    return opaque_under_interpreter(matrix_nms_decay, fake)


def decay_triton(masks: torch.Tensor, labels: torch.Tensor, areas: torch.Tensor, kernel: str, sigma: float) -> torch.Tensor:
    """Drop-in for :func:`reference.matrix_decay` on the Triton kernels."""
    return _get_op()(masks, labels, areas, kernel, float(sigma))


_triton_ready, _get_op = lazy_triton_op(_triton_op, "matrix_nms_decay")
_backend.register("matrix_nms", "triton", _triton_ready)(functools.partial(reference.matrix_nms, decay_fn=decay_triton))


# --------------------------------------------------------------------------------------
# Cost model (for benchmarks/latency.py's FLOPs / bytes / floor columns)
# --------------------------------------------------------------------------------------
def matrix_nms_cost(n: int, height: int, width: int) -> dict:
    """Work of the decay on N masks of height x width, counting the upper triangle only.

    ``ops``: 2 * N(N-1)/2 * H*W multiply-adds of 0/1 values (int8 tensor-core ops on the
    GPU); ``bytes``: the masks read once as bytes plus the N x N int32 intersections
    written once and read twice, the least the three-kernel Triton design moves.
    """
    pairs = n * (n - 1) // 2
    pixels = height * width
    return {"ops": 2 * pairs * pixels, "bytes": n * pixels + 3 * 4 * n * n}


def floor_us(cost: dict, *, bytes_per_s: float, ops_per_s: float) -> float:
    """Lower bound in microseconds: the slower of moving the bytes and doing the ops."""
    return 1e6 * max(cost["bytes"] / bytes_per_s, cost["ops"] / ops_per_s)
