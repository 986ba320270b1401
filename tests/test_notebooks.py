"""The lessons in notebooks/ run top to bottom, and are stored without outputs.

Each notebook is executed by nbclient in a fresh ``python3`` kernel (ipykernel's kernel for the interpreter running
the tests), with notebooks/ as the working directory, exactly as a reader would run it. The notebooks build their
own tiny random checkpoint (notebooks/_setup.py) and assert the numbers they teach, so a failing cell fails here.
Set ``KOSMOS2_WEIGHTS`` to a checkpoint folder to run them on the real model instead (minutes, not seconds).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5, f"expected the five lessons in {NOTEBOOKS_DIR}, found {[p.name for p in NOTEBOOKS]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    """Outputs are not committed: the diffs stay readable and the run test is the only source of results."""
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "assert " in code, f"{path.name} asserts nothing it teaches"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}
    )
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}", pytrace=False)
    print(f"\n{path.name}: ran in {time.perf_counter() - start:.1f} s")
