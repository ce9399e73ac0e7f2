"""Process-group helpers: the same code runs single-process or under ``torchrun``."""
from __future__ import annotations

import os
from typing import Any, List, Tuple

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    """True when ``torchrun`` (or ``python -m torch.distributed.run``) launched this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device=None) -> Tuple[torch.device, bool]:
    """Initialises the process group from the torchrun environment (nccl on CUDA, gloo on
    the CPU) if it is not initialised yet. Returns the device this rank should use and
    whether this call created the group (its caller then destroys it with :func:`cleanup`)."""
    created = False
    if under_torchrun() and not is_dist():
        use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    if device is not None:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if is_dist() else torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    return dev, created


def cleanup(created: bool, ok: bool = True) -> None:
    """Destroys the group if ``created``; after a failure on this rank no barrier is entered
    (the other ranks are elsewhere: waiting for them would hang instead of failing)."""
    if created and is_dist():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_gather_list(items: List[Any]) -> List[Any]:
    """The concatenation, in rank order, of every rank's list (picklable objects)."""
    if not is_dist() or world_size() == 1:
        return list(items)
    gathered: List[Any] = [None] * world_size()
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_over_ranks(values: List[float], device) -> List[float]:
    """Each value averaged over the ranks (every rank must call it)."""
    if not is_dist() or world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world_size()).tolist()
