"""Imports point one way: the stage packages of dvemb form no cycle, and the data package knows no model."""

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dvemb"
STAGES = {"capture", "store", "embed", "replay", "score", "eval", "curate", "data", "train", "models"}


def imports() -> dict[str, set[str]]:
    """stage package -> the other dvemb stage packages it imports (anywhere in its files)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for f in PKG.rglob("*.py"):
        top = f.relative_to(PKG).parts[0]
        if top not in STAGES:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                parts = name.split(".")
                if parts[0] == "dvemb" and len(parts) > 1 and parts[1] in STAGES and parts[1] != top:
                    graph[top].add(parts[1])
    return graph


def test_stage_packages_import_each_other_without_cycles():
    graph = imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for pkg in sorted(STAGES):
        if pkg not in state:
            visit(pkg, [pkg])


def test_data_knows_no_model():
    assert not imports()["data"] & {"models", "capture", "embed", "score", "replay", "train", "curate"}
    for f in (PKG / "data").rglob("*.py"):
        text = f.read_text()
        assert "dvemb.task" not in text and "dvemb.models" not in text, f
