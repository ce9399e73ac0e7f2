"""The training loop: SGD or AdamW, linear warm-up + step schedule by epochs or iterations,
gradient clipping, autocast on CUDA, checkpoints and resume; single-process or DDP under
``torchrun``.

What a run leaves open is filled in by a *recipe* chosen from where the model's weights
start (:func:`plan`, logged as the first line of ``train.log``):

- **published** (pretrained weights: ``SOLO(..., backbone_weights=...)``, ``finetune_from``,
  ``from_mmdet``, ``from_pretrained``): mmdetection's ``configs/solo`` and ``configs/solov2``
  -- stem + layer1 frozen, BatchNorm statistics frozen (``norm_eval``), SGD with momentum
  0.9 and weight decay 1e-4, lr 0.01 per 16 images of total batch, warm-up from lr/3;
- **from scratch** (random weights): nothing frozen, live BatchNorm, AdamW with weight decay
  0.05, lr 3e-4, warm-up from 3 % of it -- the demo's recipe (``solo_fast/demo.py`` says why
  each part; frozen random layers and BatchNorm pinned to its initial statistics reach mask
  AP 0.000).

Both: warm-up over 500 iterations (at most a fifth of the run) and the lr x 0.1 at 8/12 and
11/12 of the schedule (the 1x schedule's epochs 8 and 11). Settings the caller gives are
kept; freezing layers of a model with random weights is refused.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import logging
import os
import random
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .. import _cpu
from . import distributed as D
from .._checks import is_int, is_number
from .._outputs import atomic_write, output_dir
from ..data import collate
from ..modeling.configs import ARCH_KEYS
from .evaluate import evaluate, format_stats, unwrap

STATE_FILE = "last_state.pt"
MODEL_FILE = "model.safetensors"
LOG_FILE = "train.log"
OPTIMIZERS = ("sgd", "adamw")
DEFAULT_EPOCHS = 12
# Checkpoint interval of an iteration schedule when none is given (epoch schedules: every epoch).
DEFAULT_SAVE_EVERY_ITERS = 1000


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Defaults for what a run leaves open."""

    name: str
    frozen_stages: int
    norm_eval: bool
    optimizer: str
    lr: float
    lr_per_16_images: bool  # True: ``lr`` is for 16 images per step, scaled linearly to the total batch
    weight_decay: float
    warmup_ratio: float
    warmup_iters: int


PUBLISHED = Recipe("published", frozen_stages=1, norm_eval=True, optimizer="sgd", lr=0.01, lr_per_16_images=True,
                   weight_decay=1e-4, warmup_ratio=1.0 / 3.0, warmup_iters=500)
FROM_SCRATCH = Recipe("from scratch", frozen_stages=-1, norm_eval=False, optimizer="adamw", lr=3e-4,
                      lr_per_16_images=False, weight_decay=0.05, warmup_ratio=0.03, warmup_iters=500)
RECIPES = {r.name: r for r in (PUBLISHED, FROM_SCRATCH)}
# The optimizer's own defaults (lr, weight decay, warm-up) follow the optimizer, whichever
# recipe chose it: an explicit optimizer="sgd" on random weights gets SGD's numbers.
_BY_OPTIMIZER = {r.optimizer: r for r in (PUBLISHED, FROM_SCRATCH)}
# The lr drops at these fractions of the schedule: epochs 8 and 11 of mmdetection's 12 (1x),
# also 16 and 22 of 24 (2x).
MILESTONE_FRACTIONS = (8 / 12, 11 / 12)


