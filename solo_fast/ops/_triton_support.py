"""When the Triton backends can run: shared by every Triton-backed op."""
from __future__ import annotations

import functools
import importlib.util

import torch

from solo_fast.kernels._common import interpreting


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


def opaque_under_interpreter(op, fake):
    """Make a ``torch.library.triton_op`` traceable (FakeTensors, torch.compile, opcheck)
    when its kernels run in the Triton interpreter; a no-op otherwise.

    ``triton_op`` uses the op's own body as its fake kernel and, under
    FunctionalTensorMode (AOTAutograd), decomposes the op into its ``wrap_triton`` kernel
    calls. Both rely on ``wrap_triton`` turning each launch into a traceable higher-order
    op, but under ``TRITON_INTERPRET=1`` ``@triton.jit`` returns an ``InterpretedFunction``
    that ``wrap_triton`` hands back unwrapped (torch 2.13), so the body would launch the
    interpreter on FakeTensors ("Attempted to set the storage of a tensor on device
    'meta' to a storage on different device 'cpu'"). Here the op instead gets ``fake``
    (output shapes and dtypes only) as its fake kernel and stays one opaque node under
    FunctionalTensorMode -- what torch.export does for triton ops -- so a compiled graph
    calls the real op, which launches the interpreter on real CPU tensors.
    """
    if not interpreting():
        return op
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def keep_opaque(mode, func, types, args, kwargs):
        return mode.__torch_dispatch__(func, types, args, kwargs)

    op.register_fake(fake)
    op.register_torch_dispatch(FunctionalTensorMode, keep_opaque)
    return op


def lazy_triton_op(define, name: str):
    """(available, get) for a ``triton_op`` that ``define()`` (an ``lru_cache``'d function)
    creates on first use, so that importing solo_fast never imports triton.

    TorchDynamo cannot trace ``define`` (``triton_op`` is on its skip list, and it ignores
    the ``lru_cache`` around it), so ``get()`` reads ``torch.ops.solo_fast.<name>`` while
    compiling. ``available(device_type)`` defines the op, and it always runs first and
    eagerly: the ops resolve their backend outside the traced code
    (``torch.compiler.assume_constant_result``).
    """

    def available(device_type: str) -> bool:
        if not triton_available(device_type):
            return False
        define()
        return True

    def get():
        if torch.compiler.is_compiling():
            return getattr(torch.ops.solo_fast, name).default
        return define()

    return available, get
