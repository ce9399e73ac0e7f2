"""Packaging: the extension is built, kernels/ is installed as solo_fast.kernels, and
solo_fast degrades to the reference path (with one warning) when _C cannot be imported."""
import os
import subprocess
import sys
import textwrap

import solo_fast


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
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "results.json"]
    assert main(["predict", str(tmp_path / "nothing"), "--checkpoint", ckpt]) == 2


def test_sdist_ships_every_extension_source(tmp_path):
    """The sdist holds every file under csrc/ (headers and CUDA sources included), so a
    wheel can be built from it; csrc/ is listed from the tree, not from setup.py. Built
    from a copy of the git-tracked files: an egg-info left in the checkout would otherwise
    supply its own file list."""
    import shutil
    import tarfile
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    src = tmp_path / "src"
    for name in listed.stdout.splitlines():
        if (root / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, src / name)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src, check=True,
                   capture_output=True)
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    sources = {str(p.relative_to(root)) for p in (root / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu")}
    assert sources and sources <= shipped, sorted(sources - shipped)
