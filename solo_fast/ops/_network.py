"""Which form of the network runs: the backend decision for the model as a whole.

The layers themselves are torch's (convolutions, norms); what the backend chooses is
their arrangement. ``"reference"`` runs the modules exactly as published; on the CPU,
``"auto"`` and ``"cpu"`` run the fast form of ``modeling/fast_network.py`` (channels-last,
BatchNorm folded into the convs). On other devices every backend runs the modules as they
are (their fast paths are the ops').
"""
from __future__ import annotations

import torch

from .. import _backend


def network_form(device: torch.device) -> str:
    """``"cpu"`` (the fast form) or ``"reference"`` for a network on ``device`` now."""
    if device.type == "cpu" and _backend.current_backend() in ("auto", "cpu"):
        return "cpu"
    return "reference"
