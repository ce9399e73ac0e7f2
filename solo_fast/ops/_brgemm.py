"""Whether torch's brgemm micro-kernel runs solo_fast's CPU GEMMs here
(``winograd_conv3x3``, ``mask_logits``; csrc/cpu/brgemm.h): the extension is built with
those ops, and ``brgemm_usable`` says this CPU runs the layout fast (AVX-512; AVX512-BF16
for bf16; not AMX, where oneDNN wants its own packing). Checked once per dtype."""
from __future__ import annotations

import functools

import torch

from .. import _ext

_OPS = ("brgemm_usable", "winograd_conv3x3", "mask_logits")


@functools.lru_cache(maxsize=None)
def usable(dtype: torch.dtype) -> bool:
    if dtype not in (torch.float32, torch.bfloat16) or not _ext.available():
        return False
    if not all(hasattr(torch.ops.solo_fast, op) for op in _OPS):
        return False
    return bool(torch.ops.solo_fast.brgemm_usable(dtype))
