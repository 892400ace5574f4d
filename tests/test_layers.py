"""Lower layers never import upper ones, and the core needs nothing but torch.

Tiers, lowest first: rules (maths) <- optim (shell) <- integrations (HF, distributed) <- the
unlearning toolkit and the command line.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gradsynth"
TIERS = [["rules"], ["optim"], ["integrations"], ["unlearning", "world", "cli"]]
CORE = ["rules", "optim"]
#: Modules at the package root below every tier: they import the standard library only, and any
#: layer may use them (gradsynth.owned_files: the ownership checks of the kernel and world caches;
#: gradsynth.allocator: keeping freed memory, which the command line turns on).
FOUNDATION = ["gradsynth.owned_files", "gradsynth.allocator"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _is_under(module: str, packages: list[str]) -> bool:
    return any(module == f"gradsynth.{p}" or module.startswith(f"gradsynth.{p}.") for p in packages)


def test_every_subpackage_has_a_tier():
    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    tiered = {name for tier in TIERS for name in tier}
    assert subpackages <= tiered, f"add {sorted(subpackages - tiered)} to TIERS"


def test_lower_layers_do_not_import_upper_ones():
    for rank, tier in enumerate(TIERS):
        upper = [name for higher in TIERS[rank + 1 :] for name in higher]
        for layer in tier:
            for path in (PACKAGE / layer).rglob("*.py"):
                bad = [m for m in _imports(path) if _is_under(m, upper)]
                assert not bad, f"{path.relative_to(PACKAGE)} imports {bad} from a higher layer"


def test_core_depends_on_torch_only():
    allowed_roots = {"torch", "gradsynth", "__future__"}
    core_files = [PACKAGE / "__init__.py"] + [p for layer in CORE for p in (PACKAGE / layer).rglob("*.py")]
    for path in core_files:
        for module in _imports(path):
            root = module.split(".")[0]
            assert root in allowed_roots or root in sys.stdlib_module_names, f"{path}: imports {module}"
            if root == "gradsynth":
                allowed = _is_under(module, CORE) or module in ("gradsynth", *FOUNDATION)
                assert allowed, f"{path}: imports {module}"


def test_foundation_modules_import_the_standard_library_only():
    for name in FOUNDATION:
        path = PACKAGE / f"{name.removeprefix('gradsynth.')}.py"
        for module in _imports(path):
            root = module.split(".")[0]
            assert root == "__future__" or root in sys.stdlib_module_names, f"{path}: imports {module}"


def test_integrations_package_imports_no_third_party_module():
    """``import gradsynth.integrations`` works without transformers: each module imports its own."""
    for module in _imports(PACKAGE / "integrations" / "__init__.py"):
        root = module.split(".")[0]
        assert root in {"gradsynth", "__future__"} or root in sys.stdlib_module_names, module
