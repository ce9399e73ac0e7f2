"""Builds solo_fast._C from csrc/ and installs kernels/ as solo_fast.kernels.

C++ CPU sources (csrc/solo_fast.cpp, csrc/cpu/*.cpp) are always built. CUDA sources
(csrc/cuda/*.cu, csrc/cuda/*.cpp) are added when the installed torch is a CUDA build
and nvcc is found, or when FORCE_CUDA=1. Build with
``pip install --no-build-isolation -e .`` so the extension matches the installed torch.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # no torch at build time: pure-Python install, reference path only
        return [], {}
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
