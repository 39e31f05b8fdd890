"""Layers point one way, and no module imports itself back through others.

`core` <- `trainables` <- `analysis` <- `sweeps`: each package may import its own modules and
those of the packages to its left, never those to its right. Every import counts: module level,
inside functions, and under TYPE_CHECKING (a type-only upward import is still a dependency a
reader has to follow). Read from the source with `ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("core", "trainables", "analysis", "sweeps")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports (anywhere in it), resolved to module names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from core import storage` imports the module core.storage.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in LAYERS:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if rank[target.split(".")[0]] > rank[module.split(".")[0]]:
                bad.append(f"{module} imports {target}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_upward_import():
    assert upward_imports(_graph()) == []


def test_no_import_cycle():
    assert cycles(_graph()) == []


def test_every_layer_is_walked():
    graph = _graph()
    for layer in LAYERS:
        assert any(m.split(".")[0] == layer for m in graph), layer
    # The walker sees function-level and from-imports (the forms the old cycles hid in).
    assert "core.storage" in graph["core.experiment_folder"]
    assert "trainables.params" in graph["trainables.metrics"]


@pytest.mark.parametrize(
    "source, expected_upward, expected_cycle",
    [
        # Control: an upward import inside a function, and a two-module cycle, are both caught.
        ({"core/a.py": "def f():\n    from sweeps import b\n", "sweeps/b.py": ""}, ["core.a imports sweeps.b"], []),
        ({"trainables/x.py": "from trainables import y\n", "trainables/y.py": "import trainables.x\n"}, [], [["trainables.x", "trainables.y"]]),
        ({"analysis/p.py": "from trainables import q\n", "trainables/q.py": ""}, [], []),
    ],
)
def test_checker_catches_a_planted_violation(tmp_path, monkeypatch, source, expected_upward, expected_cycle):
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "__init__.py").write_text("")
    for name, text in source.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = _graph()
    assert upward_imports(graph) == expected_upward
    assert cycles(graph) == expected_cycle
