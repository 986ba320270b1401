"""Print the import graph of the kosmos2_ref modules, function-level imports included, and its cycles.

    python scripts/import_graph.py            # edges (module -> imported module, "lazy" when inside a function)
    python scripts/import_graph.py --cycles   # only the cycles; exit status 1 when there is one

A module's imports are read from its source with ``ast`` (nothing is imported). ``from . import x`` counts as an
import of the submodule ``x`` when there is one; an import of a package counts as one of its ``__init__``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "kosmos2_ref"


def module_names() -> dict[str, Path]:
    """Dotted name -> source file of every module of the package."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, bool]:
    """Imported package module -> True when every import of it is inside a function (lazy)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lazy_nodes = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    out: dict[str, bool] = {}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node, path.name == "__init__.py")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != module:
                out[t] = out.get(t, True) and id(node) in lazy_nodes
    return out


def cycles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return comps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", action="store_true", help="print only the cycles")
    args = parser.parse_args()
    modules = module_names()
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    # A package's __init__ is not a cycle with its own submodules: drop the edges from a submodule up to its package.
    for m in graph:
        for target in [t for t in graph[m] if m.startswith(t + ".")]:
            del graph[m][target]
    if not args.cycles:
        for m in sorted(graph):
            for t, lazy in sorted(graph[m].items()):
                print(f"{m} -> {t}{'  (lazy)' if lazy else ''}")
    found = cycles(graph)
    for comp in found:
        members = set(comp)
        edges = [f"{a} -> {b}{' (lazy)' if graph[a][b] else ''}" for a in comp for b in graph[a] if b in members]
        print("cycle:", ", ".join(comp))
        for e in edges:
            print("   ", e)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
