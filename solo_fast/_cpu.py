"""What the CPU can do, and how CPU inference gets its memory.

``block_cache()`` is the scope in which the fast inference path's tensors reuse freed
large blocks (the library's own, bounded, see ``csrc/cpu/block_cache.cpp``);
``keep_freed_memory()`` is the process-wide glibc setting the CLI makes.

``native_bf16()`` decides whether bf16 inference is worth it here: oneDNN runs bf16
convolutions on AMX tiles (Sapphire Rapids and later) or with AVX512-BF16 dot products
(Cooper Lake, Zen 4 and later). Without either it converts every value to fp32 and back
around fp32 arithmetic, which is slower than fp32 itself.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform
from typing import Dict, FrozenSet, Iterator

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
    """The model name, with AMD's family and model where the name does not say the
    generation ("AMD EPYC" is all some cloud machines report): "AMD EPYC (family 26 =
    Zen 5, model 2)"."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    family, model = info.get("cpu family"), info.get("model")
    if info.get("vendor_id") == "AuthenticAMD" and family and model and family.isdigit() and model.isdigit():
        zen = _amd_generation(int(family), int(model))
        return f"{name} (family {family}{' = ' + zen if zen else ''}, model {model})"
    return name


def _amd_generation(family: int, model: int) -> str:
    # AMD's family numbers: 0x17 Zen/Zen+/Zen 2, 0x19 Zen 3 (models 0x00-0x0f, 0x20-0x5f)
    # and Zen 4 (0x10-0x1f, 0x60-0xaf), 0x1a Zen 5.
    if family == 0x1A:
        return "Zen 5"
    if family == 0x19:
        return "Zen 4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0xAF else "Zen 3"
    if family == 0x17:
        return "Zen/Zen 2"
    return ""


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


def _block_cache_ops():
    """torch.ops.solo_fast's block-cache ops, or None (no compiled extension, or
    ``SOLO_FAST_CPU_BLOCK_CACHE=0``)."""
    if os.environ.get("SOLO_FAST_CPU_BLOCK_CACHE", "1") == "0":
        return None
    from . import _ext

    if _ext.load() is None:
        return None
    return torch.ops.solo_fast


@contextlib.contextmanager
def block_cache() -> Iterator[bool]:
    """Within this scope torch's CPU allocator keeps large freed blocks for the next
    tensors of their size (``csrc/cpu/block_cache.cpp``): the fast inference path's
    activations then reuse pages instead of faulting in fresh ones for every tensor and
    every image. Only blocks allocated inside a scope are kept, never more than the most
    that were in use at once; ``empty_cache()`` returns the idle ones to the OS. Yields
    whether the cache is active (False without the compiled extension, with
    ``SOLO_FAST_CPU_BLOCK_CACHE=0``, or when another allocator of higher priority is
    installed). Scopes may nest and overlap across threads."""
    ops = _block_cache_ops()
    if ops is None:
        yield False
        return
    active = ops.block_cache_enter()
    try:
        yield active
    finally:
        ops.block_cache_exit()


def empty_cache() -> int:
    """Returns the fast inference path's idle cached CPU blocks to the OS (as
    ``torch.cuda.empty_cache()`` does for CUDA); the bytes freed."""
    from . import _ext

    if _ext.load() is None:
        return 0
    return int(torch.ops.solo_fast.block_cache_release())


def cache_info() -> Dict[str, int]:
    """The block cache's bytes in use / idle / peak in use, hits and misses."""
    from . import _ext

    keys = ("in_use", "idle", "peak_in_use", "hits", "misses", "open_scopes", "installed")
    if _ext.load() is None:
        return dict.fromkeys(keys, 0)
    return dict(zip(keys, (int(v) for v in torch.ops.solo_fast.block_cache_stats())))
