"""solo_fast: the SOLO family of instance segmentation models with fused kernels."""
from __future__ import annotations

__version__ = "0.1.0"

from ._backend import BackendUnavailableError, current_backend, use_backend
from . import ops
from .modeling import CONFIGS, SOLO
from .results import SOLOResult

__all__ = ["SOLO", "SOLOResult", "CONFIGS", "BackendUnavailableError", "current_backend", "use_backend", "ops", "__version__"]
