"""DESIGN.md §4's layering rule: modeling/ reaches the kernels only through solo_fast.ops."""
import ast
import pathlib

import pytest

MODELING = pathlib.Path(__file__).resolve().parents[1] / "solo_fast" / "modeling"
FORBIDDEN = ("_backend", "_C", "_ext", "kernels")  # module names modeling/ may not import


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            yield base, node.lineno
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


@pytest.mark.parametrize("path", sorted(MODELING.glob("*.py")), ids=lambda p: p.name)
def test_modeling_uses_ops_only(path):
    bad = [(name, line) for name, line in _imports(path)
           if any(part in FORBIDDEN for part in name.replace("..", ".").split("."))]
    assert not bad, f"{path.name} imports {bad}"
    assert "torch.ops" not in path.read_text(), f"{path.name} calls torch.ops directly"


def test_the_check_can_fail(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from .. import _backend\nfrom ..kernels import mask_predict\nimport solo_fast._C\n")
    names = [name for name, _ in _imports(bad)]
    assert "..._backend" in names or ".._backend" in names
    assert any("kernels" in n for n in names) and "solo_fast._C" in names
