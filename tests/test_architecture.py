"""The layout tells the architecture: each third-party engine behind one module, and
lower layers never import upper ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "gridflow"

# module → layer; a module may import gridflow modules of its own layer or below.
LAYERS = {
    "errors": 0, "clock": 0, "events": 0,
    "calendar": 1, "yamlsrc": 1,
    "schema": 2, "registry": 2,
    "conditions": 3, "history": 3, "analysis": 4, "compiler": 4, "workflow": 4,
    "routing": 5, "scoring": 5,
    "policy": 6, "loader": 7, "handle": 7, "projection": 7, "store": 7,
    "engine": 8, "indicators": 9, "importer": 9, "generate": 9,
    "replay": 10, "report": 10, "shards": 10, "testing": 11, "strategies": 11,
    "cli": 12, "__main__": 13, "__init__": 13, "migrations": 8,
}
OWNERS = {
    "durable": {"compiler"},
    "durable_rules_engine": {"compiler"},
    "transitions": {"workflow"},
    "sqlalchemy": {"store", "migrations"},
    "alembic": {"store", "migrations"},
    "chinese_calendar": {"calendar"},
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).parts
        out.append((rel[0].removesuffix(".py"), path))
    return out


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "gridflow":
                names.update(f"gridflow.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize(("module", "path"), _modules(), ids=lambda v: str(v))
def test_third_party_engines_stay_behind_their_module(module: str, path: Path) -> None:
    for name in _imports(path):
        top = name.split(".")[0]
        if top in OWNERS:
            assert module in OWNERS[top], f"{path.name} imports {name}"


@pytest.mark.parametrize(("module", "path"), _modules(), ids=lambda v: str(v))
def test_lower_layers_never_import_upper_ones(module: str, path: Path) -> None:
    assert module in LAYERS, f"new module {module}: give it a layer in this test"
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] != "gridflow" or len(parts) < 2:
            continue
        target = parts[1]
        if target not in LAYERS or target == module:
            continue
        assert LAYERS[target] <= LAYERS[module], f"{module} imports {target}"
