"""Registers the fast implementations of the ops (C++/CUDA extension, Triton kernels).

Each registration states on which device types it can run; ``auto`` picks them before
the reference path (DESIGN.md §2).
"""
from . import _center_region  # noqa: F401
from . import _coord_conv  # noqa: F401
from . import _matrix_nms  # noqa: F401
from . import _mask_predict  # noqa: F401
from . import _cell_masks  # noqa: F401
