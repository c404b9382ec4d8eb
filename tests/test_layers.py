"""The package's import graph: no cycles, imports point down the layers, no lazy self-imports.

Read with `ast` (nothing is imported): every import of a `worldmodel` module counts, at module
level or inside a function. Layers, top to bottom: tasks -> train | eval | play -> world ->
pipeline -> build | export -> models -> data; `runtime`, `metrics`, `config` and `media` are
leaves any layer may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "worldmodel"
# A module under the key may not import a module under any of the values.
FORBIDDEN = {
    "models": ("train", "eval", "play", "pipeline", "tasks", "build", "world", "export", "bench"),
    "data": ("models", "train", "eval", "play", "pipeline", "tasks", "build", "world", "export"),
    "world": ("train", "eval", "play", "tasks", "bench"),
    "pipeline": ("train", "eval", "play", "tasks", "world", "bench"),
    "eval": ("train", "play", "tasks", "bench"),
    "play": ("train", "tasks", "bench"),
    "train": ("eval", "play", "tasks", "bench"),
}


# Reading and writing checkpoint files is not training: every layer may load a checkpoint.
SHARED = {"worldmodel.train", "worldmodel.train.checkpoint"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges between the package's modules, and the function-level self-imports."""
    files = {_module(p): p for p in sorted(SRC.rglob("*.py"))}

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in files}
    lazy = []
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        in_function = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                target = owner(name) if name.startswith("worldmodel") else None
                if target and target != mod:
                    edges[mod].add(target)
                    if id(node) in in_function:
                        lazy.append(f"{path.name}:{node.lineno} -> {target}")
    return edges, sorted(set(lazy))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return groups


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_the_package_has_no_import_cycle() -> None:
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_imports_point_down_the_layers() -> None:
    edges, _ = _graph()
    broken = [
        f"{src} -> {dst}"
        for src, targets in edges.items()
        for dst in targets
        if _layer(dst) in FORBIDDEN.get(_layer(src), ()) and dst not in SHARED
    ]
    assert broken == []


def test_no_function_level_import_of_the_package_dodges_a_cycle() -> None:
    _, lazy = _graph()
    assert lazy == []


def test_the_checks_catch_what_they_look_for() -> None:
    """The cycle finder and the layer rule on a made-up graph (so a green run means something)."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert "eval" in FORBIDDEN["models"] and _layer("worldmodel.models.lam") == "models"
