"""Every module and every public class of the source packages says what it is for."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "storage", "worker", "scheduler", "results", "cli", "rollscan_testing")


def _undocumented(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    where = path.relative_to(ROOT)
    missing = [] if ast.get_docstring(tree) else [f"{where}: the module"]
    # public: reachable by name from the module (its classes and theirs, not a function's)
    todo = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    while todo:
        node = todo.pop()
        if node.name.startswith("_"):
            continue
        if not ast.get_docstring(node):
            missing.append(f"{where}:{node.lineno}: class {node.name}")
        todo += [child for child in node.body if isinstance(child, ast.ClassDef)]
    return sorted(missing)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_and_public_class_has_a_docstring(package: str) -> None:
    missing = [m for path in sorted((ROOT / package).rglob("*.py")) for m in _undocumented(path)]
    assert not missing, "no docstring:\n" + "\n".join(missing)
