"""The house's layers point one way: pipeline/ never imports train/, and no module imports
itself back through others (imports inside functions count: they only defer the circle)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGES = ("pipeline", "train")


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, name: str) -> set[str]:
    """Every module `path` imports, at the top or inside a function, as dotted names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package up `level - 1` steps
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import mod`
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports(path, name) if m in mods and m != name}
            for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_is_read_from_the_sources():
    edges = graph()
    assert "pipeline.loader_base" in edges["pipeline.torch_loader"]
    assert "pipeline.torch_loader" in edges["pipeline.loader"]
    assert "pipeline.loader" in edges["train.fit"]
    assert "train.models.registry" in edges["train.models"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_pipeline_never_imports_train():
    reaching_up = {name: sorted(m for m in imports(path, name) if m.split(".")[0] == "train")
                   for name, path in modules().items() if name.startswith("pipeline")}
    assert {k: v for k, v in reaching_up.items() if v} == {}


def test_no_module_imports_itself_back():
    assert cycles(graph()) == []


def test_no_test_module_imports_another():
    """What tests share is in tests/helpers.py (or conftest.py's fixtures): importing a test
    module would collect its tests twice and tie the two files together."""
    tests = {p.stem for p in (REPO / "tests").glob("test_*.py")}
    found = {p.name: sorted(imports(p, f"tests.{p.stem}") & tests)
             for p in sorted((REPO / "tests").glob("*.py"))}
    assert not {k: v for k, v in found.items() if v}


def floors(edges: dict[str, set[str]]) -> dict[int, list[str]]:
    """The house drawn from its imports: each module on the floor one above the highest of
    the project's modules it imports (floor 0 imports none of them)."""
    memo: dict[str, int] = {}

    def floor(name: str) -> int:
        if name not in memo:
            below = [d for d in edges[name] if d in edges and d != name]
            memo[name] = 1 + max(map(floor, below)) if below else 0
        return memo[name]

    found: dict[int, list[str]] = {}
    for name in sorted(edges):
        found.setdefault(floor(name), []).append(name)
    return dict(sorted(found.items()))


def test_the_loader_stands_above_what_it_reads_and_the_trainer_above_the_loader():
    level = {m: k for k, names in floors(graph()).items() for m in names}
    assert level["pipeline.shards"] < level["pipeline.sampling"] < level["pipeline.loader"]
    assert level["pipeline.loader"] < level["train.fit"] < level["train.cli"]


if __name__ == "__main__":  # python tests/test_layers.py: docs/design.md's drawing, fresh
    for k, names in floors(graph()).items():
        print(k, " ".join(names))
