"""Lower layers never import upper ones: rules (maths) <- optim (shell) <- everything else."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gradsynth"
ORDER = ["rules", "optim"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_lower_layers_do_not_import_upper_ones():
    for rank, layer in enumerate(ORDER):
        upper = [f"gradsynth.{name}" for name in ORDER[rank + 1 :]]
        for path in (PACKAGE / layer).glob("*.py"):
            bad = [m for m in _imports(path) if any(m == u or m.startswith(u + ".") for u in upper)]
            assert not bad, f"{path.name} in gradsynth/{layer} imports {bad}"


def test_core_depends_on_torch_only():
    allowed_roots = {"torch", "gradsynth", "__future__"}
    for path in PACKAGE.rglob("*.py"):
        for module in _imports(path):
            root = module.split(".")[0]
            import sys

            assert root in allowed_roots or root in sys.stdlib_module_names, f"{path}: imports {module}"
