#!/usr/bin/env python
"""Run each lesson in notebooks/ and write it, outputs and pictures included, to docs/lessons/ as Markdown.

    python docs/render_lessons.py            # execute every notebook and rewrite docs/lessons/
    python docs/render_lessons.py 03         # only the lessons whose file name starts with 03
    python docs/render_lessons.py --check    # exit 1 if a rendered lesson is stale (no execution; tests/test_docs.py)

The notebooks stay in the repository without outputs (their diffs stay readable); the rendered copies are what a
reader sees on the web or in the documentation site: every cell's source, its printed output, and its images
saved as PNG files under ``docs/lessons/figures/``.

"Current" means: the first line of each rendered lesson records the sha256 of what produced it — the notebook's
cells (and their tags), ``notebooks/_setup.py`` (which builds the checkpoint the lessons run on) and the packaged
miniature's weights (``kosmos2_ref/assets/mini/model.safetensors``, which lessons 01, 02, 04, 05 and 06 run on).
``--check`` recomputes it, so an edited notebook, a changed setup or retrained weights make the check fail until
the lessons are rendered again. The execution itself is tested by tests/test_notebooks.py.

Exercises: a cell tagged ``answer`` (cell metadata ``"tags": ["answer"]``; JupyterLab shows it collapsed when its
``jupyter.source_hidden`` / ``outputs_hidden`` are set) is rendered folded away, inside ``<details>`` with the
summary "Answer"; consecutive answer cells share one fold. Its code and output, the computed answer, are there
once the reader opens it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
NOTEBOOKS = ROOT / "notebooks"
LESSONS = DOCS / "lessons"
FIGURES = LESSONS / "figures"
STAMP = "<!-- rendered by docs/render_lessons.py from notebooks/{name}; inputs sha256 {digest} -->"
STAMP_RE = re.compile(r"<!-- rendered by docs/render_lessons.py from notebooks/(\S+); inputs sha256 ([0-9a-f]{64}) -->")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MINI_WEIGHTS = ROOT / "kosmos2_ref" / "assets" / "mini" / "model.safetensors"
ANSWER_TAG = "answer"


def notebook_paths(prefix: str | None = None) -> list[Path]:
    return [p for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) if prefix is None or p.name.startswith(prefix)]


def cell_tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def inputs_digest(path: Path) -> str:
    """sha256 over the notebook's cell types, tags and sources, notebooks/_setup.py and the miniature's weights."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    h = hashlib.sha256()
    for cell in nb["cells"]:
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        tags = ",".join(cell_tags(cell))
        h.update(cell["cell_type"].encode() + b"\0" + tags.encode() + b"\0" + source.encode("utf-8") + b"\0")
    h.update((NOTEBOOKS / "_setup.py").read_bytes())
    h.update(b"\0mini weights sha256 " + hashlib.sha256(MINI_WEIGHTS.read_bytes()).hexdigest().encode())
    return h.hexdigest()


def lesson_path(path: Path) -> Path:
    return LESSONS / (path.stem + ".md")


def execute(path: Path):
    """The notebook run top to bottom in a fresh kernel, from notebooks/ as a reader would run it."""
    import nbclient
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return nb


def fence(text: str, lang: str = "") -> str:
    """A fenced block that its own content cannot close (the fence is longer than any backtick run in it)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def relink_markdown(source: str) -> str:
    """Links in a notebook are relative to notebooks/; a link into docs/ must be relative to docs/lessons/."""
    return re.sub(r"(!?\[[^\]]*\])\(\.\./docs/([^)\s]+)\)", r"\1(../\2)", source)


def render_outputs(outputs, stem: str, counter: list[int]) -> list[str]:
    parts = []
    for out in outputs:
        kind = out["output_type"]
        if kind == "stream":
            parts.append(fence(ANSI.sub("", out["text"]), "text"))
        elif kind in ("execute_result", "display_data"):
            data = out["data"]
            if "image/png" in data:
                counter[0] += 1
                name = f"{stem}_{counter[0]:02d}.png"
                (FIGURES / name).write_bytes(base64.b64decode(data["image/png"]))
                parts.append(f"![output {counter[0]} of {stem}](figures/{name})")
            elif "text/markdown" in data:
                parts.append(data["text/markdown"])
            elif "text/plain" in data:
                parts.append(fence(ANSI.sub("", data["text/plain"]), "text"))
        elif kind == "error":
            raise RuntimeError(f"{stem}: a cell raised {out['ename']}: {out['evalue']}")
    return parts


def render(path: Path) -> Path:
    """Execute one notebook and write its Markdown page and figures."""
    nb = execute(path)
    FIGURES.mkdir(parents=True, exist_ok=True)
    for old in FIGURES.glob(f"{path.stem}_*.png"):
        old.unlink()
    parts = [
        STAMP.format(name=path.name, digest=inputs_digest(path)),
        f"<!-- do not edit: edit notebooks/{path.name} and run python docs/render_lessons.py -->",
    ]
    counter = [0]
    folded = False  # inside an answer's <details>
    for cell in nb.cells:
        is_answer = ANSWER_TAG in cell_tags(cell)
        if is_answer and not folded:
            parts.append('<details markdown="1"><summary>Answer</summary>')
        elif folded and not is_answer:
            parts.append("</details>")
        folded = is_answer
        if cell.cell_type == "markdown":
            parts.append(relink_markdown(cell.source))
        elif cell.cell_type == "code" and cell.source.strip():
            parts.append(fence(cell.source, "python"))
            parts.extend(render_outputs(cell.get("outputs", []), path.stem, counter))
    if folded:
        parts.append("</details>")
    parts.append(f"*Rendered from `notebooks/{path.name}`; run it yourself with `jupyter lab notebooks/{path.name}`.*")
    target = lesson_path(path)
    target.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return target


def stale_lessons() -> list[str]:
    """What --check reports: lessons missing, rendered from other inputs, or pointing at missing figures."""
    problems = []
    for path in notebook_paths():
        target = lesson_path(path)
        if not target.is_file():
            problems.append(f"{target.relative_to(ROOT)} is missing")
            continue
        text = target.read_text(encoding="utf-8")
        m = STAMP_RE.match(text)
        if not m or m.group(1) != path.name:
            problems.append(f"{target.relative_to(ROOT)} has no render stamp for {path.name}")
        elif m.group(2) != inputs_digest(path):
            problems.append(
                f"{target.relative_to(ROOT)} was rendered from another version of {path.name} or notebooks/_setup.py"
            )
        for fig in re.findall(r"\]\((figures/[^)]+)\)", text):
            if not (LESSONS / fig).is_file():
                problems.append(f"{target.relative_to(ROOT)} shows {fig}, which does not exist")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prefix", nargs="?", help="render only the notebooks whose name starts with this")
    ap.add_argument("--check", action="store_true", help="report stale lessons without executing anything")
    args = ap.parse_args(argv)
    if args.check:
        problems = stale_lessons()
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("run: python docs/render_lessons.py", file=sys.stderr)
        return 1 if problems else 0
    paths = notebook_paths(args.prefix)
    if not paths:
        ap.error(f"no notebook in notebooks/ starts with {args.prefix!r}")
    for path in paths:
        print(f"rendered {render(path).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
