"""What every module of kernels/ shares: the interpreter test, config -> launch keywords,
and the builder of ahead-of-time compile specs (DESIGN.md §5).

It imports neither torch nor triton: ``solo_fast.ops`` imports :func:`interpreting` at
``import solo_fast``, which must not import triton.
"""
from __future__ import annotations

import os

# ASTSource attribute of an argument that a real launch specialises as 16-divisible
# (pointers from torch allocations; sizes and strides that are multiples of 16).
DIV16 = [["tt.divisibility", 16]]


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: kernels run on CPU tensors with numpy (DESIGN.md §5)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_kwargs(config) -> dict:
    """A ``triton.Config`` as the keywords of ``kernel[grid](...)``: its constexprs, warps, stages."""
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def pointer_args(fn) -> tuple:
    """Names of the kernel's pointer arguments (by the ``_ptr`` naming rule of kernels/)."""
    return tuple(name for name in fn.arg_names if name.endswith("_ptr"))


def aot_spec(fn, config, types, *, aligned=(), ones=(), tensor_cores=False, **constexprs) -> dict:
    """One entry of a module's ``aot_specs()`` (the format tests/test_triton_aot.py reads).

    The signature comes from ``fn``'s own parameters: constexpr parameters take their
    values from ``config`` (block sizes, warps, stages) and ``constexprs``; the other
    parameters take their type from ``types``, where every pointer must appear and a
    scalar missing from it is an ``i32``. ``aligned`` names the arguments a launch
    specialises as 16-divisible; ``ones`` the int arguments passed as 1, which Triton
    turns into constants. A name that is not a parameter of ``fn``, or a constexpr
    without a value, raises, so a renamed argument cannot silently drop out of a spec.
    """
    values = {**config.kwargs, **constexprs, **dict.fromkeys(ones, 1)}
    signature = {}
    for p in fn.params:
        if p.is_constexpr or p.name in ones:
            if p.name not in values:
                raise ValueError(f"{fn.__name__}: no value for constexpr {p.name}")
            signature[p.name] = "constexpr"
        elif p.name in types:
            signature[p.name] = types[p.name]
        elif p.name.endswith("_ptr"):
            raise ValueError(f"{fn.__name__}: no type for pointer {p.name}")
        else:
            signature[p.name] = "i32"
    unknown = (set(types) | set(values) | set(aligned)) - set(signature)
    if unknown:
        raise ValueError(f"{fn.__name__} has no parameters {sorted(unknown)}")
    return {
        "fn": fn,
        "signature": signature,
        "constexprs": {name: values[name] for name in signature if signature[name] == "constexpr"},
        "attrs": {name: DIV16 for name in aligned},
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "tensor_cores": tensor_cores,
    }
