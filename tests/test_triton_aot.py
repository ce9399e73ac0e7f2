"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 without register spills
(DESIGN.md §5.2), on a machine with no GPU.

Each module of kernels/ that defines ``aot_specs()`` returns a list of dicts::

    {"fn": jit_fn, "signature": {arg: "*fp16" | "i32" | ... | "constexpr"},
     "constexprs": {arg: value}, "num_warps": int, "num_stages": int,
     "tensor_cores": bool (optional: the PTX must contain mma / wgmma),
     "attrs": {arg: [["tt.divisibility", 16]]} (optional: what a real launch specialises on)}

covering every autotune config. Compilation runs in a subprocess: the test session sets
TRITON_INTERPRET=1 (tests/conftest.py), under which ``@triton.jit`` yields interpreter
functions that cannot be compiled. The PTX goes through the bundled
``ptxas-blackwell`` (Triton 3.9's PTX is too new for the plain bundled ``ptxas``).
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "kernels"
ARCHS = {80: "sm_80", 90: "sm_90a"}
MODULES = sorted(
    p.stem for p in KERNEL_DIR.glob("*.py") if p.stem != "__init__" and "def aot_specs" in p.read_text()
)


def _find_ptxas():
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        p = bindir / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


# --------------------------------------------------------------------------------------
# Worker (runs in the subprocess, without the interpreter)
# --------------------------------------------------------------------------------------
def _unwrap(fn):
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn") and seen < 8:
        fn, seen = fn.fn, seen + 1  # Autotuner / Heuristics wrap the JITFunction
    return fn


def _compile(spec, cap):
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _unwrap(spec["fn"])
    consts = dict(spec.get("constexprs", {}))
    sig = dict(spec["signature"])
    for name in consts:
        sig.setdefault(name, "constexpr")
    names = list(fn.arg_names)
    sig = {k: sig[k] for k in names if k in sig}
    attrs = {(names.index(k) if isinstance(k, str) else k[0],): v for k, v in spec.get("attrs", {}).items()}
    try:
        src = triton.compiler.ASTSource(fn, sig, consts, attrs)
    except TypeError:  # older ASTSource signatures
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)


def _ptxas_report(ptxas, ptx, arch):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", "--gpu-name", arch, path, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    out = r.stdout + r.stderr
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", out)]
    spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)]
    return r.returncode, out, regs, spills


def _worker(module, cap):
    import importlib

    ptxas = _find_ptxas()
    mod = importlib.import_module(f"solo_fast.kernels.{module}")
    for i, spec in enumerate(mod.aot_specs()):
        row = {
            "index": i,
            "kernel": getattr(_unwrap(spec["fn"]), "__name__", "?"),
            "constexprs": {k: str(v) for k, v in spec.get("constexprs", {}).items()},
            "num_warps": spec.get("num_warps", 4),
            "num_stages": spec.get("num_stages", 3),
            "tensor_cores": bool(spec.get("tensor_cores", False)),
        }
        try:
            ptx = _compile(spec, cap).asm["ptx"]
            rc, out, regs, spills = _ptxas_report(ptxas, ptx, ARCHS[cap])
            row.update(
                ptxas_rc=rc, registers=max(regs) if regs else None,
                spill_stores=sum(s for s, _ in spills), spill_loads=sum(lo for _, lo in spills),
                mma=bool(re.search(r"\bmma\.", ptx)), wgmma=bool(re.search(r"\bwgmma\.", ptx)),
                ptxas_tail=out[-600:] if rc else "",
            )
        except Exception as exc:  # reported (and failed) by the parent test
            row["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
        print("AOT " + json.dumps(row), flush=True)


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------
def test_kernel_modules_declare_specs():
    assert MODULES, "no module in kernels/ defines aot_specs()"


@pytest.mark.slow
@pytest.mark.parametrize("cap", sorted(ARCHS))
@pytest.mark.parametrize("module", MODULES)
def test_compiles_without_spills(module, cap):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    ptxas = _find_ptxas()
    if ptxas is None:
        pytest.skip("no bundled ptxas (triton/backends/nvidia/bin/ptxas-blackwell or ptxas)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__, module, str(cap)], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=1200)
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("AOT ")]
    assert proc.returncode == 0 and rows, f"worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    problems = []
    for r in rows:
        what = f"{module}.{r['kernel']} #{r['index']} {r['constexprs']} w{r['num_warps']} s{r['num_stages']} {ARCHS[cap]}"
        print(f"{what}: registers {r.get('registers')}, spill stores {r.get('spill_stores')}, "
              f"spill loads {r.get('spill_loads')}, mma {r.get('mma')}, wgmma {r.get('wgmma')}")
        if "error" in r:
            problems.append(f"{what}: compile error {r['error']}")
            continue
        if r["ptxas_rc"] != 0:
            problems.append(f"{what}: ptxas failed: {r['ptxas_tail']}")
            continue
        if r["registers"] is None:
            problems.append(f"{what}: no register count in the ptxas output")
        if r["spill_stores"] or r["spill_loads"]:
            problems.append(f"{what}: spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded")
        if r["tensor_cores"]:
            if cap == 80 and not r["mma"]:
                problems.append(f"{what}: declares tensor cores but the sm_80 PTX has no mma")
            if cap == 90 and not (r["mma"] or r["wgmma"]):
                problems.append(f"{what}: declares tensor cores but the sm_90a PTX has neither wgmma nor mma")
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
