"""No import cycles among famex modules, found statically (every import statement, lazy ones included).

An import inside a function still makes a cycle: it only works because of the order in which
things happen to run, and it hides which module depends on which. Edges: ``import a.b`` and
``from a.b import c`` point at the module ``a.b.c`` when that is a module of the package, else at
``a.b``; parent packages that Python imports on the way are not edges (a package's ``__init__``
re-exporting its submodules is not a cycle with them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "famex"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name → file, for every .py file of the package."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, importer: str, is_package: bool, level: int) -> str:
    if not level:
        return name
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the famex modules its import statements name (anywhere in the file)."""
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", mod, is_package, node.level)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != mod)
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a path a → … → a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(comp, graph) for comp in components]


def _cycle_in(comp: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component without a cycle")


def test_no_import_cycles_in_famex():
    cycles = find_cycles(import_graph(module_files()))
    assert not cycles, "import cycles among famex modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("b_text", [
    "from pkg.a import f\n",                      # top-level from-import
    "def g():\n    import pkg.a\n",               # lazy import inside a function
    "from . import a\n",                          # relative import of a sibling module
    "if False:\n    from .a import f\n",          # TYPE_CHECKING-style guarded import
])
def test_finder_sees_a_cycle(tmp_path, b_text):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n", "pkg/b.py": b_text})
    cycles = find_cycles(import_graph(module_files(tmp_path, "pkg")))
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"]]


def test_finder_ignores_packages_reexporting_their_modules(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.sub.x import f\n",
        "pkg/sub/__init__.py": "from .x import f\n",
        "pkg/sub/x.py": "from pkg.sub.y import g\n",
        "pkg/sub/y.py": "import json\nfrom pkg.errors import E\n",
        "pkg/errors.py": "",
    })
    assert find_cycles(import_graph(module_files(tmp_path, "pkg"))) == []
