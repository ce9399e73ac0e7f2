"""Models of the SOLO family. Imports only :mod:`solo_fast.ops` for its kernels (DESIGN.md §4)."""
from .configs import CONFIGS, get_config
from .solo import SOLO

__all__ = ["SOLO", "CONFIGS", "get_config"]
