"""``solo_fast.SOLO``: backbone + FPN + a SOLO-family head, with its own input transform."""
from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .. import _cpu, ops
from .._checks import python_scalar
from .._outputs import atomic_write, output_dir
from ..results import SOLOResult, masks_to_boxes
from . import configs
from .backbone import build_backbone
from .fast_network import FastNetworkCache, has_hooks
from .fpn import FPN
from .heads import build_head
from .images import load_images
from .losses import dice_loss, sigmoid_focal_loss
from .postprocess import postprocess
from .transform import InputTransform, check_image


def _check_finite(out: Dict[str, Any]) -> None:
    """Inference refuses NaN/Inf in the network's outputs (from non-finite weights, or an
    fp16 overflow) rather than returning silently wrong detections. One device-to-host
    read; the images are already known to be finite.

    A NaN or Inf anywhere makes a tensor's sum non-finite, so one fp32 sum per tensor
    (a single read of SOLO's ~41M output values at 800x1344: ~5 ms) stands in for
    ``isfinite(t).all()`` (a bool tensor and a second pass: 70-115 ms on the reference CPU); a sum
    of finite values overflows only past 3e38, far beyond any feature map."""
    tensors = [t for v in out.values() for t in (v if isinstance(v, (list, tuple)) else [v])]
    if tensors and not bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in tensors])).all()):
        raise ValueError("model: the network's outputs contain NaN or Inf for finite images; check the weights "
                         "for non-finite values (under fp16 autocast: an overflow, use bf16 or fp32)")


# predict() runs in eval mode and puts the model back as it was. Calls from several threads
# overlap: the first one in switches to eval mode and remembers every module's mode, the
# last one out restores them, so no call sees train mode and the mode is not lost.
_EVAL_LOCK = threading.Lock()
_EVAL_CALLS: Dict[int, list] = {}  # id(model) -> [active calls, [(module, its training flag)]]


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    with _EVAL_LOCK:
        entry = _EVAL_CALLS.get(id(model))
        if entry is None:
            entry = _EVAL_CALLS[id(model)] = [0, [(m, m.training) for m in model.modules()]]
            model.eval()
        entry[0] += 1
    try:
        yield
    finally:
        with _EVAL_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _EVAL_CALLS[id(model)]
                for m, mode in entry[1]:  # the flags as they were (not train(), which re-derives them)
                    m.training = mode


def _bf16_here(precision: str, device: torch.device) -> bool:
    """Whether ``precision="bf16"`` runs in bf16 on ``device``. On a CPU without native
    bf16 (AMX or AVX512-BF16) oneDNN emulates it, slower than fp32: a warning, and fp32."""
    if precision != "bf16":
        return False
    if device.type == "cpu" and not _cpu.native_bf16():
        warnings.warn("precision='bf16': this CPU has no native bf16 (AMX or AVX512-BF16), where bf16 "
                      "convolutions are emulated and slower than fp32; running in fp32", stacklevel=4)
        return False
    return True


