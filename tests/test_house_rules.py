"""The house rules of the package, kept by a test (docs/architecture.md, "House rules").

* Arrows one way: every ``kosmos2_ref`` module has a layer, and a module imports only from layers below its own
  (function-level imports included), so the import graph has no cycle and the model never depends on the
  application built on it.
* No private name (``_x``) is imported from another module.
* No function body over ``MAX_FUNCTION_LINES`` lines (signature and docstring not counted) unless a comment
  right above its ``def`` says why (``# Long on purpose: …``).
* In the model files, every line that changes an array's shape says the shape it makes, in a comment.
* ruff (configured in pyproject.toml) finds nothing to report, and the formatted files are formatted.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kosmos2_ref"
MAX_FUNCTION_LINES = 60

# The layers, bottom first (docs/architecture.md, "The package in layers"). A module imports only from its own
# layer and the layers before it; within a layer the cycle test keeps the arrows one way.
LAYERS = [
    ("foundations", ["version", "checks", "files", "backend", "storage", "machine"]),
    ("storage", ["config", "torch_pickle", "weights", "hub"]),
    ("primitives", ["layers"]),
    ("fast primitives", ["fused", "fast"]),
    ("the switch", ["primitives"]),
    ("stages", ["cache", "vision", "connector", "decoder"]),
    ("model", ["model"]),
    ("generation", ["generation"]),
    ("processing", ["processing"]),
    ("tasks", ["tasks", "confidence", "draw", "world"]),
    ("jobs", ["jobs", "service", "convert", "demo"]),
    ("front ends", ["ray_jobs", "server", "cli", "__main__"]),
    ("package", ["__init__"]),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The kosmos2_ref modules ``path`` imports anywhere in it (functions included), resolved to module names."""
    name = module_name(path)
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kosmos2_ref")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - (node.level - 1)]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kosmos2_ref":
                continue
            for a in node.names:  # `from . import jobs` imports the module jobs
                sub = f"{target}.{a.name}"
                found.add(sub if sub in modules else target)
    found.discard(name)
    return {m for m in found if m in modules}


def private_imports(path: Path) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("kosmos2_ref")):
            bad += [
                f"{module_name(path)}: from {'.' * node.level}{node.module or ''} import {a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    return bad


def layer_of(module: str) -> int:
    parts = module.split(".")[1:] or ["__init__"]
    for i, (_, names) in enumerate(LAYERS):
        if parts[0] in names:
            return i
    raise AssertionError(f"{module} has no layer in tests/test_house_rules.py LAYERS: give it one")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycle_in_the_package():
    modules = package_modules()
    graph = {m: imports_of(p, modules) for m, p in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges, no cycle")


def test_imports_point_down_the_layers():
    modules = package_modules()
    wrong = []
    for m, p in modules.items():
        for n in imports_of(p, modules):
            if layer_of(n) > layer_of(m):
                wrong.append(f"{m} ({LAYERS[layer_of(m)][0]}) imports {n} ({LAYERS[layer_of(n)][0]})")
    assert not wrong, "imports that point up or across the layers:\n" + "\n".join(wrong)


def test_no_private_name_crosses_modules():
    bad = [b for p in package_modules().values() for b in private_imports(p)]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def _has_docstring(node) -> bool:
    first = node.body[0] if node.body else None
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def long_functions(path: Path) -> list[tuple[int, str, bool]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body[1:] if _has_docstring(node) else node.body
        length = node.end_lineno - body[0].lineno + 1 if body else 0  # the body: no signature, no docstring
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        reason = first >= 2 and lines[first - 2].strip().startswith("# Long on purpose:")
        out.append((length, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", reason))
    return out


def test_no_long_function_without_a_stated_reason():
    rows = sorted((r for p in PACKAGE.rglob("*.py") for r in long_functions(p)), reverse=True)
    print("longest functions (lines of the body, without signature and docstring):")
    for length, where, reason in rows[:8]:
        print(f"  {length:4d}  {where}{'  (long on purpose)' if reason else ''}")
    over = [f"{where}: {length} lines" for length, where, reason in rows if length > MAX_FUNCTION_LINES and not reason]
    assert not over, (
        f"functions over {MAX_FUNCTION_LINES} lines with no '# Long on purpose: …' comment above "
        "them:\n" + "\n".join(over)
    )


MODEL_FILES = ["layers.py", "fast.py", "vision.py", "connector.py", "decoder.py", "cache.py", "model.py"]
SHAPE_CHANGE = re.compile(
    r"\.reshape\(|\.transpose\(|\.swapaxes\(|\bsplit_heads\(|\bmerge_heads\(|"
    r"\bconcatenate\(|\.stack\(|\bexpand_dims\(|\bbroadcast_to\(|\[:, None\]|\[None\]"
)
SHAPE_NOTE = re.compile(r"\[[^\]]*\]|->|→")


def unexplained_shape_changes(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    bad = []
    for i, line in enumerate(lines):
        code, _, comment = line.partition("#")
        if not SHAPE_CHANGE.search(code) or code.lstrip().startswith(("def ", "return (", '"', "'")):
            continue
        prev = lines[i - 1].strip() if i else ""
        if SHAPE_NOTE.search(comment) or (prev.startswith("#") and SHAPE_NOTE.search(prev)):
            continue
        bad.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    return bad


def test_model_files_say_each_shape_they_make():
    files = [PACKAGE / f for f in MODEL_FILES if (PACKAGE / f).is_file()]
    assert len(files) >= 5, f"the model files moved: update MODEL_FILES ({MODEL_FILES})"
    bad = [b for f in files for b in unexplained_shape_changes(f)]
    assert not bad, "lines that change a shape without a shape comment:\n" + "\n".join(bad)


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(exe).exists() and not shutil.which(exe):
        pytest.fail("ruff is not installed: it is in the dev extra (pip install -e '.[dev]')")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    r = ruff("check", ".")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def test_ruff_format_leaves_files_as_they_are():
    r = ruff("format", "--check", ".")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
