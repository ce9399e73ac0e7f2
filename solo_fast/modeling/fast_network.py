"""The network in its fast CPU form: a channels-last copy with BatchNorm folded into the convs.

On the CPU, oneDNN's convolutions run in a blocked channels-last layout: an NCHW input is
reordered into it and the output back out at every layer, and each BatchNorm is one more
pass over the activations. The fast form does the layer arithmetic once per model, not
per call:

- every BatchNorm that follows a conv (the backbone's, with frozen statistics at
  inference) is folded into that conv: ``w' = w * g / sqrt(v + eps)``,
  ``b' = beta + (b - mean) * g / sqrt(v + eps)``;
- every 4-D weight and the input are channels-last, so activations stay in it from the
  stem to the heads (GroupNorm, ReLU, upsampling and ``ops.coord_conv2d`` keep it);
- every 3x3 / stride 1 conv that ``ops.winograd_profitable`` picks runs Winograd's
  F(2x2, 3x3) (``ops.WinogradConv2d``), where ``ops.winograd_usable`` says this CPU can;
- the head's outputs are handed to post-processing contiguous (NCHW) and in fp32, as the
  reference gives them, except those the head lists in ``any_layout_outputs`` (SOLOv2's
  mask features, which ``mask_predict`` reads as they are: channels-last, bf16 in bf16).

A network with forward hooks (feature extraction, the tests' input probes) runs as it is:
the hooks see the model's own modules.

``dtype=torch.bfloat16`` (``precision="bf16"``) is the same copy with bf16 weights, run on
a bf16 input without autocast: autocast would cast every weight at every call and run
GroupNorm and ReLU on mixed dtypes, which measured slower than fp32 on a Zen 4 CPU.

It is a separate copy of the backbone, neck and head that the model keeps outside its
module tree: ``state_dict``, ``save_pretrained``, training and the reference path never
see a folded weight. The copy is rebuilt when any parameter or buffer of the model is
replaced or modified in place (an optimizer step, ``load_state_dict``, ``.to()``): each
call compares the tensors' identities and version counters (well under a millisecond).

The arithmetic is the same function up to fp32 rounding (folding rounds ``w * scale``;
oneDNN sums in another order per layout; Winograd sums transformed products): the contract is that of
``benchmarks/latency.py``'s agreement columns, held by ``tests/test_fast_network.py``.
"""
from __future__ import annotations

import copy
import threading
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from .. import ops


def _fold(conv: nn.Module, bn: nn.BatchNorm2d) -> None:
    """Folds ``bn`` (running statistics) into ``conv``'s weight and bias, in place."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight = nn.Parameter(w * scale.reshape(-1, *([1] * (w.dim() - 1))), requires_grad=False)
    conv.bias = nn.Parameter(bn.bias.detach() + (bias - bn.running_mean) * scale, requires_grad=False)


def _conv_bn_pairs(module: nn.Module) -> Iterable[Tuple[nn.Module, str, str]]:
    """(parent, conv name, bn name) of every conv whose output goes straight into a
    BatchNorm: ``convN`` → ``bnN`` siblings (ResNet blocks and stem, torchvision's
    names) and consecutive entries of a Sequential (the downsample branch)."""
    for parent in module.modules():
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            names = list(children)
            for a, b in zip(names, names[1:]):
                if isinstance(children[b], nn.BatchNorm2d) and hasattr(children[a], "weight"):
                    yield parent, a, b
            continue
        for name, child in children.items():
            if isinstance(child, nn.BatchNorm2d) and name.startswith("bn"):
                conv = children.get("conv" + name[2:])
                if conv is not None and getattr(conv, "weight", None) is not None and conv.weight.dim() == 4:
                    yield parent, "conv" + name[2:], name


def fold_batchnorm(module: nn.Module) -> int:
    """Folds every conv → BatchNorm pair of ``module`` (in place; BatchNorms become
    Identity). Returns how many were folded."""
    pairs = list(_conv_bn_pairs(module))
    for parent, conv_name, bn_name in pairs:
        _fold(getattr(parent, conv_name), getattr(parent, bn_name))
        setattr(parent, bn_name, nn.Identity())
    return len(pairs)


def has_hooks(parts: List[nn.Module]) -> bool:
    """Whether a forward hook (on any module of ``parts``, or a global one) would observe
    the network: the copy would not call it, so such a network runs as it is."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for p in parts for m in p.modules())


def _state_key(model: nn.Module) -> Tuple:
    # ``.to()``/``.double()`` swap a parameter's data in place (``param.data = ...``): the same
    # object and version counter, new storage and dtype.
    return tuple((id(t), t._version, t.data_ptr(), t.dtype)
                 for t in list(model.parameters()) + list(model.buffers()))


