"""Matrix NMS decay factors in Triton (DESIGN.md §2).

Three launches over masks already sorted by descending score:

1. ``_inter_kernel``: ``inter[i, j] = sum_p m_i[p] * m_j[p]`` for i < j only, as int8 x int8
   -> int32 tensor-core dots (exact for 0/1 masks). Tiles below the diagonal exit at once,
   and the pixels are split across the third grid axis (split-K) so that N = 500, i.e. a
   handful of 128 x 128 tiles, still fills every SM; partial sums meet in ``inter`` by
   integer atomics, which are exact and order-independent, hence deterministic.
2. ``_comp_kernel``: union, label test and IoU fused; the column max of the IoU gives the
   compensation ``comp[i] = max_k iou[k, i]``.
3. ``_decay_kernel``: recomputes the IoU (cheaper than storing a second N x N buffer)
   and takes the column min of ``f(iou[i, j]) / f(comp[i])``.

``inter`` is the only N x N buffer. Sorting and filtering stay in PyTorch
(:func:`solo_fast.ops.reference.matrix_nms`).

Cost at N = 500 masks of 200 x 336 (K = 67,200 pixels): the upper triangle holds
124,750 pairs, i.e. 8.4 G int8 MACs = 16.8 G ops (128 x 128 tiles compute 10 tiles, 22 G
ops, because diagonal tiles are full); the masks must be read once, 33.6 MB as bytes.
On an H100 SXM (3.35 TB/s, 1979 dense int8 TOPS) that is a floor of ~10 us for the
bytes and ~8.5 us for the tensor cores, so the op is memory-bound; tiles re-read each
mask from L2 about 5 times (172 MB), which is the likelier practical limit.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import aot_spec, interpreting, launch_kwargs


@triton.jit
def _inter_kernel(
    masks_ptr,  # int8 [N, K] 0/1, rows sorted by score, 16-byte aligned; pixel stride 1
    inter_ptr,  # int32 [N, N] zero-filled; gets inter[i, j] for i < j, the rest stays 0
    N,  # int32 number of masks
    K,  # int32 pixels per mask (H * W), zero-padded by the launcher to a multiple of 16
    stride_m,  # int32/int64 elements between consecutive masks (multiple of 16)
    n_bucket,  # int32 autotune key only: next power of two of N
    k_bucket,  # int32 autotune key only: next power of two of K
    BLOCK_M: tl.constexpr,  # rows (masks i) per program
    BLOCK_N: tl.constexpr,  # columns (masks j) per program
    BLOCK_K: tl.constexpr,  # pixels per dot
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    # A tile holds a pair i < j only if its first row is below its last column.
    if row0 >= tl.minimum(col0 + BLOCK_N, N) - 1:
        return
    num_split = tl.num_programs(2)
    k_blocks = tl.cdiv(K, BLOCK_K)
    blocks_per_split = tl.cdiv(k_blocks, num_split)
    k_lo = pid_k * blocks_per_split * BLOCK_K
    # A split past the end (more splits than K blocks need) adds nothing; leaving early
    # keeps a negative k_hi - k_lo away from the ragged-step arithmetic below.
    if k_lo >= K:
        return
    k_hi = tl.minimum(k_lo + blocks_per_split * BLOCK_K, K)

    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Clamped rather than masked rows keep the loads unpredicated along M/N; the extra
    # rows only feed accumulator entries that are never stored.
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    cols_c = tl.minimum(cols, N - 1).to(tl.int64)
    a_ptrs = masks_ptr + rows_c[:, None] * stride_m + offs_k[None, :]
    b_ptrs = masks_ptr + cols_c[:, None] * stride_m + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    # Full blocks unpredicated: a K mask of unknown alignment would split every load into
    # single bytes (and spill). Only the very last block of the last split is ragged.
    k_full = k_lo + ((k_hi - k_lo) // BLOCK_K) * BLOCK_K
    for k in range(k_lo, k_full, BLOCK_K):
        a = tl.load(a_ptrs + k)
        b = tl.load(b_ptrs + k)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    if k_full < k_hi:
        kmask = (k_full + offs_k) < k_hi
        a = tl.load(a_ptrs + k_full, mask=kmask[None, :], other=0)
        b = tl.load(b_ptrs + k_full, mask=kmask[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)

    keep = (rows[:, None] < cols[None, :]) & (cols[None, :] < N)
    # int32 offsets (the launcher keeps N * N < 2**31): 64-bit pointers for the 64
    # scalar atomics each thread issues would cost 128 registers and spill.
    out = inter_ptr + (rows[:, None] * N + cols[None, :])
    tl.atomic_add(out, acc, mask=keep, sem="relaxed")


@triton.jit
def _iou_tile(inter_ptr, areas_ptr, labels_ptr, rows, cols, a_j, l_j, N):
    """(iou [BLOCK_I, BLOCK_J] fp32, valid) of int32 ``rows`` x ``cols`` whose areas / labels
    are ``a_j`` / ``l_j``, with the label test applied; iou is 0 outside i < j < N."""
    valid = (rows[:, None] < cols[None, :]) & (cols[None, :] < N)
    inter = tl.load(inter_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=valid, other=0).to(tl.float32)
    a_i = tl.load(areas_ptr + rows, mask=rows < N, other=0.0)
    l_i = tl.load(labels_ptr + rows, mask=rows < N, other=-1)
    union = a_i[:, None] + a_j[None, :] - inter
    # Two empty masks have union 0; their IoU is 0 (as the reference's clamp to 1).
    iou = inter / tl.maximum(union, 1.0)
    same = l_i[:, None] == l_j[None, :]
    return tl.where(valid & same, iou, 0.0), valid


@triton.jit
def _columns(areas_ptr, labels_ptr, col0, N, BLOCK_J: tl.constexpr):
    """Columns j = col0 + [0, BLOCK_J), their areas and labels (-2 past N: never a row's label)."""
    cols = col0 + tl.arange(0, BLOCK_J)
    a_j = tl.load(areas_ptr + cols, mask=cols < N, other=0.0)
    l_j = tl.load(labels_ptr + cols, mask=cols < N, other=-2)
    return cols, a_j, l_j


@triton.jit
def _comp_kernel(
    inter_ptr,  # int32 [N, N] intersections, upper triangle
    areas_ptr,  # float32 [N] mask areas
    labels_ptr,  # int32 [N] class labels
    comp_ptr,  # float32 [N] out: comp[j] = max_{i < j, same label} iou[i, j]
    N,  # int32 number of masks
    BLOCK_I: tl.constexpr,  # rows per step
    BLOCK_J: tl.constexpr,  # columns per program
):
    col0 = tl.program_id(0) * BLOCK_J
    cols, a_j, l_j = _columns(areas_ptr, labels_ptr, col0, N, BLOCK_J)
    comp = tl.zeros((BLOCK_J,), dtype=tl.float32)
    # Only rows above the block's last column can pair with it.
    for row0 in range(0, col0 + BLOCK_J, BLOCK_I):
        rows = row0 + tl.arange(0, BLOCK_I)
        iou, valid = _iou_tile(inter_ptr, areas_ptr, labels_ptr, rows, cols, a_j, l_j, N)
        comp = tl.maximum(comp, tl.max(iou, axis=0))
    tl.store(comp_ptr + cols, comp, mask=cols < N)


@triton.jit
def _decay_kernel(
    inter_ptr,  # int32 [N, N] intersections, upper triangle
    areas_ptr,  # float32 [N] mask areas
    labels_ptr,  # int32 [N] class labels
    comp_ptr,  # float32 [N] compensation from _comp_kernel
    decay_ptr,  # float32 [N] out: decay factors
    N,  # int32 number of masks
    sigma,  # float32 gaussian sigma (unused by the linear kernel)
    LINEAR: tl.constexpr,  # 0: gaussian exp(-sigma x^2), 1: linear 1 - x
    BLOCK_I: tl.constexpr,  # rows per step
    BLOCK_J: tl.constexpr,  # columns per program
):
    col0 = tl.program_id(0) * BLOCK_J
    cols, a_j, l_j = _columns(areas_ptr, labels_ptr, col0, N, BLOCK_J)
    # Pairs i >= j contribute f(0) / f(comp[i]) >= 1 in the reference's full-matrix min,
    # and row 0 always gives a value <= 1, so starting at 1 and visiting i < j only
    # reproduces the reference exactly (and gives mask 0 a decay of 1).
    decay = tl.full((BLOCK_J,), 1.0, dtype=tl.float32)
    for row0 in range(0, col0 + BLOCK_J, BLOCK_I):
        rows = row0 + tl.arange(0, BLOCK_I)
        iou, valid = _iou_tile(inter_ptr, areas_ptr, labels_ptr, rows, cols, a_j, l_j, N)
        comp = tl.load(comp_ptr + rows, mask=rows < N, other=0.0)
        if LINEAR:
            # Clamped so duplicates (comp = iou = 1) give 0 instead of 0 / 0.
            ratio = (1.0 - iou) / tl.maximum(1.0 - comp, 1e-6)[:, None]
        else:
            # Same float32 operation order as the reference and csrc/common/matrix_nms.h.
            ratio = tl.exp(-sigma * (iou * iou)) / tl.exp(-sigma * (comp * comp))[:, None]
        decay = tl.minimum(decay, tl.min(tl.where(valid, ratio, 1.0), axis=0))
    tl.store(decay_ptr + cols, decay, mask=cols < N)


# Intersection tiles. int8 operands: a stage holds (BLOCK_M + BLOCK_N) * BLOCK_K bytes,
# which keeps every config within sm_80's 163 KB of shared memory. 128 x 128 int32
# accumulators use 8 warps: with them ptxas (sm_80 and sm_90a, Triton 3.9) reports
# 254-255 registers and no spills (with 4 warps, 128 x 128 x 64 spills ~600 B); the
# 64 x 64 tiles take 148-168 registers with 4 warps.
_INTER_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 256}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 256}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
]
# The epilogue kernels touch N^2 / 2 floats once each; their tile shape hardly matters.
_EPILOGUE_CONFIG = triton.Config({"BLOCK_I": 64, "BLOCK_J": 32}, num_warps=4)
# Programs a wave holds under the interpreter: few, but several splits so the atomics run.
_INTERPRETER_SMS = 8

