"""Package boundaries: the control plane imports nothing from `dataplane/`.

Both planes share `schemas/` (wire formats, config entities, the snapshot, the catalog, the HTTP
edge) and `events/`; the CLI and launcher that start either plane live in `deploy/`. Imports are
read with `ast`, so one inside a function counts as much as one at the top of the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# package -> top-level packages it must not import
FORBIDDEN = {"controlplane": ("dataplane",), "schemas": ("controlplane", "dataplane")}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """`(line, module)` for every absolute import in the file (relative ones stay in the package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def crossings(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, module in imported_modules(path)
        if module.split(".")[0] in forbidden
    ]


@pytest.mark.parametrize("package", ["controlplane", "schemas"])
def test_package_imports_stay_inside_its_boundary(package: str) -> None:
    assert crossings(package, FORBIDDEN[package]) == []


def test_the_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from dataplane.http import read_body\n    import dataplane.snapshot\n")
    assert imported_modules(source) == [(2, "dataplane.http"), (3, "dataplane.snapshot")]
