"""The training loop: SGD, linear warm-up + step schedule, gradient clipping, autocast on
CUDA, checkpoints and resume; single-process or DDP under ``torchrun``."""
from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import os
import random
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from . import distributed as D
from ..data import collate
from ..modeling.configs import ARCH_KEYS
from .evaluate import evaluate, format_stats, unwrap

STATE_FILE = "last_state.pt"
MODEL_FILE = "model.safetensors"
LOG_FILE = "train.log"
OPTIMIZERS = ("sgd", "adamw")


class WarmupStepSchedule:
    """Learning rate of iteration ``it`` in epoch ``epoch``: ``lr · gamma^(#milestones <= epoch)``,
    times a linear warm-up from ``lr · warmup_ratio`` to ``lr`` over the first ``warmup_iters``
    iterations (mmdetection's ``LinearLR(start_factor=1/3)`` + ``MultiStepLR`` by epoch)."""

    def __init__(self, optimizer, lr: float, warmup_iters: int, milestones: Sequence[int], gamma: float,
                 warmup_ratio: float = 1.0 / 3.0):
        self.optimizer = optimizer
        self.base_lr = float(lr)
        self.warmup_iters = int(warmup_iters)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.warmup_ratio = float(warmup_ratio)
        self.iteration = 0

    def lr_at(self, iteration: int, epoch: int) -> float:
        lr = self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, epoch)
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
                "gamma": self.gamma, "warmup_ratio": self.warmup_ratio, "iteration": self.iteration}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        # The schedule's shape comes from this run's arguments (a resumed run may extend it);
        # only the position is restored.
        self.iteration = int(state["iteration"])


