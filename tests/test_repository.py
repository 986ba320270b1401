"""The repository stands alone: a clone with nothing beside it has every file its tests, notebooks and docs read.

Four checks: no tracked file names a path outside the repository; every reference to the numerics reference
(docs/numerics.md) names a section it has, and none points at a document that is not in the repository; the shipped
third-party data is the data its provenance table describes (sha256); and a copy of the tracked files, put in an
empty folder, runs the tests that read the real data there.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import fixtures_tokenizer as ft

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".toml", ".json", ".txt", ".cfg", ".ini", ".yml", ".yaml", ".sh", ""}

# Written in two pieces so that this file does not match itself.
OUTSIDE_PATTERNS = [
    re.compile(r"\.\./" + r"shared"),
    re.compile(r"/work/" + r"shared"),
    re.compile(r"shared/" + r"data"),
    re.compile(r"KOSMOS2_" + r"SHARED"),
    re.compile(r"parents\[1\]\.parent"),
]


def tracked_files() -> list[Path]:
    """The files git tracks (every file but the ignored ones when there is no git checkout)."""
    if (REPO / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        return [REPO / name for name in out.decode().split("\0") if name and (REPO / name).is_file()]
    skip = {".venv", ".git", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist"}
    return [p for p in REPO.rglob("*") if p.is_file() and not skip.intersection(p.relative_to(REPO).parts)]


def test_no_tracked_file_reads_outside_the_repository():
    hits = []
    for path in tracked_files():
        if path.suffix not in TEXT_SUFFIXES and path.name not in {"run"}:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for pattern in OUTSIDE_PATTERNS:
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{path.relative_to(REPO)}:{line}: {m.group(0)}")
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


# Documents the project was once built from, which are not in the repository (in pieces, as above).
ABSENT_DOCUMENT_PATTERNS = [
    re.compile(r"spec" + r"\s*\(?§", re.IGNORECASE),  # the word, then a section sign (any case)
    re.compile(r"DESIGN" + r"\.md"),
    re.compile(r"KOSMOS2_" + r"SPEC"),
]
NUMERICS = REPO / "docs" / "numerics.md"
SECTION = r"§(\d+(?:\.\d+)?)"
# "docs/numerics.md §6.2", "`docs/numerics.md` §7.3", "docs/numerics.md §10.3 and §11", "numerics.md §9, §10.2"
SECTION_REFS = re.compile(r"numerics\.md`?\s+§\d+(?:\.\d+)?(?:(?:,\s*|,?\s+(?:and|or)\s+)§\d+(?:\.\d+)?)*")
# "(numerics.md#62-sinusoidal-positions-with-the-padding-offset)", or "(#9-token-layout)" inside numerics.md
ANCHOR_LINKS = re.compile(r"\[([^\]]*)\]\((?:[^)\s#]*numerics\.md)?#([\w-]+)\)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def numerics_sections() -> dict[str, str]:
    """Section number ("6", "6.2") -> anchor, for every numbered heading of docs/numerics.md."""
    sections = {}
    for line in NUMERICS.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{2,3} (\d+(?:\.\d+)?)\.? \S", line)
        if m:
            sections[m.group(1)] = github_anchor(line.lstrip("#"))
    return sections


def test_numerics_reference_has_numbered_sections():
    sections = numerics_sections()
    assert {"2", "4.3", "5", "6.2", "7.3", "8", "9", "10.1", "11.4", "12", "13", "14"} <= set(sections)
    anchors = list(sections.values())
    assert len(anchors) == len(set(anchors)), "two sections of docs/numerics.md share an anchor"
    assert sections["9"] == "9-token-layout"


def _line(path: Path, text: str, pos: int) -> str:
    return f"{path.relative_to(REPO)}:{text.count(chr(10), 0, pos) + 1}"


def test_references_to_numerics_md_name_existing_sections():
    sections = numerics_sections()
    bad, seen = [], 0
    for path in tracked_files():
        if path.suffix not in TEXT_SUFFIXES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in SECTION_REFS.finditer(text):
            for number in re.findall(SECTION, m.group(0)):
                seen += 1
                if number not in sections:
                    bad.append(f"{_line(path, text, m.start())}: {m.group(0)!r} has no section {number}")
        for m in ANCHOR_LINKS.finditer(text):
            if "numerics.md#" not in m.group(0) and path != NUMERICS:
                continue  # "(#…)" on another page is that page's own anchor
            seen += 1
            label, anchor = m.groups()
            if anchor not in sections.values():
                bad.append(f"{_line(path, text, m.start())}: #{anchor} is no heading of docs/numerics.md")
            for number in re.findall(SECTION, label):  # "[numerics.md §6.2](…#62-…)": label and anchor agree
                if sections.get(number) != anchor:
                    bad.append(f"{_line(path, text, m.start())}: the label says §{number}, the link #{anchor}")
        if path == NUMERICS:  # its own "(§6.2)" cross-references
            for m in re.finditer(SECTION, text):
                seen += 1
                if m.group(1) not in sections:
                    bad.append(f"{_line(path, text, m.start())}: §{m.group(1)} is no section")
    assert not bad, "references to missing sections of docs/numerics.md:\n" + "\n".join(bad)
    assert seen > 100, f"only {seen} references to docs/numerics.md found: do the patterns still match them?"


def test_no_tracked_file_cites_a_document_outside_the_repository():
    hits = []
    for path in tracked_files():
        if path.suffix not in TEXT_SUFFIXES and path.name not in {"run"}:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for pattern in ABSENT_DOCUMENT_PATTERNS:
            hits += [f"{_line(path, text, m.start())}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not hits, "references to documents that are not in the repository (use docs/numerics.md):\n" + "\n".join(
        hits
    )


def test_data_paths_lie_inside_the_repository():
    for path in (ft.REAL_SPM_MODEL, ft.IMAGES, ft.TEST_DATA):
        assert path.exists(), path
        assert path.resolve().is_relative_to(REPO), f"{path} is outside {REPO}"


def provenance_rows(table: Path) -> list[tuple[str, int, str]]:
    """(file, bytes, sha256) for each row of a provenance table whose cells hold a size and a sha256."""
    rows = []
    for line in table.read_text(encoding="utf-8").splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        sha = [c for c in cells if re.fullmatch(r"[0-9a-f]{64}", c)]
        size = [c for c in cells if re.fullmatch(r"\d+", c)]
        if sha and size:
            rows.append((cells[0], int(size[0]), sha[0]))
    return rows


def test_test_data_matches_its_provenance():
    rows = provenance_rows(ft.TEST_DATA / "PROVENANCE.md")
    listed = {name for name, _, _ in rows}
    on_disk = {str(p.relative_to(ft.TEST_DATA)) for p in ft.TEST_DATA.rglob("*") if p.is_file()} - {"PROVENANCE.md"}
    assert listed == on_disk, f"files without a provenance row or rows without a file: {listed ^ on_disk}"
    for name, size, sha in rows:
        data = (ft.TEST_DATA / name).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha, name


def test_packaged_assets_match_their_provenance():
    assets = REPO / "kosmos2_ref" / "assets"
    for name in ("sentencepiece.bpe.model", "two_dogs.jpg"):
        readme = (assets / "README.md").read_text(encoding="utf-8")
        sha = hashlib.sha256((assets / name).read_bytes()).hexdigest()
        assert sha in readme, f"{name}: sha256 {sha} is not the one kosmos2_ref/assets/README.md gives"


def test_license_and_third_party_notices_exist():
    assert "MIT License" in (REPO / "LICENSE").read_text(encoding="utf-8")
    notices = (REPO / "THIRD_PARTY_NOTICES.md").read_text(encoding="utf-8")
    assert "microsoft/unilm" in notices and "Copyright (c) Microsoft Corporation" in notices


def test_a_copy_in_an_empty_folder_runs_the_real_data_tests(tmp_path):
    """Copy the tracked files alone into tmp/lonely/repo (nothing beside them) and run tests that read the data."""
    clone = tmp_path / "lonely" / "repo"
    for path in tracked_files():
        target = clone / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    assert sorted(p.name for p in clone.parent.iterdir()) == ["repo"]
    tests = [
        "tests/test_processing_tokenizer.py::test_real_snowman_ids",
        "tests/test_processing_image.py",
        "tests/test_repository.py::test_test_data_matches_its_provenance",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "error" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
    # The copy's own package was tested, not the one installed from this checkout.
    probe = subprocess.run(
        [sys.executable, "-c", "import kosmos2_ref, sys; print(kosmos2_ref.__file__)"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert Path(probe.stdout.strip()).resolve().is_relative_to(clone.resolve()), probe.stdout
