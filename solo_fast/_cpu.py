"""What the CPU can do, and the process-wide allocator setting that CPU inference wants.

``native_bf16()`` decides whether bf16 inference is worth it here: oneDNN runs bf16
convolutions on AMX tiles (Sapphire Rapids and later) or with AVX512-BF16 dot products
(Cooper Lake, Zen 4 and later). Without either it converts every value to fp32 and back
around fp32 arithmetic, which is slower than fp32 itself.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
from typing import Dict, FrozenSet

import torch


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> Dict[str, str]:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return {}
    info: Dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def cpu_flags() -> FrozenSet[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def bf16_isa() -> str:
    """The native bf16 instructions found: ``"AMX"``, ``"AVX512-BF16"`` or ``""``."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if not flags and torch.backends.mkldnn.is_available():  # not Linux: ask oneDNN
        return "AVX512-BF16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ""
    return ""


def isa_summary() -> str:
    """The CPU's widest vector ISA and its bf16 support, e.g. ``"AVX512 + AVX512-BF16"``."""
    flags = cpu_flags()
    vec = "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else torch.backends.cpu.get_cpu_capability()
    return f"{vec} + {bf16_isa()}" if bf16_isa() else f"{vec}, no native bf16"


def native_bf16() -> bool:
    return bool(bf16_isa())


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory in the process instead of returning it to
    the OS (as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>`` would at start-up).

    glibc serves every block over 32 MB with its own ``mmap`` and unmaps it when freed, so
    each image's activations arrive in fresh pages that the kernel faults in and zeroes
    again (about 1 s per SOLO R50 image on 2 cores, README "CPU performance"). After this
    call the process keeps its peak memory until it exits: right for ``solo-fast predict``
    / ``eval``, a choice for the application in a library. Returns False where it cannot
    be done (not glibc).
    """
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the trim threshold is an int: its largest value.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