def _precision(settings: configs.InferenceSettings, device: torch.device, fast_form: bool):
    """The context inference runs in: bf16 autocast for ``precision="bf16"`` where the
    network runs as published (post-processing's ops keep their fp32 arithmetic, as under
    a user's autocast); nothing for fp32, under the caller's own autocast, or where the
    network's fast CPU form runs, which makes its own bf16 copy (``extract``)."""
    if torch.is_autocast_enabled(device.type) or fast_form:
        return contextlib.nullcontext()
    if not _bf16_here(settings.precision, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _memory(fast_form: bool):
    """Where the network's fast CPU form runs, its tensors (and post-processing's) reuse
    freed large blocks instead of faulting in fresh pages per tensor and per image
    (``_cpu.block_cache``); the published path allocates as PyTorch does."""
    return _cpu.block_cache() if fast_form else contextlib.nullcontext()


def _check_per_class(values, num_classes: int, arg: str, kind: type) -> Optional[List]:
    """None, or a list of ``num_classes`` values of ``kind`` (class names, category ids)."""
    if values is None:
        return None
    ok = (not isinstance(values, (str, bytes)) and hasattr(values, "__len__")
          and all(isinstance(v, kind) and not isinstance(v, bool) for v in values))
    if not ok or len(values) != num_classes:
        what = "str" if kind is str else "int"
        raise ValueError(f"{arg}: expected a sequence of {num_classes} {what}s (one per class), got {values!r:.200}")
    return list(values)


def _saved_settings(saved: Dict[str, Any]):
    """(name, num_classes, overrides) of a config saved by ``save_pretrained`` (JSON: tuples are lists)."""
    cfg = dict(saved)
    name, num_classes = cfg.pop("name"), cfg.pop("num_classes")
    if isinstance(cfg.get("min_size"), list):  # before train_min_size: training drew from min_size
        cfg["train_min_size"], cfg["min_size"] = cfg["min_size"], cfg["min_size"][-1]
    known = configs.get_config(name)
    overrides = {k: (tuple(map(tuple, v)) if k == "scale_ranges" else tuple(v) if isinstance(v, list) else v)
                 for k, v in cfg.items() if k in known}
    return name, num_classes, overrides


class SOLO(nn.Module):
    """A model of the SOLO family by config name, e.g. ``SOLO("solov2_r50_fpn", num_classes=80)``.

    Keyword ``overrides`` replace settings of the named config (see
    :data:`solo_fast.modeling.configs.BASE`), e.g. ``min_size=512, max_size=852``.

    ``backbone_weights``: an ImageNet ResNet for the backbone (torchvision's published
    ``resnet*.pth``, an mmpretrain/mmdetection checkpoint with ``backbone.*`` keys, or
    ``.safetensors``); ``model.load_report`` says what was loaded and what was unused (the
    classifier ``fc.*``). A missing or mis-shaped backbone tensor raises ValueError naming it.

    ``model.pretrained`` says where the weights started: None (random initialisation),
    ``"backbone"`` or ``"checkpoint"`` (``from_pretrained``, ``from_mmdet``, ``finetune_from``);
    training picks its recipe from it (``solo_fast.engine.train``). ``explicit_settings`` are
    the settings passed as overrides (the recipe never changes those).
    """

    def __init__(self, config: str = "solov2_r50_fpn", num_classes: int = 80, backbone_weights=None,
                 **overrides: Any):
        super().__init__()
        num_classes = python_scalar(num_classes)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        cfg = configs.get_config(config, **overrides)
        cfg["num_classes"] = num_classes
        self.config = configs.SOLOConfig.from_dict(cfg)
        self.class_names: Optional[List[str]] = None
        self.category_ids: Optional[List[int]] = None  # the dataset's id of each label (COCO results)
        self.explicit_settings = frozenset(overrides)
        self.pretrained: Optional[str] = None
        self.weights_path: Optional[str] = None
        self.load_report = None
        self.backbone = build_backbone(cfg)
        self.neck = FPN(self.backbone.out_channels, cfg["fpn_channels"], num_outs=len(cfg["strides"]))
        self.mask_head = build_head(cfg)
        self.transform = InputTransform(cfg["min_size"], cfg["max_size"], cfg["size_divisor"],
                                        train_min_size=cfg["train_min_size"], flip_prob=cfg["flip_prob"])
        # The network's fast CPU form, built on first use (fast_network.py): a plain
        # attribute, not a submodule, so that no folded weight reaches state_dict.
        self._fast_network = FastNetworkCache()
        if backbone_weights is not None:
            from ..checkpoint.backbone import load_backbone

            self.load_report = load_backbone(self.backbone, backbone_weights)
            self.pretrained, self.weights_path = "backbone", self.load_report.path

    def set_backbone_training(self, frozen_stages: int, norm_eval: bool) -> None:
        """Changes ``frozen_stages`` (stages whose parameters get no gradient; -1: none) and
        ``norm_eval`` (BatchNorm keeps its running statistics in training) after construction,
        as the training recipe does for settings the caller left open."""
        config = self.config.replace(frozen_stages=frozen_stages, norm_eval=norm_eval)  # checked
        bb = self.backbone
        for m in bb._frozen_modules():  # what the old setting froze learns again, unless frozen anew below
            for p in m.parameters():
                p.requires_grad_(True)
        bb.frozen_stages, bb.norm_eval = frozen_stages, norm_eval
        bb._freeze()
        bb.train(bb.training)
        self.config = config

    # ------------------------------------------------------------------ properties
    @property
    def cfg(self) -> Mapping[str, Any]:
        """The config as the flat, read-only mapping of :func:`configs.get_config`
        (``self.config`` is the typed form; change settings with ``config.replace``)."""
        return MappingProxyType(self.config.to_dict())

    @property
    def config_name(self) -> str:
        return self.config.name

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def mask_strides(self):
        """Stride of each level's mask targets: SOLO's masks are at half the level stride, SOLOv2's at 4."""
        if self.config.arch.head == "solov2":
            return 4
        return [s // 2 for s in self.config.arch.strides]

    # ------------------------------------------------------------------ forward
    def _fast_form(self, device: torch.device) -> bool:
        """Whether inference on ``device`` runs the network's fast form (the backend's
        choice, ``ops.network_form``; a hooked network runs as it is)."""
        return ops.network_form(device) == "cpu" and not has_hooks([self.backbone, self.neck, self.mask_head])

    def extract(self, batch: torch.Tensor, precision: str = "fp32"):
        """The head's raw outputs for a padded, normalised batch. At inference (eval mode, no
        autograd) on the CPU with the "auto"/"cpu" backend it runs the network's fast form
        (channels-last, BatchNorm folded: ``fast_network.py``; with ``precision="bf16"`` its
        bf16 copy unless the caller's autocast decides), else the modules as they are."""
        # The transform's output is fp32; a model cast with .half(), .bfloat16() or .double()
        # gets its own dtype (a no-op for fp32 weights, autocast included). Post-processing
        # takes the head's outputs in any float dtype and returns fp32 scores.
        batch = batch.to(next(self.parameters()).dtype)
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            self._fast_network.clear()  # training changes the weights: no stale copy kept meanwhile
        elif self._fast_form(batch.device):
            bf16 = not torch.is_autocast_enabled(batch.device.type) and _bf16_here(precision, batch.device)
            return self._fast_network.get(self, [self.backbone, self.neck, self.mask_head],
                                          torch.bfloat16 if bf16 else None)(batch)
        return self.mask_head(self.neck(self.backbone(batch)))

    def forward(self, images, targets: Optional[Sequence[Dict[str, torch.Tensor]]] = None):
        """Train mode: ``{"loss_mask", "loss_cls"}``; eval mode: one dict per image with
        ``masks`` (bool, original size), ``labels``, ``scores``, ``boxes``. ``images``: CHW
        uint8 tensors (mmdetection's pipelines, resized with OpenCV on the host) or CHW float
        tensors in [0, 1] (resized in float on their device)."""
        images = self._check_images(images)
        if self.training:
            if targets is None:
                raise ValueError("targets: required in training mode (a list of {'masks', 'labels'} dicts)")
            return self._losses(images, self._check_targets(targets, images))
        # Post-processing thresholds and sorts: nothing in it is differentiable, and without
        # autograd recording the ops can take their fast paths.
        settings = self.inference_settings()
        fast_form = self._fast_form(self.device)
        with torch.no_grad(), _precision(settings, self.device, fast_form), _memory(fast_form):
            batch, metas = self.transform(images, device=self.device)
            out = self.extract(batch, settings.precision)
            _check_finite(out)
            results = postprocess(self.mask_head, out, metas, settings, self.config.arch.strides)
        for r in results:
            r["boxes"] = masks_to_boxes(r["masks"])
        return results

    # ------------------------------------------------------------------ training
    def _losses(self, images, targets) -> Dict[str, torch.Tensor]:
        cfg = self.cfg
        dev = self.device
        batch, metas, masks = self.transform(images, [t["masks"] for t in targets], training=True, device=dev)
        assigned = ops.center_region_assign_batch(
            masks, [t["labels"].to(dev) for t in targets],
            pad_shape=metas[0].pad_shape, num_grids=list(cfg["num_grids"]),
            scale_ranges=[tuple(r) for r in cfg["scale_ranges"]], pos_scale=cfg["pos_scale"],
            num_classes=cfg["num_classes"], mask_stride=self.mask_strides(),
        )
        out = self.extract(batch)
        head = self.mask_head
        C = cfg["num_classes"]
        cls_flat = torch.cat([c.permute(0, 2, 3, 1).reshape(c.shape[0], -1, C) for c in out["cls"]], 1)
        labels_flat = torch.stack([torch.cat([lab.reshape(-1) for lab in t.labels]) for t in assigned])
        dices = []
        for b, t in enumerate(assigned):
            for level, cells in enumerate(t.pos_cells):
                if cells.numel() == 0:
                    continue
                probs = head.positive_mask_probs(out, b, level, cells)
                dices.append(dice_loss(probs, t.mask_targets[level][t.pos_instance[level]]))
        num_pos = sum(int(c.numel()) for t in assigned for c in t.pos_cells)
        loss_cls = sigmoid_focal_loss(cls_flat.reshape(-1, C).float(), labels_flat.reshape(-1), C,
                                      alpha=cfg["focal_alpha"], gamma=cfg["focal_gamma"]) / (num_pos + 1)
        if dices:
            loss_mask = torch.cat(dices).sum() / num_pos
        else:  # no positives in the batch: a zero that still belongs to the graph
            loss_mask = cls_flat.sum() * 0.0
        return {"loss_mask": loss_mask * cfg["mask_loss_weight"], "loss_cls": loss_cls * cfg["cls_loss_weight"]}

    # ------------------------------------------------------------------ inference
    def inference_settings(self, **overrides) -> configs.InferenceSettings:
        """The model's inference settings with ``overrides`` (score_thr, mask_thr, nms_pre,
        filter_thr, max_per_img, mask_chunk) applied; a bad one raises ValueError naming it.
        Any real number is accepted (numpy scalars, 0-d tensors; integral ones for the int
        settings) and stored as a Python float or int; bools and NaN are refused."""
        return self.config.inference.replace(**overrides)  # numpy / 0-d tensor values: plain numbers there

    @torch.no_grad()
    def predict(self, images, *, batch_size: int = 2, **overrides) -> List[SOLOResult]:
        """Instance masks of one image or a list: paths, PIL images, HWC uint8 RGB arrays, CHW
        uint8 tensors or CHW float tensors in [0, 1]. Files, PIL images and uint8 inputs give
        mmdetection's network input bit for bit (decoded and resized with OpenCV); float
        tensors are resized in float on their device (see ``transform.py``). Keyword
        overrides: score_thr, mask_thr, nms_pre, filter_thr, max_per_img, mask_chunk and
        precision (``"bf16"``: the network under bf16 autocast where the hardware has it).

        Safe to call from several threads at once on one model: each call runs in eval mode,
        and the modules' train/eval modes are restored when the last call ends."""
        batch_size = python_scalar(batch_size)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        settings = self.inference_settings(**overrides)
        inputs, arrays = load_images(images)
        results: List[SOLOResult] = []
        fast_form = self._fast_form(self.device)
        with _eval_mode(self), _precision(settings, self.device, fast_form), _memory(fast_form):
            for start in range(0, len(inputs), batch_size):
                batch, metas = self.transform(inputs[start : start + batch_size], device=self.device)
                out = self.extract(batch, settings.precision)
                _check_finite(out)
                for r, arr in zip(postprocess(self.mask_head, out, metas, settings, self.config.arch.strides), arrays[start : start + batch_size]):
                    results.append(SOLOResult(r["masks"], r["scores"], r["labels"], masks_to_boxes(r["masks"]),
                                              image=arr, class_names=self.class_names,
                                              category_ids=self.category_ids))
        return results

    # ------------------------------------------------------------------ checks
    def _check_images(self, images) -> List[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            if images.dim() == 4:
                images = list(images)
            elif images.dim() == 3:
                images = [images]
            else:
                raise ValueError(f"images: expected a list of CHW tensors or a BCHW tensor, got shape {tuple(images.shape)}")
        if not isinstance(images, (list, tuple)) or len(images) == 0:
            raise ValueError("images: expected a non-empty list of CHW uint8 tensors or float tensors in [0, 1]")
        return [check_image(img, f"images[{i}]") for i, img in enumerate(images)]

    def _check_targets(self, targets, images) -> List[Dict[str, torch.Tensor]]:
        if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
            n = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
            raise ValueError(f"targets: expected a list of {len(images)} dicts (one per image), got {n}")
        checked = []
        for i, (t, img) in enumerate(zip(targets, images)):
            if not isinstance(t, dict) or "masks" not in t or "labels" not in t:
                raise ValueError(f"targets[{i}]: expected a dict with 'masks' and 'labels'")
            m, lab = t["masks"], t["labels"]
            if not isinstance(m, torch.Tensor) or m.dim() != 3:
                raise ValueError(f"targets[{i}]['masks']: expected a [M, H, W] tensor, got "
                                 f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
            if m.dtype not in (torch.uint8, torch.bool):
                raise ValueError(f"targets[{i}]['masks']: expected dtype uint8 or bool, got {m.dtype}")
            if tuple(m.shape[1:]) != tuple(img.shape[1:]):
                raise ValueError(f"targets[{i}]['masks']: expected masks of the image's size {tuple(img.shape[1:])}, "
                                 f"got {tuple(m.shape[1:])}")
            if m.dtype == torch.uint8 and m.numel() and int(m.max()) > 1:
                raise ValueError(f"targets[{i}]['masks']: expected 0/1 values, got a maximum of {int(m.max())}")
            if not isinstance(lab, torch.Tensor) or lab.dim() != 1 or lab.shape[0] != m.shape[0]:
                raise ValueError(f"targets[{i}]['labels']: expected an int64 tensor of shape [{m.shape[0]}], got "
                                 f"{tuple(lab.shape) if isinstance(lab, torch.Tensor) else type(lab).__name__}")
            if lab.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"targets[{i}]['labels']: expected dtype int64, got {lab.dtype}")
            # (Their range is center_region_assign's check: one device read for the batch.)
            checked.append({"masks": m, "labels": lab.long()})
        return checked

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str) -> str:
        """Writes the weights and the config to one safetensors file (a directory gets
        ``model.safetensors``; a path not ending in ``.safetensors`` is a directory, created
        if missing). Written to a temporary file beside it and renamed: an interrupted save
        leaves the previous file as it was and no temporary file. A path that cannot be
        written raises ValueError naming it before anything is written."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        if os.path.isdir(path) or not path.endswith(".safetensors"):
            path = os.path.join(output_dir(path, "path"), "model.safetensors")
        meta = {"solo_fast_config": json.dumps(self.config.to_dict())}
        if self.class_names is not None:
            meta["class_names"] = json.dumps(list(self.class_names))
        if self.category_ids is not None:
            meta["category_ids"] = json.dumps([int(c) for c in self.category_ids])
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_write(path) as tmp:
            save_file(state, tmp, metadata=meta)
        return path

    @classmethod
    def from_pretrained(cls, path: str, map_location: str = "cpu") -> "SOLO":
        """A model saved by :meth:`save_pretrained` (a ``.safetensors`` file or its directory)."""
        from ..checkpoint.mmdet import _load_file  # a torn or foreign file: ValueError naming it

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no checkpoint at {path!r}")
        state, meta = _load_file(path)
        meta = meta if isinstance(meta, dict) else {}
        if "solo_fast_config" not in meta:
            raise ValueError(f"path: {path!r} is not a solo_fast checkpoint (no config in its metadata; "
                             "SOLO.from_mmdet reads mmdetection and original-SOLO checkpoints)")
        name, num_classes, overrides = _saved_settings(json.loads(meta["solo_fast_config"]))
        model = cls(name, num_classes=num_classes, **overrides)
        model.load_state_dict(state)
        if "class_names" in meta:
            model.class_names = json.loads(meta["class_names"])
        if "category_ids" in meta:
            model.category_ids = json.loads(meta["category_ids"])
        model.pretrained, model.weights_path = "checkpoint", path
        return model.to(map_location)

    @classmethod
    def from_mmdet(cls, path: str, config: str, num_classes: Optional[int] = None, strict: bool = False,
                   **overrides: Any) -> "SOLO":
        """A model of the named ``config`` with the weights of an mmdetection 2.x/3.x checkpoint
        (``mask_head.*``) or of the original SOLO repository (``bbox_head.*``): a ``.pth``/``.pt``
        file read with ``torch.load(weights_only=True)`` (weights at the top level or under
        ``"state_dict"``) or a ``.safetensors`` file.

        ``num_classes`` (foreground classes) defaults to the class conv's rows. A checkpoint for
        another head, backbone or shape raises ValueError naming a key. Keys the model lacks or
        the checkpoint lacks are listed in ``model.load_report`` and in a warning; with
        ``strict=True`` they raise ValueError instead.
        """
        from ..checkpoint import mmdet

        ckpt = mmdet.read_checkpoint(path)
        model = cls(config, num_classes=mmdet.num_classes_of(ckpt, num_classes), **overrides)
        model.load_report = mmdet.load_into(model, ckpt, strict=strict)
        if model.load_report.missing or model.load_report.unexpected:
            warnings.warn(f"from_mmdet: {path!r} loaded into {config!r} with {model.load_report}", stacklevel=2)
        if ckpt.class_names is not None and len(ckpt.class_names) == model.num_classes:
            model.class_names = ckpt.class_names
        if ckpt.category_ids is not None and len(ckpt.category_ids) == model.num_classes:
            model.category_ids = ckpt.category_ids
        model.pretrained, model.weights_path = "checkpoint", ckpt.path
        return model

    @classmethod
    def finetune_from(cls, path: str, num_classes: int, *, config: Optional[str] = None,
                      class_names: Optional[Sequence[str]] = None, category_ids: Optional[Sequence[int]] = None,
                      **overrides: Any) -> "SOLO":
        """A model for ``num_classes`` classes that starts from a detector checkpoint for other
        classes: solo_fast's own ``.safetensors`` or an mmdetection / original-SOLO ``.pth``
        (read as :meth:`from_mmdet` reads it), e.g. a COCO SOLOv2 to fine-tune on your data.

        Every tensor whose shape fits is loaded. The class conv keeps the rows of classes
        whose names match (case and ``_``/space ignored) when ``class_names`` is given and the
        checkpoint knows its class names (mmdetection's ``meta``, solo_fast's metadata), all
        rows when the classes are the same; the other rows start at the focal prior, as a new
        model's. ``model.load_report`` (an ``InitReport``) lists what was loaded, kept and
        re-initialised. ``config`` defaults to the checkpoint's (solo_fast files name it;
        for the others, the one config whose architecture the tensors show); for a solo_fast
        file its settings are kept too, except ``frozen_stages``/``norm_eval`` (the training
        recipe's) and ``overrides``. ``category_ids``: the dataset's id of each label, used by
        ``SOLOResult.to_coco`` and saved with the model.
        """
        from ..checkpoint import init, mmdet

        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        class_names = _check_per_class(class_names, num_classes, "class_names", str)
        category_ids = _check_per_class(category_ids, num_classes, "category_ids", int)
        ckpt = mmdet.read_checkpoint(path)
        name = config if config is not None else init.config_of(ckpt)
        if name is None:
            raise ValueError(f"config: {ckpt.path!r} does not say which config it is for and its tensors fit no "
                             "single named config; pass config=")
        saved: Dict[str, Any] = {}
        if ckpt.config is not None and ckpt.config.get("name") == name:
            _, _, saved = _saved_settings(ckpt.config)
            for key in ("frozen_stages", "norm_eval"):
                saved.pop(key, None)
        model = cls(name, num_classes=num_classes, **{**saved, **overrides})
        model.explicit_settings = frozenset(overrides)  # the checkpoint's settings are not the caller's choice
        report = init.load_for_finetuning(model, ckpt, class_names)
        model.load_report = report
        model.class_names, model.category_ids = class_names, category_ids
        model.pretrained, model.weights_path = "checkpoint", ckpt.path
        if report.mismatched or report.missing:
            warnings.warn(f"finetune_from: {report}", stacklevel=2)
        return model