def _check_positive(name, value, kind=int, allow_zero=False):
    ok = not isinstance(value, bool) and isinstance(value, (int,) if kind is int else (int, float))
    if not ok or (value < 0 if allow_zero else value <= 0) or (kind is float and not math.isfinite(value)):
        what = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name}: expected {what} {'int' if kind is int else 'number'}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """The options of :func:`train` (its docstring says what each does), checked once here."""

    out_dir: str
    epochs: int = 12
    batch_size: int = 2
    lr: float = 0.01
    warmup_iters: int = 500
    milestones: Tuple[int, ...] = (8, 11)
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: Optional[float] = 35.0
    num_workers: int = 0
    log_every: int = 20
    resume: Any = None
    eval_every: int = 0
    seed: int = 0
    amp: bool = True
    eval_batch_size: Optional[int] = None
    optimizer: str = "sgd"
    warmup_ratio: float = 1.0 / 3.0

    # The hyperparameters that define a run (written to config.json); the rest say where
    # and how it runs.
    RECORDED = ("epochs", "batch_size", "lr", "warmup_iters", "milestones", "gamma", "momentum", "weight_decay",
                "grad_clip", "seed", "optimizer", "warmup_ratio")

    def __post_init__(self):
        for name in ("epochs", "batch_size", "log_every"):
            _check_positive(name, getattr(self, name))
        for name in ("warmup_iters", "num_workers", "eval_every"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        _check_positive("lr", self.lr, float)
        w = self.warmup_ratio
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
            raise ValueError(f"warmup_ratio: expected a number in (0, 1], got {w!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("momentum", "weight_decay", "gamma"):
            _check_positive(name, getattr(self, name), float, allow_zero=True)
        if self.grad_clip is not None:
            _check_positive("grad_clip", self.grad_clip, float)
        m = self.milestones
        if isinstance(m, (str, bytes)) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in m):
            raise ValueError(f"milestones: expected epochs (non-negative ints), got {m!r}")
        if not isinstance(self.out_dir, (str, os.PathLike)):
            raise ValueError(f"out_dir: expected a directory path, got {type(self.out_dir).__name__}")
        object.__setattr__(self, "out_dir", os.fspath(self.out_dir))
        object.__setattr__(self, "milestones", tuple(m))
        object.__setattr__(self, "warmup_ratio", float(w))

    def recorded(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k in self.RECORDED}


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
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_model(model, out_dir: str) -> str:
    # Written beside the final name and renamed, so an interrupted run never leaves a torn file.
    tmp = os.path.join(out_dir, ".model.tmp.safetensors")
    model.save_pretrained(tmp)
    path = os.path.join(out_dir, MODEL_FILE)
    os.replace(tmp, path)
    return path


def _resume_path(resume, out_dir: str) -> str:
    path = out_dir if resume is True else os.fspath(resume)
    if os.path.isdir(path):
        path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume: no training state at {path!r} (expected the {STATE_FILE} of an earlier run)")
    return path


def _load_state(path: str, model) -> Dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: say which and why, not a pickle traceback
        raise ValueError(f"resume: {path!r} is not a readable solo_fast training state ({exc})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "config"} <= set(state):
        raise ValueError(f"resume: {path!r} is not a solo_fast training state")
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
    return state


def train(model, dataset, *, out_dir: str, epochs: int = 12, batch_size: int = 2, lr: float = 0.01,
          warmup_iters: int = 500, milestones: Sequence[int] = (8, 11), gamma: float = 0.1, momentum: float = 0.9,
          weight_decay: float = 1e-4, grad_clip: Optional[float] = 35.0, num_workers: int = 0, log_every: int = 20,
          resume=None, val_dataset=None, eval_every: int = 0, seed: int = 0, device=None, amp: bool = True,
          eval_batch_size: Optional[int] = None, optimizer: str = "sgd", warmup_ratio: float = 1.0 / 3.0):
    """Trains ``model`` (a :class:`solo_fast.SOLO`) on ``dataset`` (``(image, target)`` pairs, e.g.
    :class:`solo_fast.data.CocoDataset`) and returns it.

    SGD (``momentum``, ``weight_decay``; ``optimizer="adamw"``: AdamW with that weight decay,
    which trains a model from scratch, e.g. the demo's, in far fewer steps), the lr warmed up
    linearly from ``lr * warmup_ratio`` over ``warmup_iters`` iterations and multiplied by ``gamma`` at each epoch of ``milestones``;
    gradients clipped to norm ``grad_clip`` (None: off); autocast (bf16, else fp16 with a
    grad scaler) on CUDA only. ``batch_size`` is per process.

    Writes to ``out_dir``: ``train.log``, ``model.safetensors`` (``SOLO.save_pretrained``,
    after every epoch), ``last_state.pt`` (model, optimizer, schedule, epoch; loadable with
    ``weights_only=True``), ``config.json`` (model config and these arguments) and, with a
    ``val_dataset``, ``metrics.json``. ``resume`` (True, ``out_dir``, or a ``last_state.pt``
    path) continues after the last completed epoch. With ``val_dataset`` the model is
    evaluated every ``eval_every`` epochs (0: after the last one only).

    Under ``torchrun`` (the environment has RANK/WORLD_SIZE) the process group is set up
    here (nccl on CUDA, gloo on the CPU) and torn down at the end, the model is wrapped in
    DistributedDataParallel, each rank sees its share of every epoch, and only rank 0
    logs and writes files.
    """
    opts = TrainOptions(out_dir=out_dir, epochs=epochs, batch_size=batch_size, lr=lr, warmup_iters=warmup_iters,
                        milestones=milestones, gamma=gamma, momentum=momentum, weight_decay=weight_decay,
                        grad_clip=grad_clip, num_workers=num_workers, log_every=log_every, resume=resume,
                        eval_every=eval_every, seed=seed, amp=amp, eval_batch_size=eval_batch_size,
                        optimizer=optimizer, warmup_ratio=warmup_ratio)
    if len(dataset) == 0:
        raise ValueError("dataset: has no images to train on")
    net = unwrap(model)
    cat_ids = getattr(dataset, "cat_ids", None)
    if cat_ids is not None and len(cat_ids) != net.num_classes:
        raise ValueError(f"model: has {net.num_classes} classes, but the dataset has {len(cat_ids)} categories")
    if net.class_names is None and getattr(dataset, "class_names", None) is not None:
        net.class_names = list(dataset.class_names)

    dev, created = D.setup(device)
    ok = False
    try:
        net = _train(net, dataset, val_dataset, dev, opts)
        ok = True
        return net
    finally:
        _make_logger(None)  # closes the log file
        D.cleanup(created, ok)


def _train(net, dataset, val_dataset, dev, a: TrainOptions):
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler

    out_dir, epochs, batch_size = a.out_dir, a.epochs, a.batch_size
    rank, world = D.rank(), D.world_size()
    main = rank == 0
    if main:
        os.makedirs(out_dir, exist_ok=True)
    D.barrier()
    logger = _make_logger(os.path.join(out_dir, LOG_FILE) if main else None)

    net.to(dev)
    params = [p for p in net.parameters() if p.requires_grad]
    if a.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay)
    schedule = WarmupStepSchedule(optimizer, a.lr, a.warmup_iters, a.milestones, a.gamma,
                                  warmup_ratio=a.warmup_ratio)
    start_epoch, iteration = 0, 0
    resumed = None
    if a.resume is not None and a.resume is not False:
        path = _resume_path(a.resume, out_dir)
        resumed = _load_state(path, net)
        # States written before the optimizer choice existed are SGD's.
        if resumed.get("optimizer_name", "sgd") != a.optimizer:
            raise ValueError(f"optimizer: {path!r} was trained with {resumed.get('optimizer_name', 'sgd')!r}, "
                             f"got {a.optimizer!r}; resume with the same optimizer")
        net.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        schedule.load_state_dict(resumed["scheduler"])
        start_epoch, iteration = int(resumed["epoch"]), int(resumed["iteration"])
        logger.info(f"resumed from {path}: {start_epoch} epochs ({iteration} iterations) done")
        if start_epoch >= epochs:
            logger.info(f"nothing to do: {start_epoch} epochs done, {epochs} asked for")

    use_amp = bool(a.amp) and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    if scaler.is_enabled() and resumed is not None and "scaler" in resumed:
        scaler.load_state_dict(resumed["scaler"])

    # One sampler code path: with one replica DistributedSampler is a seeded shuffle whose
    # order depends only on (seed, epoch), so a resumed run sees the same batches.
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=a.seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=a.num_workers,
                        collate_fn=collate, pin_memory=dev.type == "cuda", drop_last=False)
    iters_per_epoch = len(loader)
    if world > 1:
        # SOLO's per-level 1x1 mask convs (and SOLOv2's kernels) of levels with no positive
        # cell in a batch get no gradient: DDP must be told to expect unused parameters.
        model = DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)
    else:
        model = net

    if main:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({"model": net.cfg, "class_names": net.class_names,
                       "train": a.recorded() | {"world_size": world, "iters_per_epoch": iters_per_epoch}},
                      f, indent=1, default=str)
        logger.info(f"training {net.config_name} ({net.num_classes} classes) on {len(dataset)} images, "
                    f"{world} process(es) x batch {batch_size}, {iters_per_epoch} iterations/epoch, "
                    f"epochs {start_epoch + 1}..{epochs}, device {dev}"
                    + (f", autocast {str(amp_dtype).replace('torch.', '')}" if use_amp else ""))

    metrics = []
    metrics_path = os.path.join(out_dir, "metrics.json")
    if main and os.path.isfile(metrics_path) and start_epoch > 0:
        with open(metrics_path) as f:
            metrics = json.load(f)
    eval_every = a.eval_every
    total_iters = epochs * iters_per_epoch
    from tqdm import tqdm

    for epoch in range(start_epoch, epochs):
        # Seeded per epoch (and rank), so a resumed run draws the same flips and scales as an
        # uninterrupted one without saving RNG states.
        random.seed(a.seed * 1000003 + epoch * 101 + rank)
        torch.manual_seed(a.seed * 1000003 + epoch * 101 + rank)
        sampler.set_epoch(epoch)
        model.train()
        bar = tqdm(total=iters_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", unit="it", dynamic_ncols=True,
                   disable=None if main else True, leave=False)  # None: off when stderr is not a terminal
        t_epoch = t_log = time.perf_counter()
        sums: Dict[str, float] = {}
        count = 0
        for step, (images, targets) in enumerate(loader):
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
            count += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}")
            bar.update(1)
            if (step + 1) % a.log_every == 0 or step + 1 == iters_per_epoch:
                keys = sorted(sums)
                avg = D.mean_over_ranks([sums[k] / count for k in keys], dev)
                now = time.perf_counter()
                sec_per_it = (now - t_log) / count
                eta = sec_per_it * (total_iters - iteration)
                logger.info(f"epoch {epoch + 1}/{epochs} iter {step + 1}/{iters_per_epoch} lr {lr:.3e} "
                            + " ".join(f"{k} {v:.4f}" for k, v in zip(keys, avg))
                            + f" loss {sum(avg):.4f} grad_norm {grad_norm:.2f} {sec_per_it:.2f}s/it "
                            f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")
                sums, count, t_log = {}, 0, now
        bar.close()
        done = epoch + 1
        if main:
            path = _save_model(net, out_dir)
            state = {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                     "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                     "epoch": done, "iteration": iteration, "config": dict(net.cfg), "world_size": world,
                     "optimizer_name": a.optimizer}
            if scaler.is_enabled():
                state["scaler"] = scaler.state_dict()
            _atomic_torch_save(state, os.path.join(out_dir, STATE_FILE))
            logger.info(f"epoch {done} done in {time.perf_counter() - t_epoch:.1f}s; saved {path}")
        D.barrier()
        if val_dataset is not None and ((eval_every and done % eval_every == 0) or done == epochs):
            stats = evaluate(net, val_dataset, batch_size=a.eval_batch_size or batch_size,
                             num_workers=a.num_workers, verbose=main)
            if main:
                logger.info(f"epoch {done} eval: {format_stats(stats)}")
                metrics.append({"epoch": done, **stats})
                with open(metrics_path, "w") as f:
                    json.dump(metrics, f, indent=1)
    if main:
        logger.info(f"finished: {iteration} iterations; checkpoint {os.path.join(out_dir, MODEL_FILE)}")
    D.barrier()
    net.eval()
    return net
