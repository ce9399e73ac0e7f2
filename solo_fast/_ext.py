"""Loads the compiled extension ``solo_fast._C`` once; without it everything runs on the reference path."""
from __future__ import annotations

import warnings

_loaded = None
_error = None


def load():
    """Return the ``solo_fast._C`` module, or None (with a single warning) if it cannot be imported."""
    global _loaded, _error
    if _loaded is None and _error is None:
        try:
            from . import _C  # noqa: F401  (registers torch.ops.solo_fast.*)

            _loaded = _C
        except (ImportError, OSError) as exc:  # not built, or built against another torch
            _error = exc
            warnings.warn(
                f"solo_fast._C could not be imported ({exc}); the compiled ops are unavailable and "
                "solo_fast runs them on the reference path. Rebuild with "
                "`pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _loaded


def available() -> bool:
    return load() is not None
