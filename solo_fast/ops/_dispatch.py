"""How a public op picks and calls its implementation: shared by every ``_<op>.py``.

``backend=None`` follows :func:`solo_fast.use_backend` / ``SOLO_FAST_BACKEND`` (default
``"auto"``); ``"auto"`` picks the fastest implementation registered for the tensors'
device and falls back to ``"reference"``. Each op's module registers all of its
implementations, the reference included, with :func:`solo_fast._backend.register`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple, Union

import torch

from .. import _backend

# A public op whose backends are those of the op it dispatches, its kernel boundary:
# Matrix NMS sorts and filters in PyTorch on every backend, only its decay is dispatched.
_DISPATCHED_AS = {"matrix_nms": "matrix_decay"}


def always(device_type: str) -> bool:
    """Availability of the reference implementations: every device, every machine."""
    return True


@torch.compiler.assume_constant_result
def _backend_at_trace_time(op: str, backend: Optional[str], device_type: str) -> str:
    return _backend.resolve(op, backend, device_type)[0]


def resolve(op: str, backend: Optional[str], device_type: str) -> Tuple[str, Callable]:
    """:func:`solo_fast._backend.resolve`, readable by torch.compile.

    The active backend lives in a ContextVar, which TorchDynamo cannot trace (a graph
    break before every op); while compiling it is read once, when the graph is traced,
    and baked into the graph. A compiled model therefore keeps the backend it was traced
    with: call ``torch._dynamo.reset()`` after switching backends.
    """
    if torch.compiler.is_compiling():
        name = _backend_at_trace_time(op, backend, device_type)
        return name, _backend.implementation(op, name)
    return _backend.resolve(op, backend, device_type)


def autocast_off(device_type: str):
    """Ops whose contract is fp32 arithmetic (Matrix NMS intersections, mask logits, target
    downsampling) run with autocast off: under autocast a matmul would be silently
    rounded to bf16/fp16, e.g. intersections of more than 256 pixels in bf16."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def available_backends(op: str, device: Union[str, torch.device] = "cpu") -> Tuple[str, ...]:
    """Concrete backends of ``op`` usable for tensors on ``device`` on this machine."""
    return _backend.available_backends(_DISPATCHED_AS.get(op, op), torch.device(device).type)
