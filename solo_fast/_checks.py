"""Input checks shared by the package (the ops first): bad input gets a ValueError naming
the argument and what was expected (DESIGN.md §3)."""
from __future__ import annotations

import math
import numbers
from typing import Sequence, Tuple

import torch


def is_int(v) -> bool:
    """A Python int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite Python int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_integral(v) -> bool:
    """An integer scalar: a Python or numpy int (not a bool) or a 0-d integer tensor."""
    import numpy as np

    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def python_scalar(v):
    """``v`` as a plain Python number when it is a real number of another type (a numpy
    scalar or 0-d array, a 0-d tensor, a ``fractions.Fraction``, ...), else ``v`` unchanged.

    Settings are checked with :func:`is_number` / :func:`is_int` after this, so bools
    (``np.bool_`` and bool tensors become ``bool``), NaN and non-integral values for int
    settings are still refused; what passes downstream (and into a saved config's JSON) is
    an ``int`` or a ``float``, never a tensor."""
    import numpy as np

    if isinstance(v, (list, tuple)):  # list settings (num_grids, scale ranges, ...) element-wise
        return type(v)(python_scalar(x) for x in v)
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return v.item() if v.ndim == 0 else v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def size_hw(name: str, value) -> Tuple[int, int]:
    """A (height, width) pair of positive ints."""
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(is_int(v) and v > 0 for v in value):
        raise ValueError(f"{name}: expected (height, width) of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def tensor(name: str, value, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: expected dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def length(name: str, value: torch.Tensor, expected: int, other: str) -> None:
    if value.shape[0] != expected:
        raise ValueError(f"{name}: expected {expected} entries (one per {other}), got {value.shape[0]}")


def same_device(**tensors: torch.Tensor) -> None:
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"expected all tensors on one device, got {devices}")


def finite(name: str, value: torch.Tensor) -> None:
    if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or Inf")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


MASK_DTYPES = (torch.bool, torch.uint8)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
