"""The package never imports torch or transformers (they are test-only dependencies)."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys


def test_import_does_not_pull_torch_or_transformers():
    code = (
        "import sys, kosmos2_ref, kosmos2_ref.model, kosmos2_ref.generation, kosmos2_ref.processing; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"kosmos2_ref imported {r.stdout.strip()} {r.stderr[-2000:]}"


def test_no_torch_import_in_source():
    root = pathlib.Path(__file__).resolve().parents[1] / "kosmos2_ref"
    pat = re.compile(r"^\s*(import|from)\s+(torch|transformers)\b", re.M)
    offenders = [str(p) for p in root.rglob("*.py") if pat.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_generation_depends_on_the_model_never_the_reverse():
    """One-way arrows: generation imports model and checks; model imports neither generation nor private names."""
    root = pathlib.Path(__file__).resolve().parents[1] / "kosmos2_ref"
    model = (root / "model.py").read_text(encoding="utf-8")
    assert not re.search(
        r"^\s*(from\s+\.+generation|import\s+kosmos2_ref\.generation|from\s+kosmos2_ref\.generation)", model, re.M
    )
    files = [root / "model.py", root / "checks.py", *sorted((root / "generation").glob("*.py"))]
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                offenders += [f"{path.relative_to(root)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert offenders == [], f"private names imported across modules: {offenders}"
