"""solo_fast: the SOLO family of instance segmentation models with fused kernels."""
from __future__ import annotations

import torch

__version__ = "0.1.0"

# The oldest torch with every API solo_fast uses: torch.library.triton_op and wrap_triton
# (public in 2.6), torch.serialization.safe_globals and get_unsafe_globals_in_checkpoint
# (2.5), torch.library.register_fake (2.4). Keep in step with pyproject.toml.
TORCH_MIN = (2, 6)


def _check_torch(version: str) -> None:
    import re

    found = re.match(r"(\d+)\.(\d+)", version)  # the release only: a 2.6 nightly or pre-release passes
    if found is None or tuple(map(int, found.groups())) < TORCH_MIN:
        need = ".".join(map(str, TORCH_MIN))
        raise ImportError(f"solo_fast needs torch>={need} (torch.library.triton_op), but the installed torch is "
                          f"{version}; upgrade it: pip install -U 'torch>={need}'")


_check_torch(torch.__version__)

from ._backend import BackendUnavailableError, current_backend, use_backend  # noqa: E402
from . import ops  # noqa: E402
from ._cpu import empty_cache  # noqa: E402
from .modeling import CONFIGS, SOLO  # noqa: E402
from .results import SOLOResult  # noqa: E402

__all__ = ["SOLO", "SOLOResult", "CONFIGS", "BackendUnavailableError", "current_backend", "use_backend", "ops", "empty_cache",
           "__version__"]