def _contiguous(out, dtype: torch.dtype, any_layout: Tuple[str, ...] = ()):
    """``out`` in ``dtype`` and contiguous, except the dict entries named in ``any_layout``
    (the head's ``any_layout_outputs``), which are handed on in their layout and, where
    ``mask_predict``'s brgemm GEMM reads it, the network's dtype (bf16 mask features hold
    exactly the values an fp32 copy would)."""
    if isinstance(out, torch.Tensor):
        return out.to(dtype=dtype, memory_format=torch.contiguous_format)
    if isinstance(out, dict):
        return {k: _as_it_is(v, dtype) if k in any_layout else _contiguous(v, dtype) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_contiguous(v, dtype) for v in out)
    return out


def _as_it_is(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An ``any_layout`` output in its layout; in the network's dtype only where the CPU's
    mask_logits GEMM reads that dtype (bf16: AVX512-BF16 without AMX), else in ``dtype``."""
    return v if v.dtype == dtype or ops.brgemm_reads(v.dtype) else v.to(dtype)


def _nchw_output(module, args, out):
    return out.contiguous()


def _leave_channels_last_early(part: nn.Module) -> None:
    """The towers a head lists in ``nchw_towers`` (SOLO's and Decoupled SOLO's mask towers)
    end in a x2 upsample whose output, 4x the tower's, goes to post-processing in NCHW:
    their last layer hands on NCHW, so the layout is converted before the upsample, not
    after (a quarter of the bytes)."""
    for name in getattr(part, "nchw_towers", ()):
        tower = getattr(part, name, None)
        if isinstance(tower, nn.ModuleList) and len(tower):
            tower[-1].register_forward_hook(_nchw_output)


def _param_dtype(part: nn.Module) -> torch.dtype:
    return next(part.parameters(), torch.zeros(())).dtype


def _use_winograd(part: nn.Module, dtype: torch.dtype) -> int:
    """Swaps the 3x3 / stride 1 convs of ``part`` for :class:`ops.WinogradConv2d` where this
    CPU runs Winograd in ``dtype`` and it beats oneDNN (``ops.winograd_profitable``), before
    the casts: the weights are packed from their fp32 values. Returns how many."""
    if not ops.winograd_usable(dtype):
        return 0
    # A CoordConv layer's conv (a ConvModule with coords) is never called as a module:
    # ops.coord_conv2d reads its weight.
    swaps = [(parent, name, child) for parent in part.modules() for name, child in parent.named_children()
             if ops.WinogradConv2d.eligible(child) and child.weight.device.type == "cpu"
             and not getattr(parent, "coords", None)
             and ops.winograd_profitable(child.in_channels, child.out_channels, dtype)]
    for parent, name, child in swaps:
        setattr(parent, name, ops.WinogradConv2d(child, dtype))
    return len(swaps)


class FastNetwork:
    """The copy of ``parts`` (backbone, neck, head) in the fast form, its weights in
    ``dtype`` (None: as they are); ``__call__(batch)`` gives what
    ``head(neck(backbone(batch)))`` gives, contiguous, in the batch's dtype (the head's
    ``any_layout_outputs`` excepted, see :func:`_contiguous`)."""

    def __init__(self, parts: List[nn.Module], dtype: Optional[torch.dtype] = None):
        self.dtype = dtype
        with torch.no_grad():
            self.parts = [copy.deepcopy(p).eval() for p in parts]
            self.folded = sum(fold_batchnorm(p) for p in self.parts)  # folded in the weights' dtype
            self.winograd = 0
            for p in self.parts:
                for param in p.parameters():
                    param.requires_grad_(False)
                self.winograd += _use_winograd(p, dtype or _param_dtype(p))
                p.to(dtype=dtype, memory_format=torch.channels_last)
                _leave_channels_last_early(p)

    def __call__(self, batch: torch.Tensor):
        x = batch.to(dtype=self.dtype or batch.dtype, memory_format=torch.channels_last)
        with torch.autocast(batch.device.type, enabled=False):
            for part in self.parts:
                x = part(x)
        return _contiguous(x, batch.dtype, getattr(self.parts[-1], "any_layout_outputs", ()))


class FastNetworkCache:
    """One :class:`FastNetwork` per model (the last dtype asked for), rebuilt when the
    model's tensors change."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key = None
        self._net = None

    def get(self, model: nn.Module, parts: List[nn.Module], dtype: Optional[torch.dtype] = None) -> FastNetwork:
        key = (_state_key(model), dtype)
        with self._lock:
            if self._net is None or key != self._key:
                self._net = None  # free the stale copy before building the new one
                self._net = FastNetwork(parts, dtype)
                self._key = key
            return self._net

    def clear(self) -> None:
        with self._lock:
            self._net, self._key = None, None

    # A copied or pickled model starts with an empty cache (a lock can be neither).
    def __deepcopy__(self, memo):
        return FastNetworkCache()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()
