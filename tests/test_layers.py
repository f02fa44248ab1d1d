"""The package's layers, read from the code's own imports (every import statement, at module
level or inside a function): the modules at the bottom import nothing above them, and no
module imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "flowpo"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every `import`/`from ... import` in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def _flowpo_imports(path: Path) -> set[str]:
    return {m for m, _ in _imports(path) if m == "flowpo" or m.startswith("flowpo.")}


@pytest.mark.parametrize(
    "module,allowed",
    [
        ("config.py", ()),  # checks against files and registries: trainer/preflight.py
        ("sde.py", ()),  # the step math under both the trainer and the kernels
        ("rewards/contract.py", ()),
        ("rewards/registry.py", ("flowpo.rewards.contract",)),  # built-ins named, not imported
    ],
)
def test_bottom_modules_import_nothing_above_them(module, allowed):
    assert _flowpo_imports(PKG / module) <= set(allowed)


def test_kernels_do_not_import_the_trainer():
    for path in sorted((PKG / "kernels").glob("*.py")):
        above = {m for m in _flowpo_imports(path) if m.startswith("flowpo.trainer")}
        assert not above, f"{path.name} imports {sorted(above)}"


def test_no_module_imports_another_modules_private_names():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        package = ".".join(path.relative_to(ROOT).parent.parts)
        for module, names in _imports(path):
            if module.startswith("flowpo") and module != package:  # own private modules: fine
                bad += [f"{path.relative_to(ROOT)}: {module}.{n}" for n in names if n[0] == "_"]
    assert not bad, sorted(set(bad))
