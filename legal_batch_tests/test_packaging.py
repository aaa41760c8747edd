"""What a fresh install and a test run can rely on: every library the package imports is declared
in `pyproject.toml`, and no test skips when something it needs fails to import (it fails)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

from legal_batch_tests.conftest import ROOT

SKIPS = {"skip", "skipif", "importorskip"}


def _modules(folder: Path) -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(folder.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_library_the_package_imports_is_a_declared_dependency() -> None:
    declared = {_normalized(re.match(r"[A-Za-z0-9._-]+", req).group())  # type: ignore[union-attr]
                for req in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    imported: dict[str, Path] = {}
    for path, tree in _modules(ROOT / "legal_batch"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                imported.setdefault(name.partition(".")[0], path)
    providers = importlib.metadata.packages_distributions()
    undeclared = {
        top: f"{path.relative_to(ROOT)} imports {top!r} (from {', '.join(providers.get(top, ['?']))})"
        for top, path in sorted(imported.items())
        if top not in sys.stdlib_module_names and top not in {"__future__", "legal_batch"}
        and not {_normalized(dist) for dist in providers.get(top, [])} & declared
    }
    assert not undeclared, "not in [project] dependencies:\n" + "\n".join(undeclared.values())


def test_no_test_skips_instead_of_failing() -> None:
    skips = []
    for path, tree in _modules(ROOT / "legal_batch_tests"):
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr in SKIPS):
                continue
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id == "pytest":
                skips.append(f"{path.relative_to(ROOT)}:{node.lineno}: pytest...{node.attr}")
    assert not skips, "a suite that cannot run must fail, not skip:\n" + "\n".join(skips)
