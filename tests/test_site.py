"""The documentation site: the rendered lessons are current, and the site builds strictly and opens in Chromium.

docs/render_lessons.py writes each notebook with its outputs to docs/lessons/; docs/check_site.py runs
``mkdocs build --strict`` and loads the home page and a lesson in headless Chromium, failing on any request that
got an error status. Chromium and the docs tools are installed by scripts/setup_dev.sh (the README's set-up).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_lessons = _load("render_lessons")


def test_rendered_lessons_are_current():
    problems = render_lessons.stale_lessons()
    assert not problems, "\n".join(problems) + "\nrun: python docs/render_lessons.py"


def test_every_notebook_has_a_rendered_lesson_in_the_site_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for path in render_lessons.notebook_paths():
        assert f"lessons/{path.stem}.md" in nav, f"mkdocs.yml's nav lacks lessons/{path.stem}.md"


def test_the_staleness_check_notices_an_edited_notebook(tmp_path, monkeypatch):
    notebooks = tmp_path / "notebooks"
    shutil.copytree(render_lessons.NOTEBOOKS, notebooks)
    monkeypatch.setattr(render_lessons, "NOTEBOOKS", notebooks)
    assert render_lessons.stale_lessons() == []  # an unchanged copy is current
    first = render_lessons.notebook_paths()[0]
    nb = json.loads(first.read_text(encoding="utf-8"))
    nb["cells"][0]["source"] = "# an edited title\n"
    first.write_text(json.dumps(nb), encoding="utf-8")
    problems = render_lessons.stale_lessons()
    assert len(problems) == 1 and first.name in problems[0] and "another version" in problems[0]


def test_site_builds_strictly_and_its_pages_load_in_chromium():
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, str(DOCS / "check_site.py")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("index.html:") and "none failed" in line for line in lines)
    assert any(line.startswith("lessons/") and "none failed" in line for line in lines)
    for shot in ("home.png", "lesson.png"):
        assert (ROOT / "build" / "site-screenshots" / shot).stat().st_size > 10_000


def test_the_browser_check_fails_on_a_missing_image(tmp_path):
    check_site = _load("check_site")
    site = tmp_path / "site"
    check_site.build(site)
    (site / "figures" / "dataflow.png").unlink()
    try:
        check_site.check_in_browser(site=site, shots=tmp_path / "shots")
    except SystemExit as exc:
        assert "figures/dataflow.png" in str(exc) and "404" in str(exc)
    else:
        raise AssertionError("a page with a missing image passed the browser check")