_inter_kernel_tuned = triton.autotune(
    configs=_INTER_CONFIGS,
    key=["n_bucket", "k_bucket"],
    # Autotuning launches the kernel once per config; each launch accumulates.
    reset_to_zero=["inter_ptr"],
)(_inter_kernel)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def _split_k(n: int, k: int, block_m: int, block_n: int, block_k: int, num_sms: int) -> int:
    # Tiles holding a pair i < j: in column block bn, the row blocks starting below its last column.
    live = sum(triton.cdiv(min((bn + 1) * block_n, n) - 1, block_m) for bn in range(triton.cdiv(n, block_n)))
    # One wave of programs; on the GPU each split keeps at least 4 K blocks so the
    # pipeline fills (the interpreter takes any split, to exercise the atomics).
    k_blocks = triton.cdiv(k, block_k)
    min_blocks = 1 if interpreting() else 4
    split = max(1, min(triton.cdiv(num_sms, max(live, 1)), k_blocks // min_blocks))
    # Equal shares of whole K blocks, none empty.
    return triton.cdiv(k_blocks, triton.cdiv(k_blocks, split))


def launch_decay(
    masks: torch.Tensor,
    labels: torch.Tensor,
    areas: torch.Tensor,
    kernel: str,
    sigma: float,
    *,
    config: Optional[int] = None,
) -> torch.Tensor:
    """Decay factors (float32 [N]) of ``masks`` [N, H, W] bool/uint8 (0/1) sorted by score.

    ``config`` picks one entry of ``_INTER_CONFIGS`` instead of autotuning (tests; always
    so under the interpreter, where autotuning would only time numpy).
    """
    n = masks.shape[0]
    device = masks.device
    decay = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return decay
    if n * n >= 2**31:
        raise ValueError(f"masks: at most 46340 masks fit the int32 N x N buffer of the triton kernel, got {n}")
    flat = masks.reshape(n, -1)
    k = flat.shape[1]
    # Rows must start on 16-byte boundaries and K be a multiple of 16 so every load is a
    # 16-byte vector (byte loads spill); SOLO's masks (H, W multiples of 8) already are.
    # Otherwise copy once into zero-padded rows: the zeros add nothing to the dots.
    k_pad = triton.cdiv(k, 16) * 16
    # storage_offset, not data_ptr(): the op is also traced with FakeTensors (torch.compile),
    # and allocations themselves are at least 16-byte aligned.
    if flat.stride(1) != 1 or flat.stride(0) % 16 or k_pad != k or flat.storage_offset() % 16:
        padded = torch.zeros((n, k_pad), dtype=torch.uint8, device=device)
        padded[:, :k] = flat
        flat, k = padded, k_pad
    # bool and uint8 share the byte layout of int8 0/1: a view, no conversion pass.
    flat = flat.view(torch.int8)
    areas = areas.to(torch.float32).contiguous()
    # One label dtype keeps one compiled variant of the epilogue kernels (the AOT test's).
    labels = labels.to(torch.int32).contiguous()
    inter = torch.zeros((n, n), dtype=torch.int32, device=device)
    comp = torch.empty(n, dtype=torch.float32, device=device)
    if k > 0:
        sms = _num_sms(device)

        def grid(meta):
            bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
            return (triton.cdiv(n, bm), triton.cdiv(n, bn), _split_k(n, k, bm, bn, bk, sms))

        args = (flat, inter, n, k, flat.stride(0), triton.next_power_of_2(n), triton.next_power_of_2(k))
        if config is None and not interpreting():
            wrap_triton(_inter_kernel_tuned)[grid](*args)
        else:
            cfg = _INTER_CONFIGS[-1 if config is None else config]
            wrap_triton(_inter_kernel)[grid](*args, **launch_kwargs(cfg))
    grid_j = (triton.cdiv(n, _EPILOGUE_CONFIG.kwargs["BLOCK_J"]),)
    wrap_triton(_comp_kernel)[grid_j](inter, areas, labels, comp, n, **launch_kwargs(_EPILOGUE_CONFIG))
    wrap_triton(_decay_kernel)[grid_j](
        inter, areas, labels, comp, decay, n, float(sigma), LINEAR=int(kernel == "linear"),
        **launch_kwargs(_EPILOGUE_CONFIG),
    )
    return decay


def aot_specs() -> List[dict]:
    """Every kernel and config of this module, for ahead-of-time compilation (DESIGN.md §5).

    The intersection kernel specialises on what launch_decay guarantees (16-aligned mask
    rows and K, a fresh ``inter``); the epilogue kernels are compiled without alignment.
    """
    epilogue = {"inter_ptr": "*i32", "areas_ptr": "*fp32", "labels_ptr": "*i32", "comp_ptr": "*fp32"}
    specs = [
        aot_spec(_inter_kernel, c, {"masks_ptr": "*i8", "inter_ptr": "*i32"},
                 aligned=("masks_ptr", "inter_ptr", "K", "stride_m"), tensor_cores=True)
        for c in _INTER_CONFIGS
    ]
    specs.append(aot_spec(_comp_kernel, _EPILOGUE_CONFIG, epilogue))
    specs += [
        aot_spec(_decay_kernel, _EPILOGUE_CONFIG, {**epilogue, "decay_ptr": "*fp32", "sigma": "fp32"}, LINEAR=linear)
        for linear in (0, 1)
    ]
    return specs
