"""The dependency rule of docs/ARCHITECTURE.md: sagan/ never imports ray, mlflow, pipelines or
infra; pipelines/ never imports infra. Static (the sources are parsed, nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"sagan": {"ray", "mlflow", "pipelines", "infra"}, "pipelines": {"infra"}}


def _imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_imports_point_one_way(room: str) -> None:
    files = sorted((ROOT / room).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(ROOT)): sorted(_imported_packages(f) & FORBIDDEN[room])
           for f in files}
    assert not {f: pkgs for f, pkgs in bad.items() if pkgs}
