"""Packaging: the extension is built, kernels/ is installed as solo_fast.kernels, and
solo_fast degrades to the reference path (with one warning) when _C cannot be imported;
the sdist ships every source and a wheel built from it works; a build without torch or
with too old a setuptools, and an import with too old a torch, say what to do."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import solo_fast

ROOT = Path(__file__).resolve().parents[1]


def test_extension_and_kernels_are_installed():
    from solo_fast import _ext

    assert _ext.available(), f"solo_fast._C did not load: {_ext._error}"
    import solo_fast.kernels

    assert os.path.basename(os.path.dirname(solo_fast.kernels.__file__)) == "kernels"
    assert "cpu" in solo_fast.ops.available_backends("center_region_assign", "cpu")
    assert "cpu" in solo_fast.ops.available_backends("matrix_nms", "cpu")


def test_without_extension_falls_back_to_reference_and_warns_once():
    code = textwrap.dedent("""
        import sys, warnings, torch
        sys.modules["solo_fast._C"] = None  # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import solo_fast
            from solo_fast import ops
            m = torch.zeros(2, 4, 4, dtype=torch.bool); m[:, :2, :2] = True
            for _ in range(3):
                s, l, _, k = ops.matrix_nms(m, torch.tensor([0, 0]), torch.tensor([0.9, 0.5]))
            t = ops.center_region_assign(m.to(torch.uint8), torch.tensor([0, 1]), pad_shape=(4, 4),
                                         num_grids=[2], scale_ranges=[(1, 10)], num_classes=2, mask_stride=2)
        assert "cpu" not in ops.available_backends("matrix_nms", "cpu")
        msgs = [str(w.message) for w in caught if "solo_fast._C" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert abs(float(s[1]) - 0.5 * 2.718281828 ** -2) < 1e-6
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "SOLO_FAST_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_cli_predict_folder(tmp_path):
    import numpy as np
    from PIL import Image

    from solo_fast.cli import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        Image.fromarray((np.random.RandomState(i).rand(40, 60, 3) * 255).astype(np.uint8)).save(imgs / f"{i}.png")
    model = solo_fast.SOLO("solov2_light_r18_fpn", num_classes=2, min_size=64, max_size=96, num_grids=(6, 5, 4, 3, 2))
    ckpt = model.save_pretrained(str(tmp_path / "ckpt"))
    out = tmp_path / "out"
    assert main(["predict", str(imgs), "--checkpoint", ckpt, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0.png.png", "1.png.png", "results.json"]
    assert main(["predict", str(tmp_path / "nothing"), "--checkpoint", ckpt]) == 2


def _source_copy(dst):
    """A copy of the files git tracks or would track (not what it ignores) at ``dst``: an
    egg-info, build/ or _C*.so left in the checkout would otherwise supply its own file
    list, objects or extension."""
    # Untracked files that git does not ignore count: they are what the next commit holds.
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    for name in listed.stdout.splitlines():
        if (ROOT / name).is_file():
            (Path(dst) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, Path(dst) / name)
    return Path(dst)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist built from a copy of the source files (built once for the tests below)."""
    tmp = tmp_path_factory.mktemp("sdist")
    src = _source_copy(tmp / "src")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "dist")], cwd=src, check=True,
                   capture_output=True)
    (archive,) = (tmp / "dist").glob("*.tar.gz")
    return archive


def test_sdist_ships_every_extension_source(sdist):
    """The sdist holds every file under csrc/ (headers and CUDA sources included), so a
    wheel can be built from it; csrc/ is listed from the tree, not from setup.py."""
    import tarfile

    with tarfile.open(sdist) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu")}
    assert sources and sources <= shipped, sorted(sources - shipped)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler to build the wheel")
def test_wheel_built_from_the_sdist_imports_its_compiled_ops(sdist, tmp_path):
    """What a user installing from PyPI's sdist gets: a wheel built from the unpacked sdist
    (against the torch installed here, no build isolation), installed into a folder of its
    own and imported from outside the checkout, has a working solo_fast._C. The C++ build
    is the cost of this test: about 80 s of CPU (2.5 minutes on 2 cores shared with other
    work)."""
    import tarfile

    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "unpacked")
    (src,) = (tmp_path / "unpacked").iterdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                    "-w", str(tmp_path / "wheels"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheels").glob("solo_fast-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = textwrap.dedent("""
        import sys, torch, solo_fast
        from solo_fast import _ext, ops
        assert solo_fast.__file__.startswith(sys.argv[1]), solo_fast.__file__  # not the editable checkout
        assert _ext.available(), _ext._error
        m = torch.zeros(2, 4, 4, dtype=torch.bool); m[:, :2, :2] = True
        scores, labels, _, keep = ops.matrix_nms(m, torch.tensor([0, 0]), torch.tensor([0.9, 0.5]), backend="cpu")
        assert abs(float(scores[1]) - 0.5 * 2.718281828 ** -2) < 1e-6, scores
        print("ok")
    """)
    # The installed folder first on sys.path: it shadows the checkout's editable install (a
    # finder after sys.path); torch and the other dependencies come from this environment.
    env = {k: v for k, v in os.environ.items() if k not in ("SOLO_FAST_BACKEND", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def _run_setup(src, *args, env=None):
    """``setup.py args`` in ``src`` with torch not importable (as in an environment without it)."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', *sys.argv[1:]]; "
            "runpy.run_path('setup.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=src, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_build_without_torch_says_what_to_do(tmp_path):
    """Without torch the extension build stops with what is wrong and what to do (it used to
    install a pure-Python package silently); SOLO_FAST_NO_EXTENSION=1 asks for that package."""
    src = _source_copy(tmp_path / "src")
    out = _run_setup(src, "build_ext")
    assert out.returncode != 0
    assert "torch is not importable" in out.stderr and "--no-build-isolation" in out.stderr, out.stderr
    assert _run_setup(src, "-q", "build_ext", env={"SOLO_FAST_NO_EXTENSION": "1"}).returncode == 0
    out = _run_setup(src, "-q", "sdist", "-d", str(tmp_path / "dist"))  # an sdist compiles nothing
    assert out.returncode == 0, out.stderr


def test_old_setuptools_is_named_before_pyproject_is_read(tmp_path):
    """setuptools<77 cannot read pyproject.toml's SPDX license string; setup.py says so first."""
    src = _source_copy(tmp_path / "src")
    code = ("import runpy, sys, setuptools; setuptools.__version__ = '70.3.0'; sys.argv = ['setup.py', '--name']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "setuptools>=77" in out.stderr and "70.3.0" in out.stderr, out.stderr


def test_missing_extension_warning_names_the_cause(tmp_path):
    """A copy of the package without solo_fast._C (a pure-Python install) warns that it was
    built without the extension and how to build it, not Python's "cannot import name '_C'
    from partially initialized module 'solo_fast' (most likely due to a circular import)"."""
    pkg = tmp_path / "site" / "solo_fast"
    shutil.copytree(ROOT / "solo_fast", pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copytree(ROOT / "kernels", pkg / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent("""
        import sys, warnings
        # A checkout's editable install would find its own _C for the copy's solo_fast._C.
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import solo_fast
            from solo_fast import _ext
            assert solo_fast.__file__.startswith(sys.argv[1]) and not _ext.available()
        (msg,) = [str(w.message) for w in caught if "solo_fast._C" in str(w.message)]
        print(msg)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("SOLO_FAST_BACKEND", "PYTHONPATH")}
    env["PYTHONPATH"] = str(pkg.parent)
    out = subprocess.run([sys.executable, "-c", code, str(pkg.parent)], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "installed without its compiled extension" in out.stdout and "--no-build-isolation" in out.stdout, out.stdout
    assert "circular" not in out.stdout, out.stdout


def test_too_old_torch_is_refused_at_import():
    code = "import torch; torch.__version__ = '2.5.1+cpu'; import solo_fast"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "torch>=2.6" in out.stderr and "2.5.1+cpu" in out.stderr, out.stderr
