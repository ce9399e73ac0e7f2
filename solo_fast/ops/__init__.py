"""Public ops of DESIGN.md §2 (``__all__``); the other names here are what the model's CPU
fast form asks of the ops (``winograd_usable``, ``WinogradConv2d``, ``brgemm_reads``, ...).

Each op lives in its own module ``_<op>.py``: the public wrapper, which checks its inputs
once and dispatches to a backend (``_dispatch.py``), and all of its implementations --
the reference (:mod:`.reference`) and the fast paths -- registered there with
:func:`solo_fast._backend.register` when the module is imported, below.
``backend=None`` follows :func:`solo_fast.use_backend` / ``SOLO_FAST_BACKEND`` (default
``"auto"``); ``"auto"`` picks the fastest implementation registered for the tensors'
device and falls back to ``"reference"``. Each fast path guards its own optional
dependency (the compiled extension, triton) and stays silent when it is absent.
"""
from ._binary_masks import binary_masks_x4, binary_masks_x4_is_fast
from ._brgemm import usable as brgemm_reads
from ._cell_masks import cell_masks, cell_masks_are_dense
from ._center_region import center_region_assign, center_region_assign_batch
from ._coord_conv import coord_conv2d
from ._deform_conv import deform_conv2d
from ._dispatch import available_backends
from ._mask_predict import mask_predict
from ._masks_to_boxes import masks_to_boxes
from ._network import network_form
from ._matrix_nms import matrix_nms
from .reference import Targets
from ._winograd import WinogradConv2d, winograd_conv3x3, winograd_pack, winograd_profitable, winograd_usable

__all__ = [
    "Targets",
    "matrix_nms",
    "center_region_assign",
    "center_region_assign_batch",
    "coord_conv2d",
    "deform_conv2d",
    "mask_predict",
    "masks_to_boxes",
    "cell_masks",
    "binary_masks_x4",
    "cell_masks_are_dense",
    "available_backends",
    "network_form",
    "winograd_conv3x3",
    "winograd_pack",
]
