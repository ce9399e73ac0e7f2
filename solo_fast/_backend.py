"""Backend selection shared by every op and, through the ops, by the whole model.

The active backend is, in order of precedence: the ``backend=`` argument of an op, the
innermost ``with solo_fast.use_backend(...)`` block, the ``SOLO_FAST_BACKEND`` environment
variable, and finally ``"auto"``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
CONCRETE = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "SOLO_FAST_BACKEND"

_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("solo_fast_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run this op on these tensors."""


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what}: expected one of {BACKENDS}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend the model and ops use when no ``backend=`` argument is given."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env.strip().lower(), f"environment variable {ENV_VAR}")
    return "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run everything inside the block on backend ``name`` (e.g. ``"reference"``)."""
    _check_name(name, "use_backend(name)")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


# op name -> backend -> (implementation, availability check on the op's tensors' device)
_REGISTRY: Dict[str, Dict[str, Tuple[Callable, Callable[[str], bool]]]] = {}

# Which fast backends "auto" tries, in order, per device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


def register(op: str, backend: str, available: Callable[[str], bool]) -> Callable[[Callable], Callable]:
    """Register ``fn`` as the ``backend`` implementation of ``op``.

    ``available(device_type)`` says whether it can run on tensors of that device type here
    (e.g. the C++ extension is built, triton is importable).
    """
    if backend not in CONCRETE:
        raise ValueError(f"backend: expected one of {CONCRETE}, got {backend!r}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = (fn, available)
        return fn

    return deco


def available_backends(op: str, device_type: str) -> Tuple[str, ...]:
    """Concrete backends of ``op`` that can run on ``device_type`` tensors here."""
    impls = _REGISTRY.get(op, {})
    return tuple(b for b in CONCRETE if b in impls and impls[b][1](device_type))


def implementation(op: str, backend: str) -> Callable:
    """The implementation of ``op`` registered for the concrete ``backend`` (e.g. the one
    :func:`resolve` picked), without checking that it can run here."""
    impls = _REGISTRY.get(op, {})
    if backend not in impls:
        raise BackendUnavailableError(f"backend {backend!r} is not implemented for {op}")
    return impls[backend][0]


def resolve(op: str, backend: Optional[str], device_type: str) -> Tuple[str, Callable]:
    """Pick the implementation of ``op`` for tensors on ``device_type``."""
    name = current_backend() if backend is None else _check_name(backend, "backend")
    impls = _REGISTRY.get(op, {})
    if name == "auto":
        for cand in _AUTO_ORDER.get(device_type, ()):
            if cand in impls and impls[cand][1](device_type):
                return cand, impls[cand][0]
        name = "reference"
    if name not in impls:
        raise BackendUnavailableError(
            f"backend {name!r} is not implemented for {op}; available here for {device_type} "
            f"tensors: {available_backends(op, device_type)}"
        )
    fn, ok = impls[name]
    if not ok(device_type):
        raise BackendUnavailableError(
            f"backend {name!r} of {op} cannot run on {device_type} tensors on this machine "
            f"(available: {available_backends(op, device_type)})"
        )
    return name, fn
