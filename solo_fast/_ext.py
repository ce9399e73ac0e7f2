"""Loads the compiled extension ``solo_fast._C`` once; without it everything runs on the reference path."""
from __future__ import annotations

import importlib
import importlib.util
import warnings

_loaded = None
_error = None

_FALLBACK = "the compiled ops are unavailable and solo_fast runs them on the reference path"
_REBUILD = "`pip install --no-build-isolation .` in solo_fast's source tree (`-e .` for a checkout)"


def _message(exc: BaseException) -> str:
    """What went wrong and what to do, in the user's terms (`from . import _C` of a missing
    module says "partially initialized module ... circular import", which it is not)."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return ("solo_fast was installed without its compiled extension solo_fast._C (it is built only when torch "
                f"is importable at build time); {_FALLBACK}. Install torch first, then reinstall with {_REBUILD}.")
    import torch

    return (f"solo_fast._C could not be imported ({exc}), most likely because it was built against another torch "
            f"than the installed torch {torch.__version__}; {_FALLBACK}. Rebuild it against this torch with "
            f"{_REBUILD}.")


def load():
    """Return the ``solo_fast._C`` module, or None (with a single warning) if it cannot be imported."""
    global _loaded, _error
    if _loaded is None and _error is None:
        try:
            # (registers torch.ops.solo_fast.*)
            _loaded = importlib.import_module(f"{__package__}._C")
        except (ImportError, OSError) as exc:  # not built, or built against another torch
            _error = exc
            warnings.warn(_message(exc), RuntimeWarning, stacklevel=2)
    return _loaded


def available() -> bool:
    return load() is not None
