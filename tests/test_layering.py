"""The package import rules of docs/architecture.md, read from the source (the AST, so imports
inside functions count), and no module importing another module's private names.

| package            | may import (of ours)                                  |
|--------------------|-------------------------------------------------------|
| `distill`          | nothing                                               |
| `storage`          | `distill.checkpoint` (the checkpoint format) only     |
| `worker`           | `distill`, `storage`                                  |
| `results`          | `storage`                                             |
| `scheduler`        | `storage`, `worker`, `results`                        |
| `rollscan_testing` | `distill`, `storage`, `worker`, `scheduler`, `results` |
| `cli`              | everything                                            |
| `migrations`       | `storage`                                             |
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("distill", "storage", "worker", "results", "scheduler", "rollscan_testing", "cli",
        "migrations")  # fmt: skip
ALLOWED: dict[str, tuple[str, ...]] = {
    "distill": (),
    "storage": ("distill.checkpoint",),
    "worker": ("distill", "storage"),
    "results": ("storage",),
    # distill.progress: the progress lines of long work, which knows nothing of models
    "scheduler": ("storage", "worker", "results", "distill.progress"),
    "rollscan_testing": ("distill", "storage", "worker", "scheduler", "results"),
    "cli": OURS,
    "migrations": ("storage",),
}


def _modules(*folders: str) -> Iterator[tuple[str, Path]]:
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(p for p in parts if p != "__init__"), path


def _imports(path: Path, module: str) -> Iterator[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base, [alias.name for alias in node.names]


def _ours(name: str) -> bool:
    return name.split(".")[0] in OURS


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_its_layer_may(package: str) -> None:
    broken = []
    for module, path in _modules(package):
        for line, imported, names in _imports(path, module):
            targets = [imported] if not names else [imported, *(f"{imported}.{n}" for n in names)]
            if not _ours(imported) or _within(imported, (package,)):
                continue
            if not any(_within(t, ALLOWED[package]) for t in targets):
                broken.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not broken, (
        f"{package} may import {ALLOWED[package] or 'nothing of ours'}:\n" + "\n".join(broken)
    )


# Only code that sends work through Celery imports its tasks; the rest builds its worker context
# with `worker.runtime`. In cli/: the commands that send work (`connect.command_context`) and the
# demo, which runs the task code itself on the eager app.
CELERY_TASK_IMPORTERS = ("cli.connect", "cli.demo_command")


@pytest.mark.parametrize("package", ["scheduler", "results", "cli"])
def test_only_code_that_sends_work_imports_the_celery_tasks(package: str) -> None:
    broken = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for module, path in _modules(package)
        if module not in CELERY_TASK_IMPORTERS
        for line, imported, names in _imports(path, module)
        if _within(imported, ("worker.tasks",)) or (imported == "worker" and "tasks" in names)
    ]
    assert not broken, "take the worker context from worker.runtime:\n" + "\n".join(broken)


def test_no_module_imports_a_private_name_of_another() -> None:
    broken = []
    for module, path in _modules(*OURS, "tests", "bench"):
        for line, imported, names in _imports(path, module):
            if not _ours(imported) and imported.split(".")[0] not in ("tests", "fixtures"):
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__") and imported != module:
                    broken.append(f"{path.relative_to(ROOT)}:{line} imports {imported}.{name}")
            last = imported.rpartition(".")[2]
            if last.startswith("_") and not last.startswith("__"):
                broken.append(f"{path.relative_to(ROOT)}:{line} imports private module {imported}")
    assert not broken, "\n".join(broken)


def test_the_rules_see_every_package() -> None:
    """A new top-level package gets a row in ALLOWED (and in docs/architecture.md)."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages <= set(ALLOWED), f"no import rule for {sorted(packages - set(ALLOWED))}"