class WarmupStepSchedule:
    """Learning rate of iteration ``it`` in epoch ``epoch``: ``lr · gamma^(#milestones <= epoch)``
    (``<= it`` with ``by_iteration=True``), times a linear warm-up from ``lr · warmup_ratio``
    to ``lr`` over the first ``warmup_iters`` iterations (mmdetection's
    ``LinearLR(start_factor=1/3)`` + ``MultiStepLR``, by epoch or by iteration)."""

    def __init__(self, optimizer, lr: float, warmup_iters: int, milestones: Sequence[int], gamma: float,
                 warmup_ratio: float = 1.0 / 3.0, by_iteration: bool = False):
        self.optimizer = optimizer
        self.base_lr = float(lr)
        self.warmup_iters = int(warmup_iters)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.warmup_ratio = float(warmup_ratio)
        self.by_iteration = bool(by_iteration)
        self.iteration = 0

    def lr_at(self, iteration: int, epoch: int) -> float:
        lr = self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, iteration if self.by_iteration
                                                              else epoch)
        if iteration < self.warmup_iters:
            lr *= self.warmup_ratio + (1.0 - self.warmup_ratio) * iteration / self.warmup_iters
        return lr

    def step(self, iteration: int, epoch: int) -> float:
        """Sets the lr of every parameter group for this iteration; returns it."""
        self.iteration = iteration
        lr = self.lr_at(iteration, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> Dict[str, Any]:
        return {"base_lr": self.base_lr, "warmup_iters": self.warmup_iters, "milestones": list(self.milestones),
                "gamma": self.gamma, "warmup_ratio": self.warmup_ratio, "by_iteration": self.by_iteration,
                "iteration": self.iteration}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        # The schedule's shape comes from this run's arguments (a resumed run may extend it);
        # only the position is restored.
        self.iteration = int(state["iteration"])


def _check_positive(name, value, kind=int, allow_zero=False):
    ok = is_int(value) if kind is int else is_number(value)
    if not ok or (value < 0 if allow_zero else value <= 0):
        what = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name}: expected {what} {'int' if kind is int else 'number'}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """The options of :func:`train` (its docstring says what each does), checked once here.
    ``None`` in a recipe field (:data:`RECIPE_FIELDS`) means "the recipe's"; :func:`plan`
    returns the options with every one of them filled in."""

    out_dir: str
    epochs: Optional[int] = None
    batch_size: int = 2
    lr: Optional[float] = None
    warmup_iters: Optional[int] = None
    milestones: Optional[Tuple[int, ...]] = None
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: Optional[float] = None
    grad_clip: Optional[float] = 35.0
    num_workers: int = 0
    log_every: int = 20
    resume: Any = None
    eval_every: int = 0
    seed: int = 0
    amp: bool = True
    eval_batch_size: Optional[int] = None
    optimizer: Optional[str] = None
    warmup_ratio: Optional[float] = None
    max_iters: Optional[int] = None
    save_every: Optional[int] = None

    # The hyperparameters that define a run (written to config.json and the training state);
    # the rest say where and how it runs.
    RECORDED = ("epochs", "max_iters", "batch_size", "lr", "warmup_iters", "milestones", "gamma", "momentum",
                "weight_decay", "grad_clip", "seed", "optimizer", "warmup_ratio", "save_every")

    def __post_init__(self):
        for name in ("batch_size", "log_every"):
            _check_positive(name, getattr(self, name))
        for name in ("epochs", "max_iters", "save_every"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if self.epochs is not None and self.max_iters is not None:
            raise ValueError(f"epochs, max_iters: expected one of them (the schedule's length in epochs or in "
                             f"iterations), got epochs={self.epochs!r} and max_iters={self.max_iters!r}")
        for name in ("num_workers", "eval_every"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        if self.warmup_iters is not None:
            _check_positive("warmup_iters", self.warmup_iters, allow_zero=True)
        if self.lr is not None:
            _check_positive("lr", self.lr, float)
        w = self.warmup_ratio
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1):
            raise ValueError(f"warmup_ratio: expected a number in (0, 1], got {w!r}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("momentum", "gamma"):
            _check_positive(name, getattr(self, name), float, allow_zero=True)
        if self.weight_decay is not None:
            _check_positive("weight_decay", self.weight_decay, float, allow_zero=True)
        if self.grad_clip is not None:
            _check_positive("grad_clip", self.grad_clip, float)
        m = self.milestones
        if m is not None and (isinstance(m, (str, bytes)) or not hasattr(m, "__iter__") or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in m)):
            raise ValueError(f"milestones: expected epochs (or iterations, with max_iters) as non-negative ints, "
                             f"got {m!r}")
        if not isinstance(self.out_dir, (str, os.PathLike)):
            raise ValueError(f"out_dir: expected a directory path, got {type(self.out_dir).__name__}")
        object.__setattr__(self, "out_dir", os.fspath(self.out_dir))
        if m is not None:
            object.__setattr__(self, "milestones", tuple(m))
        if w is not None:
            object.__setattr__(self, "warmup_ratio", float(w))

    @property
    def by_iteration(self) -> bool:
        return self.max_iters is not None

    def recorded(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k in self.RECORDED}


# What a recipe fills in when the caller leaves it None.
RECIPE_FIELDS = ("optimizer", "lr", "weight_decay", "warmup_ratio", "warmup_iters", "milestones")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run will do (:func:`plan`): the recipe, why it was chosen, the options with
    nothing left to the recipe, and the backbone's settings."""

    recipe: str
    reason: str
    options: TrainOptions
    frozen_stages: int
    norm_eval: bool
    explicit: Tuple[str, ...]  # what the caller set (options and model settings the recipe has a say in)
    resumed: bool = False
    world_size: int = 1

    def describe(self) -> str:
        a = self.options
        if a.optimizer == "sgd":
            opt = f"SGD lr {a.lr:.3e}"
            if "lr" not in self.explicit and not self.resumed:
                opt += f" (0.01 x {a.batch_size * self.world_size} images / 16)"
            opt += f", momentum {a.momentum:g}"
        else:
            opt = f"AdamW lr {a.lr:.3e}"
        unit = "iterations" if a.by_iteration else "epochs"
        drops = f"lr x {a.gamma:g} at {unit} {list(a.milestones)}" if a.milestones else "no lr drops"
        frozen = ("nothing frozen" if self.frozen_stages < 0 else "stem frozen" if self.frozen_stages == 0
                  else "stem + layer1 frozen" if self.frozen_stages == 1
                  else f"stem + layer1..{self.frozen_stages} frozen")
        bn = "BatchNorm statistics frozen (norm_eval)" if self.norm_eval else "BatchNorm learns its statistics"
        length = f"{a.max_iters} iterations" if a.by_iteration else f"{a.epochs} epochs"
        mine = f"; set by you: {', '.join(self.explicit)}" if self.explicit else ""
        return (f"recipe: {self.recipe}, because {self.reason}: {opt}, weight decay {a.weight_decay:g}, "
                f"warm-up {a.warmup_iters} iterations from lr x {a.warmup_ratio:.3g}, {drops}, {length}; "
                f"backbone: {frozen}, {bn}{mine}")


def _freezes(key: str, value) -> bool:
    return value >= 0 if key == "frozen_stages" else bool(value)


def plan(model, options: TrainOptions, iters_per_epoch: int, world_size: int = 1,
         state: Optional[Dict[str, Any]] = None) -> Plan:
    """The recipe for ``model`` and every option it leaves open (see the module docstring).

    ``state``: the training state a run resumes from; its recorded options and backbone
    settings are the defaults then, so a resumed run continues the run it resumes. A model
    with random weights (no state) that is told to freeze layers (``frozen_stages >= 0``) or
    BatchNorm statistics (``norm_eval=True``) is refused: those layers would never learn."""
    net = unwrap(model)
    a = options
    chosen_settings = getattr(net, "explicit_settings", frozenset())
    recorded: Dict[str, Any] = {}
    saved_cfg: Dict[str, Any] = {}
    if state is not None:
        # States written before recipes existed: SGD meant the published recipe.
        name = state.get("recipe") or ("published" if state.get("optimizer_name", "sgd") == "sgd" else "from scratch")
        recipe = RECIPES.get(name, PUBLISHED)
        reason = f"the run resumes from a training state that used the {name} recipe"
        recorded = dict(state.get("train_options") or {})
        saved_cfg = dict(state.get("config") or {})
    elif getattr(net, "pretrained", None):
        recipe = PUBLISHED
        reason = f"the model starts from pretrained weights ({net.pretrained} {getattr(net, 'weights_path', None)!r})"
    else:
        recipe = FROM_SCRATCH
        reason = ("the model starts from random weights (no backbone_weights, no checkpoint; pass backbone_weights= "
                  "or start from SOLO.finetune_from for the published recipe)")
    backbone = {}
    for key in ("frozen_stages", "norm_eval"):
        if key in chosen_settings:
            value = net.cfg[key]
            if state is None and not getattr(net, "pretrained", None) and _freezes(key, value):
                if key == "frozen_stages":
                    what = "the stem" + ("" if value == 0 else " and layer1" if value == 1 else f" and layer1..{value}")
                    raise ValueError(
                        f"frozen_stages: {value} freezes {what} of a backbone with random weights, which would never "
                        "learn; start from pretrained weights (SOLO(..., backbone_weights=PATH) / --backbone-weights, "
                        "SOLO.finetune_from / --init) or pass frozen_stages=-1 (--frozen-stages -1)")
                raise ValueError(
                    "norm_eval: True pins every BatchNorm of a backbone with random weights to its initial statistics "
                    "(mean 0, variance 1); start from pretrained weights (SOLO(..., backbone_weights=PATH) / "
                    "--backbone-weights, SOLO.finetune_from / --init) or pass norm_eval=False (--live-bn)")
            backbone[key] = value
        else:
            backbone[key] = saved_cfg.get(key, getattr(recipe, key))

    epochs = a.epochs if a.epochs is not None or a.by_iteration else DEFAULT_EPOCHS
    length = a.max_iters if a.by_iteration else epochs
    total = a.max_iters if a.by_iteration else epochs * iters_per_epoch
    optimizer = a.optimizer or recorded.get("optimizer") or recipe.optimizer
    numbers = _BY_OPTIMIZER[optimizer]
    filled: Dict[str, Any] = {"optimizer": optimizer, "epochs": epochs}
    for key in RECIPE_FIELDS[1:]:
        if getattr(a, key) is not None:
            continue
        if key in recorded and recorded[key] is not None:
            filled[key] = tuple(recorded[key]) if key == "milestones" else recorded[key]
        elif key == "lr":
            filled[key] = numbers.lr * (a.batch_size * world_size / 16 if numbers.lr_per_16_images else 1)
        elif key == "warmup_iters":
            # A short fine-tuning run must leave warm-up: at most a fifth of it.
            filled[key] = min(numbers.warmup_iters, max(1, total // 5))
        elif key == "milestones":
            filled[key] = tuple(sorted({int(round(length * f)) for f in MILESTONE_FRACTIONS}))
        else:
            filled[key] = getattr(numbers, key)
    if a.save_every is None:
        filled["save_every"] = DEFAULT_SAVE_EVERY_ITERS if a.by_iteration else 1
    explicit = tuple([k for k in RECIPE_FIELDS if getattr(a, k) is not None]
                     + [k for k in ("frozen_stages", "norm_eval") if k in chosen_settings])
    return Plan(recipe=recipe.name, reason=reason, options=dataclasses.replace(a, **filled),
                frozen_stages=backbone["frozen_stages"], norm_eval=backbone["norm_eval"], explicit=explicit,
                resumed=state is not None, world_size=world_size)


def _make_logger(path: Optional[str]) -> logging.Logger:
    """A logger writing to ``path`` (rank 0) and to the console through tqdm, so lines do not
    break the progress bar; handlers of an earlier run in this process are replaced."""
    logger = logging.getLogger("solo_fast.train")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if path is None:
        logger.addHandler(logging.NullHandler())
        return logger
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    fh = logging.FileHandler(path)
    fh.setFormatter(fmt)
    logger.addHandler(fh)

    class _TqdmHandler(logging.Handler):
        def emit(self, record):
            from tqdm import tqdm

            tqdm.write(self.format(record))

    ch = _TqdmHandler()
    ch.setFormatter(fmt)
    logger.addHandler(ch)
    return logger


def _atomic_torch_save(obj, path: str) -> None:
    # Written beside the final name and renamed, so an interrupted run never leaves a torn
    # file, nor a temporary one.
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def _save_model(model, out_dir: str) -> str:
    return model.save_pretrained(os.path.join(out_dir, MODEL_FILE))  # atomic, as above


def _resume_path(resume, out_dir: str) -> str:
    path = out_dir if resume is True else os.fspath(resume)
    if os.path.isdir(path):
        path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume: no training state at {path!r} (expected the {STATE_FILE} of an earlier run)")
    return path


def _read_state(path: str) -> Dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: say which and why, not a pickle traceback
        raise ValueError(f"resume: {path!r} is not a readable solo_fast training state ({exc})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "config"} <= set(state):
        raise ValueError(f"resume: {path!r} is not a solo_fast training state")
    return state


def _check_state(state: Dict[str, Any], path: str, model) -> None:
    cfg = state["config"]
    if cfg.get("name") != model.config_name or cfg.get("num_classes") != model.num_classes:
        raise ValueError(f"resume: {path!r} was written for config {cfg.get('name')!r} with "
                         f"{cfg.get('num_classes')} classes, but the model is {model.config_name!r} with "
                         f"{model.num_classes} classes")
    # frozen_stages too: it decides which parameters the optimizer state belongs to.
    arch = ARCH_KEYS + ("frozen_stages",)
    diff = [k for k in arch if k in cfg and json.dumps(cfg[k]) != json.dumps(list(model.cfg[k])
                                                                             if isinstance(model.cfg[k], tuple) else model.cfg[k])]
    if diff:
        raise ValueError(f"resume: {path!r} was written for a model with other settings ({', '.join(diff)})")


class _ResumableSampler(torch.utils.data.Sampler):
    """A sampler whose next pass may start part-way into the epoch (a run resumed from a
    checkpoint written mid-epoch) without loading the batches it skips."""

    def __init__(self, inner):
        self.inner = inner
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return len(self.inner) - self.skip


def _seed(seed: int, position: int, rank: int) -> None:
    random.seed(seed * 1000003 + position * 101 + rank)
    torch.manual_seed(seed * 1000003 + position * 101 + rank)


def train(model, dataset, *, out_dir: str, epochs: Optional[int] = None, batch_size: int = 2,
          lr: Optional[float] = None, warmup_iters: Optional[int] = None, milestones: Optional[Sequence[int]] = None,
          gamma: float = 0.1, momentum: float = 0.9, weight_decay: Optional[float] = None,
          grad_clip: Optional[float] = 35.0, num_workers: int = 0, log_every: int = 20, resume=None, val_dataset=None,
          eval_every: int = 0, seed: int = 0, device=None, amp: bool = True, eval_batch_size: Optional[int] = None,
          optimizer: Optional[str] = None, warmup_ratio: Optional[float] = None, max_iters: Optional[int] = None,
          save_every: Optional[int] = None):
    """Trains ``model`` (a :class:`solo_fast.SOLO`) on ``dataset`` (``(image, target)`` pairs, e.g.
    :class:`solo_fast.data.CocoDataset`) and returns it.

    Options left None come from the recipe (module docstring; the first line of ``train.log``
    says which and why): ``optimizer`` ("sgd": SGD with ``momentum``; "adamw"), ``lr``,
    ``weight_decay``, the linear warm-up from ``lr * warmup_ratio`` over ``warmup_iters``
    iterations, and ``milestones``, where the lr is multiplied by ``gamma``. The model's
    ``frozen_stages`` and ``norm_eval`` come from the recipe too unless they were passed to
    ``SOLO(...)``. The schedule runs ``epochs`` epochs (default 12; milestones in epochs) or,
    with ``max_iters``, that many iterations (milestones, ``save_every`` and ``eval_every``
    in iterations). Gradients are clipped to norm ``grad_clip`` (None: off); autocast (bf16,
    else fp16 with a grad scaler) on CUDA only. ``batch_size`` is per process.

    Writes to ``out_dir``: ``train.log``, ``model.safetensors`` (``SOLO.save_pretrained``, with
    the dataset's class names and category ids) and ``last_state.pt`` (model, optimizer,
    schedule, position, recipe; loadable with ``weights_only=True``) every ``save_every``
    epochs or iterations (default: every epoch, or every 1000 iterations) and at the end,
    ``config.json`` (model config, recipe and these options) and, with a ``val_dataset``,
    ``metrics.json``. ``resume`` (True, ``out_dir``, or a ``last_state.pt`` path) continues
    from the last checkpoint, with the resumed run's options as defaults. With
    ``val_dataset`` the model is evaluated every ``eval_every`` epochs or iterations (0:
    after the last one only).

    Under ``torchrun`` (the environment has RANK/WORLD_SIZE) the process group is set up
    here (nccl on CUDA, gloo on the CPU) and torn down at the end, the model is wrapped in
    DistributedDataParallel, each rank sees its share of every epoch, and only rank 0
    logs and writes files.
    """
    opts = TrainOptions(out_dir=out_dir, epochs=epochs, batch_size=batch_size, lr=lr, warmup_iters=warmup_iters,
                        milestones=milestones, gamma=gamma, momentum=momentum, weight_decay=weight_decay,
                        grad_clip=grad_clip, num_workers=num_workers, log_every=log_every, resume=resume,
                        eval_every=eval_every, seed=seed, amp=amp, eval_batch_size=eval_batch_size,
                        optimizer=optimizer, warmup_ratio=warmup_ratio, max_iters=max_iters, save_every=save_every)
    if len(dataset) == 0:
        raise ValueError("dataset: has no images to train on")
    net = unwrap(model)
    cat_ids = getattr(dataset, "cat_ids", None)
    if cat_ids is not None and len(cat_ids) != net.num_classes:
        raise ValueError(f"model: has {net.num_classes} classes, but the dataset has {len(cat_ids)} categories")
    notes = []
    report = getattr(net, "load_report", None)
    if report is not None and resume in (None, False):
        notes.append(f"weights: {report}")
    # The model learns the dataset's labels: its names and category ids are what the labels mean now.
    names = getattr(dataset, "class_names", None)
    if names is not None:
        if net.class_names is not None and list(net.class_names) != list(names):
            notes.append(f"class names {list(net.class_names)} replaced by the dataset's {list(names)}")
        net.class_names = list(names)
    if cat_ids is not None:
        net.category_ids = [int(c) for c in cat_ids]

    dev, created = D.setup(device)
    ok = False
    try:
        net = _train(net, dataset, val_dataset, dev, opts, notes)
        ok = True
        return net
    finally:
        _make_logger(None)  # closes the log file
        D.cleanup(created, ok)


def _train(net, dataset, val_dataset, dev, a: TrainOptions, notes=()):
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler

    out_dir, batch_size = a.out_dir, a.batch_size
    rank, world = D.rank(), D.world_size()
    main = rank == 0

    resumed, state_path = None, None
    if a.resume is not None and a.resume is not False:
        state_path = _resume_path(a.resume, out_dir)
        resumed = _read_state(state_path)
    # One sampler code path: with one replica DistributedSampler is a seeded shuffle whose
    # order depends only on (seed, epoch), so a resumed run sees the same batches.
    sampler = _ResumableSampler(DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                   seed=a.seed))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=a.num_workers,
                        collate_fn=collate, pin_memory=dev.type == "cuda", drop_last=False)
    iters_per_epoch = len(loader)
    # Everything that can refuse the run does so before anything is written.
    the_plan = plan(net, a, iters_per_epoch, world, resumed)
    a = the_plan.options
    if (the_plan.frozen_stages, the_plan.norm_eval) != (net.cfg["frozen_stages"], net.cfg["norm_eval"]):
        net.set_backbone_training(the_plan.frozen_stages, the_plan.norm_eval)
    if resumed is not None:
        _check_state(resumed, state_path, net)
        # States written before the optimizer choice existed are SGD's.
        if resumed.get("optimizer_name", "sgd") != a.optimizer:
            raise ValueError(f"optimizer: {state_path!r} was trained with {resumed.get('optimizer_name', 'sgd')!r}, "
                             f"got {a.optimizer!r}; resume with the same optimizer")
    # The last check, as it creates the folder: made and tried before any work (on every
    # rank: all of them refuse alike), so an unwritable out_dir does not fail the first
    # checkpoint, an epoch in.
    output_dir(out_dir, "out_dir")

    D.barrier()
    logger = _make_logger(os.path.join(out_dir, LOG_FILE) if main else None)
    logger.info(the_plan.describe())
    for note in notes:
        logger.info(note)

    net.to(dev)
    params = [p for p in net.parameters() if p.requires_grad]
    if a.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay)
    by_iter = a.by_iteration
    schedule = WarmupStepSchedule(optimizer, a.lr, a.warmup_iters, a.milestones, a.gamma,
                                  warmup_ratio=a.warmup_ratio, by_iteration=by_iter)
    total_iters = a.max_iters if by_iter else a.epochs * iters_per_epoch
    epoch, epoch_step, iteration = 0, 0, 0  # epochs completed, steps into the next one, steps in all
    if resumed is not None:
        net.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        schedule.load_state_dict(resumed["scheduler"])
        epoch, iteration = int(resumed["epoch"]), int(resumed["iteration"])
        epoch_step = int(resumed.get("epoch_step", 0))
        if epoch_step >= iters_per_epoch:  # another world size or batch: that epoch is over
            epoch, epoch_step = epoch + 1, 0
        logger.info(f"resumed from {state_path}: {epoch} epochs ({iteration} iterations) done")
        if iteration >= total_iters:
            logger.info(f"nothing to do: {iteration} iterations done, {total_iters} asked for")

    use_amp = bool(a.amp) and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    if scaler.is_enabled() and resumed is not None and "scaler" in resumed:
        scaler.load_state_dict(resumed["scaler"])

    if world > 1:
        # SOLO's per-level 1x1 mask convs (and SOLOv2's kernels) of levels with no positive
        # cell in a batch get no gradient: DDP must be told to expect unused parameters.
        model = DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)
    else:
        model = net

    length = f"iterations {iteration + 1}..{a.max_iters}" if by_iter else f"epochs {epoch + 1}..{a.epochs}"
    if main:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({"model": dict(net.cfg), "class_names": net.class_names, "category_ids": net.category_ids,
                       "recipe": {"name": the_plan.recipe, "reason": the_plan.reason,
                                  "explicit": list(the_plan.explicit)},
                       "train": a.recorded() | {"world_size": world, "iters_per_epoch": iters_per_epoch}},
                      f, indent=1, default=str)
        logger.info(f"training {net.config_name} ({net.num_classes} classes) on {len(dataset)} images, "
                    f"{world} process(es) x batch {batch_size}, {iters_per_epoch} iterations/epoch, "
                    f"{length}, device {dev}"
                    + (f", autocast {str(amp_dtype).replace('torch.', '')}" if use_amp else ""))

    metrics = []
    metrics_path = os.path.join(out_dir, "metrics.json")
    if main and os.path.isfile(metrics_path) and iteration > 0:
        with open(metrics_path) as f:
            metrics = json.load(f)

    def save(epochs_done: int, steps_done: int) -> str:
        path = _save_model(net, out_dir)
        state = {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                 "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                 "epoch": epochs_done, "epoch_step": steps_done, "iteration": iteration, "config": dict(net.cfg),
                 "world_size": world, "optimizer_name": a.optimizer, "recipe": the_plan.recipe,
                 "train_options": a.recorded()}
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        _atomic_torch_save(state, os.path.join(out_dir, STATE_FILE))
        return path

    def validate(entry: Dict[str, int]) -> None:
        stats = evaluate(net, val_dataset, batch_size=a.eval_batch_size or batch_size,
                         num_workers=a.num_workers, verbose=main)
        _cpu.empty_cache()  # the fast inference path's idle blocks are no use to training
        if main:
            where = " ".join(f"{k} {v}" for k, v in entry.items())
            logger.info(f"{where} eval: {format_stats(stats)}")
            metrics.append({**entry, **stats})
            with open(metrics_path, "w") as f:
                json.dump(metrics, f, indent=1)

    from tqdm import tqdm

    while iteration < total_iters:
        if not by_iter:
            # Seeded per epoch (and rank), so a resumed run draws the same flips and scales as an
            # uninterrupted one without saving RNG states (epoch schedules resume at epoch ends).
            _seed(a.seed, epoch, rank)
        sampler.set_epoch(epoch, skip=epoch_step * batch_size)
        model.train()
        desc = f"iter {iteration + 1}/{a.max_iters}" if by_iter else f"epoch {epoch + 1}/{a.epochs}"
        bar = tqdm(total=min(iters_per_epoch - epoch_step, total_iters - iteration), desc=desc, unit="it",
                   dynamic_ncols=True, disable=None if main else True, leave=False)  # None: off unless a terminal
        t_epoch = t_log = time.perf_counter()
        sums: Dict[str, float] = {}
        count = 0
        step = epoch_step
        for images, targets in loader:
            if iteration >= total_iters:
                break
            if by_iter:
                # Iteration schedules may resume mid-epoch: seeded per iteration instead.
                _seed(a.seed, iteration, rank)
            lr = schedule.step(iteration, epoch)
            # Images and masks stay where the loader put them: the model's transform resizes
            # uint8 images and their masks on the host (OpenCV) and copies the result over.
            targets = [{"masks": t["masks"], "labels": t["labels"].to(dev, non_blocking=True)} for t in targets]
            with torch.autocast("cuda", dtype=amp_dtype, enabled=use_amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {float(loss.detach())} at epoch {epoch + 1}, iteration {iteration + 1} "
                    f"({ {k: float(v.detach()) for k, v in losses.items()} }); try a lower lr or a longer warm-up")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if a.grad_clip is not None:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, a.grad_clip))
            else:
                grad_norm = float("nan")
            scaler.step(optimizer)
            scaler.update()
            iteration += 1
            step += 1
            count += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}")
            bar.update(1)
            last = iteration == total_iters
            if step % a.log_every == 0 or step == iters_per_epoch or last:
                keys = sorted(sums)
                avg = D.mean_over_ranks([sums[k] / count for k in keys], dev)
                now = time.perf_counter()
                sec_per_it = (now - t_log) / count
                eta = sec_per_it * (total_iters - iteration)
                where = (f"iter {iteration}/{a.max_iters} (epoch {epoch + 1}, {step}/{iters_per_epoch})" if by_iter
                         else f"epoch {epoch + 1}/{a.epochs} iter {step}/{iters_per_epoch}")
                logger.info(f"{where} lr {lr:.3e} "
                            + " ".join(f"{k} {v:.4f}" for k, v in zip(keys, avg))
                            + f" loss {sum(avg):.4f} grad_norm {grad_norm:.2f} {sec_per_it:.2f}s/it "
                            f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")
                sums, count, t_log = {}, 0, now
            if by_iter:
                if iteration % a.save_every == 0 or last:
                    if main:
                        done_epoch = step == iters_per_epoch
                        path = save(epoch + done_epoch, 0 if done_epoch else step)
                        logger.info(f"iter {iteration}: saved {path}")
                    D.barrier()
                if val_dataset is not None and ((a.eval_every and iteration % a.eval_every == 0) or last):
                    validate({"iteration": iteration, "epoch": epoch + 1})
        bar.close()
        if step == iters_per_epoch:
            epoch, epoch_step = epoch + 1, 0
        else:  # the schedule ended inside this epoch
            epoch_step = step
        if not by_iter:
            if main:
                msg = f"epoch {epoch} done in {time.perf_counter() - t_epoch:.1f}s"
                if epoch % a.save_every == 0 or epoch == a.epochs:
                    msg += f"; saved {save(epoch, 0)}"
                logger.info(msg)
            D.barrier()
            if val_dataset is not None and ((a.eval_every and epoch % a.eval_every == 0) or epoch == a.epochs):
                validate({"epoch": epoch})
    if main:
        logger.info(f"finished: {iteration} iterations; checkpoint {os.path.join(out_dir, MODEL_FILE)}")
    D.barrier()
    net.eval()
    return net
