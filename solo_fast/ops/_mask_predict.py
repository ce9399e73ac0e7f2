"""``mask_predict`` (DESIGN.md §2): the public op, and its fast paths ("reference" is
:func:`reference.mask_predict`).

"cpu": for contiguous features, the reference's own formulation -- one fp32 GEMM, ``+ bias``, sigmoid,
``> mask_thr``, the per-mask sums -- run as in-place passes over the output tensors. The
only temporaries beyond the outputs are the maskness product, computed a chunk of masks
at a time into one buffer of at most CHUNK_ELEMS values, and the fp32 logits when
``out_dtype`` is not fp32. It gives the reference's ``soft``, ``binary``, ``area`` and
``maskness`` bit for bit: the GEMM is the very same call (the BLAS may round a row
differently when given fewer rows -- MKL does at some small shapes -- so it is
deliberately not split over K), the elementwise passes are the same kernels on the same
shapes, and the maskness sums reduce each mask's H*W values as the reference does.
Channels-last features (the CPU fast network's SOLOv2 mask features), fp32 or bf16 with
bf16-valued kernels, take another GEMM: ``torch.ops.solo_fast.mask_logits``
(csrc/cpu/mask_logits_kernel.cpp, torch's brgemm micro-kernel -- or for fp32 on AVX2 CPUs
without a fast brgemm, solo_fast's AVX2 one -- reading the features' rows as they lie, the
bias added as it writes). That skips a bf16 -> fp32 copy of the features
and MKL's slow transposed operand (~21 ms against ~6 ms for fp32 at 800x1344 on a Zen 5).
Its logits are the same function summed in another order: within fp32 rounding of the
reference, and a pixel within that rounding of ``mask_thr`` may fall either side.
Bounding memory over thousands of masks is the caller's job (a model calls it per chunk
of candidates, e.g. for LVIS; the reference then sees the same chunks).

"triton": one fused kernel (``kernels/mask_predict.py``) behind the ``triton_op``
``solo_fast::mask_predict``.

Both are inference paths: when autograd needs the soft masks' gradient they defer to
the reference formulation, whose graph is the plain one.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .. import _backend, _checks, _ext
from . import _brgemm, reference
from ._dispatch import always, autocast_off, resolve
from ._triton_support import interpreting, lazy_triton_op, opaque_under_interpreter

# Bound on the CPU path's one temporary (the maskness product), in fp32 elements: 64 MB.
# Fewer, larger chunks rather than many small ones: each chunk is two parallel regions,
# and with the OpenMP threads sharing their cores with other work (the reference CPU), a
# region costs a scheduler time slice (4-16 ms measured) more than its arithmetic.
CHUNK_ELEMS = 1 << 24


# --------------------------------------------------------------------------------------
# The public op
# --------------------------------------------------------------------------------------
def mask_predict(
    features: torch.Tensor,
    kernels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    mask_thr: float = 0.5,
    out_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``soft = sigmoid(kernels @ features + bias)``; returns (soft, binary, area, maskness).

    Inputs of any float dtype (fp16/bf16 included, mixed too); the logits are fp32 (autocast
    is switched off inside) and ``binary`` (bool), ``area`` (int64) and ``maskness`` (fp32)
    come from them; ``soft`` is returned in ``out_dtype`` (default fp16 on the GPU, fp32
    on the CPU). NaN logits give NaN soft values, which are outside the binary mask and
    count in neither ``area`` nor ``maskness``.
    """
    _checks.tensor("features", features, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("kernels", kernels, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    if kernels.shape[1] != features.shape[0]:
        raise ValueError(
            f"kernels: expected {features.shape[0]} columns (the channels of features), got {kernels.shape[1]}"
        )
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        _checks.length("bias", bias, kernels.shape[0], "kernel")
    if isinstance(mask_thr, bool) or not isinstance(mask_thr, (int, float)) or not 0 <= mask_thr <= 1:
        raise ValueError(f"mask_thr: expected a number in [0, 1], got {mask_thr!r}")
    if out_dtype is not None and out_dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"out_dtype: expected a floating dtype, got {out_dtype!r}")
    _checks.same_device(features=features, kernels=kernels, bias=bias)
    _, fn = resolve("mask_predict", backend, features.device.type)
    with autocast_off(features.device.type):
        return fn(features, kernels, bias, mask_thr=float(mask_thr), out_dtype=out_dtype)


_backend.register("mask_predict", "reference", always)(reference.mask_predict)


# --------------------------------------------------------------------------------------
# "cpu": the reference's formulation, in place
# --------------------------------------------------------------------------------------
def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _default_out_dtype(features: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return torch.float16 if features.is_cuda else torch.float32


def mask_predict_cpu(
    features: torch.Tensor,
    kernels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    mask_thr: float = 0.5,
    out_dtype: Optional[torch.dtype] = None,
    chunk: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if _wants_grad(features, kernels, bias):
        return reference.mask_predict(features, kernels, bias, mask_thr=mask_thr, out_dtype=out_dtype)
    out_dtype = _default_out_dtype(features, out_dtype)
    e, h, w = features.shape
    k = kernels.shape[0]
    n = h * w
    dev = features.device
    binary = torch.empty(k, h, w, dtype=torch.bool, device=dev)
    area = torch.empty(k, dtype=torch.int64, device=dev)
    maskness = torch.empty(k, dtype=torch.float32, device=dev)
    rows = _channels_last_rows(features, kernels)
    if rows is not None:
        # The fast network's channels-last features: brgemm reads their rows as they lie, in
        # bf16 too, and adds the bias (csrc/cpu/mask_logits_kernel.cpp).
        logits = torch.ops.solo_fast.mask_logits(rows, kernels, bias)
        soft = logits.view(k, h, w) if out_dtype == torch.float32 else torch.empty(k, h, w, dtype=out_dtype, device=dev)
    else:
        feats = features.reshape(e, n).float()
        kern = kernels.float()
        b = None if bias is None else bias.float()
        soft = torch.empty(k, h, w, dtype=out_dtype, device=dev)
        # One GEMM call with the reference's exact operands and shapes: the BLAS may block
        # a row differently when it is given fewer rows (MKL does for some small shapes),
        # so only this guarantees the reference's logits bit for bit. With fp32 output it
        # writes straight into the returned tensor, which costs no memory beyond the output.
        logits = soft.view(k, n) if out_dtype == torch.float32 else torch.empty(k, n, dtype=torch.float32, device=dev)
        torch.matmul(kern, feats, out=logits)
        if b is not None:
            logits.add_(b[:, None])
    # Whole-tensor in-place passes: no fresh [K, H*W] allocations (their page faults cost
    # as much as the arithmetic), and each pass is one parallel region -- many small
    # regions stall whenever the 2 OpenMP threads share their cores with anything else.
    # add_, sigmoid_ and gt are the reference's own kernels on the same shapes, so they
    # give its values bit for bit (sigmoid's vectorised loop even splits the same way).
    logits.sigmoid_()
    s = logits.view(k, h, w)
    torch.gt(s, mask_thr, out=binary)
    # Integer counts are exact in any order; an int32 count of bytes is ~2x faster than
    # bool.sum()'s int64 path (H*W < 2**31).
    area.copy_(binary.view(k, n).view(torch.uint8).sum(1, dtype=torch.int32))
    # maskness needs soft over binary summed exactly as the reference sums it (per mask, the
    # same reduction over H*W); only this product is chunked, into a reused buffer.
    if chunk is None:
        chunk = max(1, CHUNK_ELEMS // max(n, 1))
    tmp = torch.empty(min(chunk, k), h, w, dtype=torch.float32, device=dev)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    for k0 in range(0, k, chunk):
        k1 = min(k, k0 + chunk)
        # A select, as the reference: NaN logits (non-finite inputs) are outside the
        # binary mask and must not turn the sum into NaN (NaN * 0 is NaN).
        prod = torch.where(binary[k0:k1], s[k0:k1], zero, out=tmp[: k1 - k0])
        maskness[k0:k1] = prod.sum((1, 2))
    maskness.div_(area.clamp(min=1))
    if out_dtype != torch.float32:
        soft.copy_(s)
    return soft, binary, area, maskness


def _channels_last_rows(features: torch.Tensor, kernels: torch.Tensor) -> Optional[torch.Tensor]:
    """``features`` [E, H, W] as the [H*W, E] rows that ``mask_logits`` takes, where that
    is a view (channels-last), its dtype has a GEMM micro-kernel here, and the kernels are
    exactly representable in it (bf16 features with bf16-valued kernels, as the bf16
    network gives them). Otherwise None, and under torch.compile, which traces the plain
    formulation (these checks read data pointers and values)."""
    if torch.compiler.is_compiling():
        return None
    e, h, w = features.shape
    if features.dtype not in (torch.float32, torch.bfloat16) or not _brgemm.usable(features.dtype):
        return None
    # Contiguous features (also those whose H*W or E is 1: both layouts at once) take the
    # reference's GEMM, bit for bit.
    if features.numel() == 0 or kernels.shape[0] == 0 or features.is_contiguous():
        return None
    rows = features.permute(1, 2, 0).reshape(h * w, e)
    if not rows.is_contiguous() or rows.data_ptr() != features.data_ptr():
        return None
    if kernels.dtype != features.dtype and not torch.equal(kernels.to(features.dtype).to(kernels.dtype), kernels):
        return None
    return rows


_backend.register("mask_predict", "cpu", lambda device_type: device_type == "cpu")(mask_predict_cpu)

if _ext.available() and hasattr(torch.ops.solo_fast, "mask_logits"):
    @torch.library.register_fake("solo_fast::mask_logits")
    def _mask_logits_fake(features, kernels, bias):
        return features.new_empty((kernels.shape[0], features.shape[0]), dtype=torch.float32)


# --------------------------------------------------------------------------------------
# "triton": the fused kernel
# --------------------------------------------------------------------------------------
# GEMM operand modes of the kernel: "ieee", "fp16", "bf16" -> its OPERAND constant
# (kernels/mask_predict.py OPERANDS, which _triton_op checks against this table). Spelled
# out here because importing solo_fast must not import triton.
_OPERANDS = {"ieee": 0, "fp16": 1, "bf16": 2}


@functools.lru_cache(maxsize=None)
def _triton_op():
    """Defines ``solo_fast::mask_predict`` on first use, so importing solo_fast never imports triton."""
    from torch.library import triton_op

    from solo_fast.kernels import mask_predict as kern

    if kern.OPERANDS != _OPERANDS:
        raise RuntimeError(f"solo_fast.kernels.mask_predict.OPERANDS is {kern.OPERANDS}, "
                           f"solo_fast.ops._mask_predict._OPERANDS {_OPERANDS}: they must agree")

    @triton_op("solo_fast::mask_predict", mutates_args=())
    def mask_predict_fused(
        features: torch.Tensor,
        kernels: torch.Tensor,
        bias: Optional[torch.Tensor],
        mask_thr: float,
        out_dtype: torch.dtype,
        operand: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """features [E, N], kernels [K, E] -> soft [K, N] out_dtype, binary [K, N] uint8, area [K] int32, msum [K] fp32."""
        return kern.launch_mask_predict(features, kernels, bias, mask_thr, out_dtype, operand)

    def fake(features, kernels, bias, mask_thr, out_dtype, operand):
        k, n = kernels.shape[0], features.shape[1]
        return (features.new_empty((k, n), dtype=out_dtype), features.new_empty((k, n), dtype=torch.uint8),
                features.new_empty((k,), dtype=torch.int32), features.new_empty((k,), dtype=torch.float32))

    return opaque_under_interpreter(mask_predict_fused, fake)


def _pick_operand(features: torch.Tensor, kernels: torch.Tensor) -> str:
    dts = {features.dtype, kernels.dtype}
    if torch.bfloat16 in dts:
        return "bf16"
    if torch.float16 in dts:
        return "fp16"
    # fp32/fp64 inputs: the interpreter has no tensor cores to gain and gives the
    # reference's fp32 logits; a GPU rounds the operands to fp16 for the tensor cores.
    return "ieee" if interpreting() else "fp16"


def mask_predict_triton(
    features: torch.Tensor,
    kernels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    mask_thr: float = 0.5,
    out_dtype: Optional[torch.dtype] = None,
    precision: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``precision``: GEMM operand mode "ieee" (fp32), "fp16" or "bf16"; None picks from the input dtypes."""
    if _wants_grad(features, kernels, bias):
        return reference.mask_predict(features, kernels, bias, mask_thr=mask_thr, out_dtype=out_dtype)
    op, operands = _get_op(), _OPERANDS
    if precision is None:
        precision = _pick_operand(features, kernels)
    if precision not in operands:
        raise ValueError(f"precision: expected one of {tuple(operands)}, got {precision!r}")
    out_dtype = _default_out_dtype(features, out_dtype)
    e, h, w = features.shape
    # fp64 has no tensor-core or tl.dot path; the reference computes in fp32 anyway.
    feats = features.reshape(e, h * w)
    feats = (feats.float() if feats.dtype == torch.float64 else feats).contiguous()
    kern = (kernels.float() if kernels.dtype == torch.float64 else kernels).contiguous()
    soft, binary, area, msum = op(feats, kern, bias, float(mask_thr), out_dtype, operands[precision])
    area = area.to(torch.int64)
    maskness = msum / area.clamp(min=1)
    return soft.view(-1, h, w), binary.view(torch.bool).view(-1, h, w), area, maskness


_triton_ready, _get_op = lazy_triton_op(_triton_op, "mask_predict")
_backend.register("mask_predict", "triton", _triton_ready)(mask_predict_triton)
