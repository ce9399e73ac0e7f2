"""Every CUDA source of the extension compiles with nvcc for sm_80 and sm_90 without
register spills (DESIGN.md §5.3), even on a machine whose torch is a CPU build."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
ARCHS = ("80", "90")


def find_nvcc():
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = find_nvcc()


def test_there_are_cuda_sources():
    assert CU_FILES, "no .cu file under csrc/"


@pytest.mark.parametrize("cu", CU_FILES, ids=[str(p.relative_to(ROOT)) for p in CU_FILES])
def test_cu_includes_only_cuda_std_and_common_headers(cu):
    """Plain CUDA C++: no torch/ATen/c10 header, local headers only from csrc/common."""
    for line in cu.read_text().splitlines():
        m = re.match(r'\s*#\s*include\s*([<"])([^>"]+)[>"]', line)
        if not m:
            continue
        kind, name = m.groups()
        assert not re.match(r"(torch|ATen|c10|caffe2|pybind11|Python)\b", name), f"{cu.name}: {line.strip()}"
        if kind == '"':
            assert name.startswith("common/"), f"{cu.name}: local include outside csrc/common: {line.strip()}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or in /usr/local/cuda/bin")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", CU_FILES, ids=[str(p.relative_to(ROOT)) for p in CU_FILES])
def test_nvcc_compiles_without_spills(cu, arch, tmp_path):
    cmd = [
        NVCC, "-std=c++17", "-O3", f"-I{CSRC}",
        "-gencode", f"arch=compute_{arch},code=sm_{arch}",
        "-Xptxas", "-v", "-c", str(cu), "-o", str(tmp_path / "out.o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed:\n{log}"
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills, f"no ptxas report in the nvcc output:\n{log}"
    bad = [s for s in spills if s != ("0", "0")]
    assert not bad, f"register spills on sm_{arch}:\n{log}"
    assert "warning" not in log.lower(), f"nvcc warnings on sm_{arch}:\n{log}"
