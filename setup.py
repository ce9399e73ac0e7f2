"""Builds solo_fast._C from csrc/ and installs kernels/ as solo_fast.kernels.

C++ CPU sources (csrc/solo_fast.cpp, csrc/cpu/*.cpp) are always built. CUDA sources
(csrc/cuda/*.cu, csrc/cuda/*.cpp) are added when the installed torch is a CUDA build
and nvcc is found, or when FORCE_CUDA=1. Build with
``pip install --no-build-isolation -e .`` so the extension matches the installed torch.
Without torch the build stops with what to do; SOLO_FAST_NO_EXTENSION=1 installs the
pure-Python package (every op on its reference path).
"""
import glob
import os
import shutil
import sys

import setuptools
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

# pyproject.toml's `license = "Apache-2.0"` (an SPDX expression, PEP 639) needs setuptools>=77;
# older ones stop with "invalid pyproject.toml config: `project.license`". This file runs before
# setup() reads pyproject.toml, so the check here comes first. (The table form older
# setuptools read, `license = {text = ...}`, is deprecated by setuptools>=77.) pip's default
# build isolation installs setuptools>=77 itself; --no-build-isolation uses this environment's.
if int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(f"solo_fast needs setuptools>=77 to build, found setuptools {setuptools.__version__} at "
             f"{os.path.dirname(setuptools.__file__)}; upgrade it: pip install -U 'setuptools>=77'")

ROOT = os.path.dirname(os.path.abspath(__file__))

NO_TORCH = """solo_fast: torch is not importable here, so the C++ extension solo_fast._C cannot be built.
Install torch first, then build solo_fast in the same environment without build isolation, so that
the extension is compiled against the torch you run:
    pip install --no-build-isolation .        (pip install --no-build-isolation -e . for a checkout)
To install the pure-Python package instead (every op on its slower reference path), set
SOLO_FAST_NO_EXTENSION=1."""


class _TorchMissing(build_ext):
    """Stands in for torch's BuildExtension without torch: building the extension stops with
    NO_TORCH (an sdist, which compiles nothing, still builds)."""

    def run(self):
        raise SystemExit(NO_TORCH)


def _extensions():
    if os.environ.get("SOLO_FAST_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [Extension("solo_fast._C", sources=[])], {"build_ext": _TorchMissing}
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = rel("csrc/solo_fast.cpp") + rel("csrc/cpu/*.cpp")
    has_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    with_cuda = os.environ.get("FORCE_CUDA") == "1" or (torch.version.cuda is not None and has_nvcc)
    # No FMA contraction: the compiled ops are held bit-exact against the reference path.
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"]
    define = []
    ext_cls = CppExtension
    extra = {"cxx": cxx}
    if with_cuda:
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
        ext_cls = CUDAExtension
        define.append(("WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
    ext = ext_cls(
        "solo_fast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["solo_fast", "solo_fast.*"]) + ["solo_fast.kernels"],
    package_dir={"solo_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
