"""Export of inference at a fixed input size: a ``torch.export`` program and an ONNX file.

:class:`ExportableSOLO` wraps a :class:`solo_fast.SOLO` into a module whose every shape is
fixed by the input size, so ``torch.export`` and torch's dynamo ONNX exporter can trace it:

- input: ``image`` float32 ``[1, 3, H0, W0]``, RGB in [0, 1] at the export size (what
  :meth:`SOLO.predict` takes as a CHW tensor, with a batch axis). The model's own transform
  (resize keeping the ratio, ImageNet normalisation, pad to a multiple of 32) runs inside,
  with sizes fixed at export time;
- outputs: ``masks`` bool ``[max_per_img, H0, W0]``, ``scores`` float32 ``[max_per_img]``
  (descending), ``labels`` int64 ``[max_per_img]`` and ``num_valid`` int64 (a scalar): the
  first ``num_valid`` entries are the detections; the rest have score 0, label -1 and an
  empty mask.

Post-processing (DESIGN.md §1) in static shapes, pure PyTorch (the reference path: the
custom C++/Triton ops are invisible to the exporters): point NMS; the ``topk`` best
(cell, class) pairs by class score; ``score_thr`` and the "area > stride" rule become a
validity mask instead of dropping entries; score × maskness; the best ``nms_pre`` valid
ones go to Matrix NMS (invalid ones are sorted last, where they cannot decay a valid one);
``filter_thr`` masks again; the best ``max_per_img`` are kept. For valid entries this is
the function :meth:`SOLO.predict` computes whenever at most ``topk`` pairs score over
``score_thr`` (``topk`` defaults to ``nms_pre``, 500); past that, the lowest-scored
surplus pairs are dropped before the maskness re-weighting, where ``predict`` keeps them.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import nn

from ._backend import use_backend
from ._outputs import output_file
from ._checks import size_hw
from .modeling.heads import DecoupledSOLOHead, SOLOHead, SOLOV2Head, level_of_cells
from .modeling.postprocess import final_masks, flat_scores
from .ops.reference import matrix_decay

OUTPUT_NAMES = ("masks", "scores", "labels", "num_valid")


def stable_argsort_desc(key: torch.Tensor, k: int) -> torch.Tensor:
    """First ``k`` indices of a stable descending sort of the 1-D ``key`` (ties: lower index
    first), as ``torch.sort(stable=True)``, which the ONNX exporter cannot translate.

    Each entry's rank in that order is counted from an N×N comparison (N ≤ nms_pre-sized
    here, the size of Matrix NMS's own matrices); the ranks are distinct, so ``topk`` over
    them is exact whatever its own tie order.
    """
    n = key.shape[0]
    idx = torch.arange(n, device=key.device)
    before = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (idx[None, :] < idx[:, None]))
    rank = before.sum(1)
    return torch.topk(rank, k, largest=False).indices


def _check_model(model):
    from .modeling.solo import SOLO

    if not isinstance(model, SOLO):
        raise ValueError(f"model: expected a solo_fast.SOLO, got {type(model).__name__}")
    return model


class ExportableSOLO(nn.Module):
    """Inference of ``model`` on one image of size ``input_size`` = (H0, W0), in static shapes.

    ``forward(image)``: float ``[1, 3, H0, W0]`` in [0, 1] -> ``(masks, scores, labels,
    num_valid)`` (see the module docstring). ``topk``: (cell, class) pairs whose masks are
    computed (default ``nms_pre``, capped at the number of pairs); ``score_thr``,
    ``mask_thr``, ``nms_pre``, ``filter_thr``, ``max_per_img`` override the model's
    inference settings, as in :meth:`SOLO.predict`.
    """

    def __init__(self, model, input_size: Sequence[int], *, topk: Optional[int] = None, **overrides):
        super().__init__()
        model = _check_model(model)
        self.input_size = size_hw("input_size", input_size)
        cfg = model.inference_settings(**overrides)  # validates the overrides (ValueError naming the key)
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0):
            raise ValueError(f"topk: expected a positive int, got {topk!r}")
        head = model.mask_head
        if not isinstance(head, (SOLOHead, DecoupledSOLOHead, SOLOV2Head)):
            raise ValueError(f"model: no static export for head {type(head).__name__}")
        self.model = model
        self.score_thr = float(cfg.score_thr)
        self.mask_thr = float(cfg.mask_thr)
        self.filter_thr = float(cfg.filter_thr)
        self.kernel = cfg.nms_kernel
        self.sigma = float(cfg.nms_sigma)
        self.max_per_img = int(cfg.max_per_img)

        # Sizes of the model's input transform for this input size, fixed now.
        tf = model.transform
        h0, w0 = self.input_size
        self.img_shape = tf.test_size(h0, w0)
        self.pad_shape = tf.pad_size(*self.img_shape)
        H, W = self.pad_shape
        if H < 32 or W < 32:
            raise ValueError(f"input_size: {tuple(input_size)} gives a padded input of {self.pad_shape}; "
                             "expected at least 32x32")
        self.mask_size = (H // 4, W // 4)

        grids = list(head.num_grids)
        C = head.num_classes
        num_pairs = sum(S * S for S in grids) * C
        self.topk = min(int(topk if topk is not None else cfg.nms_pre), num_pairs)
        self.nms_pre = min(int(cfg.nms_pre), self.topk)
        self.num_out = min(self.max_per_img, self.nms_pre)

        strides = torch.tensor([float(s) for s in model.cfg["strides"]])
        self.register_buffer("cell_stride", strides[level_of_cells(grids, "cpu")].to(model.device), persistent=False)

    @property
    def head(self):
        return self.model.mask_head

    # ------------------------------------------------------------------ forward
    def forward(self, image: torch.Tensor):
        h0, w0 = self.input_size
        if not isinstance(image, torch.Tensor) or tuple(image.shape) != (1, 3, h0, w0):
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image: expected a float tensor of shape (1, 3, {h0}, {w0}) (the export size), got {got}")
        if not image.is_floating_point():
            raise ValueError(f"image: expected a floating-point tensor in [0, 1], got dtype {image.dtype}")
        with use_backend("reference"):
            return self._infer(image)

    def _infer(self, image: torch.Tensor):
        h0, w0 = self.input_size
        batch, metas = self.model.transform([image[0]])  # the model's own float path, sizes fixed by the input's
        out = self.model.extract(batch)
        probs = flat_scores(out["cls"])[0]  # [ΣS², C], point-NMS'd
        C = probs.shape[1]
        flat = probs.reshape(-1)  # pair p = cell * C + class: the candidate order of predict
        pairs = torch.topk(flat, self.topk).indices
        # Back to candidate order (pairs are distinct: no ties), so ties break as in predict.
        pairs = torch.topk(pairs, self.topk, largest=False).values
        cand = flat[pairs]
        cells, labels = pairs // C, pairs % C
        soft, binary, area, maskness = self.head.candidate_masks(out, 0, cells, self.mask_size, self.mask_thr,
                                                                 static=True)
        valid = (cand > self.score_thr) & (area.float() > self.cell_stride[cells])
        cand = cand * maskness.to(cand.dtype)
        # Valid scores are > 0, so invalid entries (-1) sort last: in Matrix NMS a mask is
        # decayed only by higher-scored ones, so they leave every valid entry unchanged.
        order = stable_argsort_desc(torch.where(valid, cand, -1.0), self.nms_pre)
        s, lab, valid = cand[order], labels[order], valid[order]
        decay = matrix_decay(binary[order], lab, area[order], self.kernel, self.sigma)
        s = s * decay
        if self.filter_thr > 0:
            valid = valid & (s >= self.filter_thr)
        keep = stable_argsort_desc(torch.where(valid, s, -1.0), self.num_out)
        valid = valid[keep]
        scores = torch.where(valid, s[keep], 0.0)
        labels = torch.where(valid, lab[keep], -1)
        masks = final_masks(soft[order[keep]], self.pad_shape, self.img_shape, self.input_size, self.mask_thr)
        masks = masks & valid[:, None, None]
        num_valid = valid.sum()
        pad = self.max_per_img - self.num_out
        if pad > 0:  # fewer entries than max_per_img can ever be valid: fixed-size output anyway
            masks = torch.cat([masks, masks.new_zeros((pad, h0, w0))])
            scores = torch.cat([scores, scores.new_zeros(pad)])
            labels = torch.cat([labels, labels.new_full((pad,), -1)])
        return masks, scores, labels, num_valid

    def example_input(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.rand((1, 3, *self.input_size), generator=g).to(self.cell_stride.device)


# ---------------------------------------------------------------------- entry points
def _wrap(model, input_size, topk, overrides) -> ExportableSOLO:
    return ExportableSOLO(model, input_size, topk=topk, **overrides)


def export_program(model, input_size: Sequence[int], *, topk: Optional[int] = None,
                   **overrides) -> torch.export.ExportedProgram:
    """``torch.export`` program of :class:`ExportableSOLO` (one image ``[1, 3, H0, W0]``)."""
    wrapper = _wrap(model, input_size, topk, overrides)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(wrapper, (wrapper.example_input(),), strict=False)
    finally:
        model.train(was_training)


def export_onnx(model, path: str, input_size: Optional[Sequence[int]] = None, *, topk: Optional[int] = None,
                opset_version: Optional[int] = None, **overrides) -> str:
    """Writes an ONNX file of :class:`ExportableSOLO` (torch's dynamo exporter) to ``path``.

    ``model``: a :class:`SOLO` (then ``input_size`` is required) or a program returned by
    :func:`export_program` (converted as it is; give no ``input_size`` or settings then).
    Input ``image`` and outputs ``masks, scores, labels, num_valid`` as described in the
    module docstring; the weights are stored inside the file. Needs ``onnx`` and
    ``onnxscript`` (``pip install 'solo_fast[export]'``).
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"path: expected a file path, got {path!r}")
    if isinstance(model, torch.export.ExportedProgram):
        if input_size is not None or topk is not None or overrides:
            raise ValueError("input_size: an ExportedProgram has its size and settings already; give none")
        program = model
    else:
        if input_size is None:
            raise ValueError("input_size: expected (height, width) of positive ints, got None")
        program = None
        _check_model(model)
        size_hw("input_size", input_size)
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ImportError("export_onnx needs onnx and onnxscript: pip install 'solo_fast[export]'") from None
    output_file(path, "path")  # before the export, which takes a while
    if program is None:
        program = export_program(model, input_size, topk=topk, **overrides)
    onnx_program = torch.onnx.export(program, input_names=["image"], output_names=list(OUTPUT_NAMES),
                                     opset_version=opset_version, dynamo=True, verbose=False)
    onnx_program.save(str(path), external_data=False)
    return str(path)
