"""Batch jobs over many images (kosmos2_ref/jobs.py, issue #21), end to end through the command line on tiny random
checkpoints: bad files become error records, batched rows equal one-image runs, output streams to disk, a killed
or interrupted run resumes to the same output, and embedding memory does not grow with the number of images.

No timing assertions: the subprocess tests wait for records to appear on disk, never for a duration.
"""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fixtures_model as fm
import numpy as np
import PIL.Image
import pytest
from fixtures_tokenizer import IMAGES

from kosmos2_ref import Kosmos2, cli, tasks

DOGS = IMAGES / "two_dogs.jpg"
SNOWMAN = IMAGES / "snowman.png"
REPO_ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = 300


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.delenv("KOSMOS2_REF_MODEL", raising=False)
    monkeypatch.delenv("KOSMOS2_REF_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return str(tiny_checkpoint[0])


@pytest.fixture(scope="module")
def model(ckpt):
    return Kosmos2.from_pretrained(ckpt)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def without_seconds(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]


def small_copy(src: Path, dst: Path, size=(64, 40)) -> Path:
    PIL.Image.open(src).convert("RGB").resize(size).save(dst)
    return dst


def truncated_jpeg(dst: Path) -> Path:
    buf = io.BytesIO()
    PIL.Image.open(DOGS).save(buf, "JPEG")
    dst.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return dst


def noise_images(folder: Path, count: int, side: int = 32, seed: int = 0) -> list[Path]:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        paths.append(folder / f"{i:04d}.png")
        PIL.Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """Good images, a truncated JPEG, a non-image with an image extension, a text file, a hidden file and a
    sub-folder with one more image."""
    folder = tmp_path / "photos"
    folder.mkdir()
    small_copy(DOGS, folder / "a_dogs.jpg")
    small_copy(SNOWMAN, folder / "c_snowman.png")
    truncated_jpeg(folder / "b_truncated.jpg")
    (folder / "d_not_an_image.png").write_text("this is text")
    (folder / "notes.txt").write_text("not an image")
    small_copy(DOGS, folder / ".hidden.jpg")
    (folder / "sub").mkdir()
    small_copy(SNOWMAN, folder / "sub" / "e_snowman.png")
    return folder


# ---------------------------------------------------------------------------------------------- inputs and records


def test_a_folder_with_bad_files_gives_one_record_per_image(capsys, ckpt, messy_folder, tmp_path):
    code, out, err = run(capsys, "--model", ckpt, "--max-new-tokens", "4", "caption", messy_folder, "--batch-size", "3")
    assert code == 0, err
    recs = [json.loads(line) for line in out.splitlines()]  # stdout: JSON Lines
    names = ["a_dogs.jpg", "b_truncated.jpg", "c_snowman.png", "d_not_an_image.png"]
    assert [r["path"] for r in recs] == [str(messy_folder / n) for n in names]
    assert [r["status"] for r in recs] == ["ok", "error", "ok", "error"]
    assert "not a readable image" in recs[1]["error"] and "b_truncated.jpg" in recs[1]["error"]
    assert "not a readable image" in recs[3]["error"] and "\n" not in recs[3]["error"]
    ok = recs[0]
    assert set(ok) == {"path", "status", "job", "prompt", "text", "caption", "entities", "image_size", "seconds"}
    assert ok["job"] == "caption" and ok["prompt"] == "<grounding> An image of" and ok["image_size"] == [64, 40]
    assert "1 file(s)" in err and "1 sub-folder(s)" in err and "--recursive" in err  # notes, one line each
    assert "caption: 4 image(s)" in err and "2 error(s)" in err  # the summary line

    code, out, err = run(
        capsys,
        "--model",
        ckpt,
        "--max-new-tokens",
        "4",
        "caption",
        messy_folder,
        "--recursive",
        "--out",
        tmp_path / "r.jsonl",
    )
    assert code == 0, err and out == ""
    paths = [r["path"] for r in records(tmp_path / "r.jsonl")]
    assert paths == [str(messy_folder / n) for n in names[:4]] + [str(messy_folder / "sub" / "e_snowman.png")]


def test_a_list_file_and_the_ground_and_describe_forms(capsys, ckpt, messy_folder, tmp_path):
    listing = tmp_path / "lists" / "images.txt"
    listing.parent.mkdir()
    listing.write_text(f"# my images\n\n../photos/a_dogs.jpg\n{messy_folder / 'c_snowman.png'}\n  ../photos/gone.jpg\n")
    code, out, err = run(capsys, "--model", ckpt, "ground", "--list", listing, "a dog")
    assert code == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in recs] == [
        str(messy_folder / "a_dogs.jpg"),
        str(messy_folder / "c_snowman.png"),
        str(messy_folder / "gone.jpg"),
    ]  # relative to the list's folder
    assert [r["status"] for r in recs] == ["ok", "ok", "error"] and "not found" in recs[2]["error"]
    assert recs[0]["phrase"] == "a dog" and {"boxes", "pixel_boxes", "entities"} <= set(recs[0])

    # describe with a pixel box: normalised by each image's size; outside one image -> that image's error record
    big = small_copy(DOGS, tmp_path / "big.png", (200, 100))
    code, out, err = run(
        capsys,
        "--model",
        ckpt,
        "--max-new-tokens",
        "4",
        "describe",
        messy_folder / "a_dogs.jpg",
        big,
        "--box",
        "10,10,100,50",
    )
    assert code == 0, err
    small, large = [json.loads(line) for line in out.splitlines()]
    assert small["status"] == "error" and "outside the 64x40 image" in small["error"]
    assert large["status"] == "ok" and large["box"] == [0.05, 0.1, 0.5, 0.5] and large["pixel_box"] == [10, 10, 100, 50]
    assert large["description"] == large["caption"] and large["description"].startswith("It")


def without_confidence(record: dict) -> dict:
    """A record without its entities' confidences, which a batched run computes from scores that may differ from
    a run alone in the last float32 bits (they are compared separately, to 1e-6)."""
    assert all("confidence" in e for e in record["entities"])
    return {**record, "entities": [{k: v for k, v in e.items() if k != "confidence"} for e in record["entities"]]}


def assert_same_confidences(a: dict, b: dict) -> None:
    def flat(c):
        return [] if c is None else [c["phrase"], c["object"]] + [v for box in c["boxes"] for v in box.values()]

    for ea, eb in zip(a["entities"], b["entities"], strict=True):
        fa, fb = flat(ea["confidence"]), flat(eb["confidence"])
        assert [v is None for v in fa] == [v is None for v in fb]
        assert all(abs(u - v) <= 1e-6 for u, v in zip(fa, fb) if u is not None)


def test_batched_records_equal_one_image_runs(capsys, ckpt, model, tmp_path):
    """Every image of a batch generates what it generates alone (greedy): the batched records equal the one-image
    task functions' results, for all three text jobs."""
    paths = noise_images(tmp_path / "noise", 5) + [small_copy(DOGS, tmp_path / "noise" / "z.jpg")]
    code, out, err = run(
        capsys, "--model", ckpt, "--max-new-tokens", "8", "caption", tmp_path / "noise", "--batch-size", "4"
    )
    assert code == 0, err
    for rec, path in zip([json.loads(line) for line in out.splitlines()], paths, strict=True):
        alone = json.loads(json.dumps(tasks.caption(model, path, max_new_tokens=8).to_dict()))
        assert {k: without_confidence(rec)[k] for k in alone} == without_confidence(alone)
        assert_same_confidences(rec, alone)

    code, out, err = run(capsys, "--model", ckpt, "ground", *paths[:3], "a dog", "--batch-size", "3")
    assert code == 0, err
    for rec, path in zip([json.loads(line) for line in out.splitlines()], paths[:3], strict=True):
        alone = json.loads(json.dumps(tasks.ground(model, path, "a dog").to_dict()))
        assert {k: without_confidence(rec)[k] for k in alone} == without_confidence(alone)
        assert_same_confidences(rec, alone)

    code, out, err = run(
        capsys,
        "--model",
        ckpt,
        "--max-new-tokens",
        "6",
        "describe",
        *paths[:3],
        "--box",
        "0.1,0.2,0.6,0.9",
        "--batch-size",
        "3",
    )
    assert code == 0, err
    for rec, path in zip([json.loads(line) for line in out.splitlines()], paths[:3], strict=True):
        alone = json.loads(json.dumps(tasks.describe(model, path, (0.1, 0.2, 0.6, 0.9), max_new_tokens=6).to_dict()))
        assert {k: without_confidence(rec)[k] for k in alone} == without_confidence(alone)
        assert_same_confidences(rec, alone)


def test_progress_bar_on_a_terminal(capsys, ckpt, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = run(
        capsys, "--model", ckpt, "--max-new-tokens", "3", "embed", DOGS, SNOWMAN, "--out", "e.npy", "--batch-size", "1"
    )
    assert code == 0, err
    bars = [part for part in err.split("\r") if part.startswith("embed [")]
    assert len(bars) == 2 and "1/2" in bars[0] and "2/2" in bars[1]
    assert all("images/s" in b and "left" in b for b in bars)
    code, out, err = run(capsys, "--model", ckpt, "ground", DOGS)
    assert code == 2 and "ground needs images and a phrase" in err


def test_one_image_without_out_behaves_as_before(capsys, ckpt):
    code, out, err = run(capsys, "--model", ckpt, "--max-new-tokens", "4", "--json", "caption", DOGS)
    assert code == 0, err
    d = json.loads(out)  # one JSON document (indented), not a record
    assert d["image"] == str(DOGS) and "status" not in d


def test_outputs_are_never_overwritten_and_resume_checks_the_job(capsys, ckpt, tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"path": "x", "status": "ok", "job": "caption", "prompt": "<grounding> An image of"}\n')
    code, _, err = run(capsys, "--model", ckpt, "caption", DOGS, SNOWMAN, "--out", out)
    assert code == 2 and "already exists; pass --resume" in err and len(err.strip().splitlines()) == 1
    assert out.read_text().count("\n") == 1  # untouched
    code, _, err = run(capsys, "--model", ckpt, "ground", DOGS, "a dog", "--out", out, "--resume")
    assert code == 2 and "holds caption records, not ground" in err
    code, _, err = run(capsys, "--model", ckpt, "caption", DOGS, "--prompt", "Hi", "--out", out, "--resume")
    assert code == 2 and "prompt" in err
    code, _, err = run(capsys, "--model", ckpt, "caption", DOGS, SNOWMAN, "--resume")
    assert code == 2 and "--resume needs --out" in err
    (tmp_path / "junk.jsonl").write_text("hello\n")
    code, _, err = run(capsys, "--model", ckpt, "caption", DOGS, "--out", tmp_path / "junk.jsonl", "--resume")
    assert code == 2 and "line 1 is not a JSON record" in err
    code, _, err = run(capsys, "--model", ckpt, "caption", DOGS, "--draw", tmp_path / "d.png", "--out", out)
    assert code == 2 and "--draw" in err and "one image" in err
    code, _, err = run(capsys, "--model", ckpt, "caption", "--batch-size", "0", DOGS, SNOWMAN)
    assert code == 2 and "--batch-size" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "--model", ckpt, "caption", empty)
    assert code == 2 and "no images to process" in err


def test_resume_skips_what_is_done_and_drops_a_partial_line(capsys, ckpt, messy_folder, tmp_path):
    args = ["--model", ckpt, "--max-new-tokens", "5", "caption", messy_folder, "--recursive", "--batch-size", "2"]
    assert run(capsys, *args, "--out", tmp_path / "full.jsonl")[0] == 0
    full = records(tmp_path / "full.jsonl")
    part = tmp_path / "part.jsonl"
    lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:2]) + lines[2][:25])  # two records, then a run killed mid-write
    code, out, err = run(capsys, *args, "--out", part, "--resume")
    assert code == 0, err
    assert "(2 done before)" in err
    assert without_seconds(records(part)) == without_seconds(full)
    assert records(part)[:2] == full[:2]  # the finished records were kept as they were


def test_on_error_stop_stops_before_the_bad_batch(capsys, ckpt, messy_folder, tmp_path):
    code, out, err = run(
        capsys,
        "--model",
        ckpt,
        "--max-new-tokens",
        "3",
        "caption",
        messy_folder,
        "--on-error",
        "stop",
        "--batch-size",
        "1",
        "--out",
        tmp_path / "s.jsonl",
    )
    assert code == 2 and "b_truncated.jpg" in err and "--resume" in err and len(err.strip().splitlines()) <= 3
    assert [r["path"] for r in records(tmp_path / "s.jsonl")] == [str(messy_folder / "a_dogs.jpg")]


# ---------------------------------------------------------------------------------------------- real processes


def _cli_process(argv, tmp_path, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kosmos2_ref", *map(str, argv)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _wait_for_records(proc, path: Path, count: int) -> None:
    """Wait until ``path`` holds ``count`` complete lines (or the process ends)."""
    while proc.poll() is None:
        if path.is_file() and path.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_killed_or_interrupted_run_resumes_to_the_uninterrupted_output(capsys, ckpt, tmp_path, how):
    """A real CLI process is killed (SIGKILL: no chance to clean up) or interrupted (SIGINT, Ctrl-C: it finishes
    the batch, says how to resume and exits with 130) once its first records are on disk; --resume then gives
    the output of an uninterrupted run."""
    noise_images(tmp_path / "imgs", 24)
    args = ["--model", ckpt, "--max-new-tokens", "8", "caption", tmp_path / "imgs", "--batch-size", "2"]
    assert run(capsys, *args, "--out", tmp_path / "ref.jsonl")[0] == 0

    out = tmp_path / "run.jsonl"
    proc = _cli_process([*args, "--out", out], tmp_path)
    _wait_for_records(proc, out, 2)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err
        assert "--resume" in err and "Traceback" not in err
        assert out.read_text().endswith("\n")  # stopped between records
    done = out.read_bytes().count(b"\n")
    assert 2 <= done < 24, "the run finished before it could be stopped"

    proc = _cli_process([*args, "--out", out, "--resume"], tmp_path)
    _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, err
    assert without_seconds(records(out)) == without_seconds(records(tmp_path / "ref.jsonl"))


# ---------------------------------------------------------------------------------------------- embeddings


def test_embed_streams_rows_with_an_index_and_resumes(capsys, ckpt, model, messy_folder, tmp_path):
    out = tmp_path / "e.npy"
    code, stdout, err = run(
        capsys, "--model", ckpt, "embed", messy_folder, "--recursive", "--out", out, "--batch-size", "2"
    )
    assert code == 0, err
    assert "embedded 5 of 5 image(s) (2 could not be read" in stdout
    index = records(tmp_path / "e.index.jsonl")
    header, rows = index[0], index[1:]
    assert header["count"] == 5 and header["image_embeds_shape"] == [5, 64, 32] and header["pooled_shape"] == [5, 32]
    assert [r["row"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "error", "ok"]
    embeds, pooled = np.load(out), np.load(tmp_path / "e.pooled.npy")
    assert embeds.shape == (5, 64, 32) and embeds.dtype == np.float32 and pooled.shape == (5, 32)
    assert not embeds[[1, 3]].any() and not pooled[[1, 3]].any()  # error rows stay zero
    good = [r["path"] for r in rows if r["status"] == "ok"]
    ref = tasks.embed(model, good, batch_size=1)
    scale = np.abs(ref.image_embeds).max()
    np.testing.assert_allclose(embeds[[0, 2, 4]], ref.image_embeds, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(pooled[[0, 2, 4]], ref.pooled, rtol=0, atol=1e-6 * np.abs(ref.pooled).max())

    # a run killed after its first rows: the index lists rows 0-1 and a partial line; --resume fills the rest
    expected = embeds.copy()
    lines = (tmp_path / "e.index.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "e.index.jsonl").write_text("".join(lines[:3]) + lines[3][:10])
    unwritten = np.load(out, mmap_mode="r+")  # the rows not listed were never written
    unwritten[2:] = 0
    unwritten.flush()
    del unwritten
    code, stdout, err = run(capsys, "--model", ckpt, "embed", messy_folder, "--recursive", "--out", out, "--resume")
    assert code == 0, err
    assert [r["row"] for r in records(tmp_path / "e.index.jsonl")[1:]] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(np.load(out), expected, rtol=0, atol=1e-6 * scale)

    # another list of images, or no --resume: refused, naming what to do
    code, _, err = run(capsys, "--model", ckpt, "embed", messy_folder, "--out", out, "--resume")
    assert code == 2 and "another list of images" in err
    code, _, err = run(capsys, "--model", ckpt, "embed", messy_folder, "--out", out)
    assert code == 2 and "already exists; pass --resume" in err


def test_embed_rows_the_index_lists_are_complete_when_a_write_fails(capsys, ckpt, model, tmp_path, monkeypatch):
    """A write that fails mid-run (a full disk) stops it with one line; the rows its index lists are complete,
    and --resume finishes the rest."""
    out = tmp_path / "e.npy"
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) == 3:  # the second image's embeddings (after row 0: embeddings, pooled)
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    code, stdout, err = run(capsys, "--model", ckpt, "embed", DOGS, SNOWMAN, "--out", out, "--batch-size", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "e.npy" in err and "No space left on device" in err and "--resume" in err
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    listed = records(tmp_path / "e.index.jsonl")[1:]
    assert [r["row"] for r in listed] == [0]
    ref = tasks.embed(model, [DOGS, SNOWMAN], batch_size=1)
    np.testing.assert_allclose(np.load(out)[0], ref.image_embeds[0], rtol=0, atol=1e-6 * np.abs(ref.image_embeds).max())
    code, stdout, err = run(capsys, "--model", ckpt, "embed", DOGS, SNOWMAN, "--out", out, "--resume")
    assert code == 0, err
    np.testing.assert_allclose(np.load(out), ref.image_embeds, rtol=0, atol=1e-6 * np.abs(ref.image_embeds).max())


WIDE = copy.deepcopy(fm.TINY)
# Embeddings of 64 x 512 float32 = 128 KiB per image, so that holding them would show; a small vocabulary (the
# decoder is not run) keeps the checkpoint at 11 MB. The processor is the packaged one (no tokenizer files needed).
WIDE["text_config"].update(embed_dim=512, ffn_dim=64, layers=1, vocab_size=1024, max_position_embeddings=16)


def _peak_rss_kib(argv, cwd) -> int:
    """Run the CLI in a child that reports its own peak resident memory: VmHWM of /proc/self/status (KiB). Not
    ru_maxrss, which Linux carries over from the process that forked the child (here pytest, with torch loaded)."""
    code = (
        "import sys; from kosmos2_ref import cli; status = cli.main(sys.argv[1:]); "
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]; "
        "print('PEAK', hwm, file=sys.stderr); sys.exit(status)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.rsplit("PEAK", 1)[1].split()[0])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from Linux's /proc")
def test_embed_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Peak RSS over 200 images minus peak over 40: far less than the 160 extra images' embeddings (20 MiB), which
    the .npz path (everything in memory) does show. Measured on a 2-core machine (KiB): .npy 40 images 157328,
    200 images 161988 (+4660); .npz 200 images 210680 (+53352). The numbers are printed (pytest -s)."""
    folder = tmp_path / "wide_ckpt"
    fm.save_checkpoint(fm.build_hf_model(WIDE, seed=3), folder)
    noise_images(tmp_path / "n40", 40, side=16)
    noise_images(tmp_path / "n200", 200, side=16)
    per_image_kib = 64 * 512 * 4 / 1024
    held = (200 - 40) * per_image_kib  # 20480 KiB
    peak = {
        n: _peak_rss_kib(["--model", folder, "embed", tmp_path / f"n{n}", "--out", tmp_path / f"e{n}.npy"], tmp_path)
        for n in (40, 200)
    }
    in_memory = _peak_rss_kib(["--model", folder, "embed", tmp_path / "n200", "--out", tmp_path / "e200.npz"], tmp_path)
    print(
        f"\npeak RSS (KiB): .npy 40 images {peak[40]}, 200 images {peak[200]} (+{peak[200] - peak[40]}); "
        f".npz 200 images {in_memory} (+{in_memory - peak[40]}); holding 160 more embeddings: {held:.0f}"
    )
    assert peak[200] - peak[40] < held / 2
    assert in_memory - peak[40] > held  # the measurement does see embeddings held in memory
    assert np.load(tmp_path / "e200.npy", mmap_mode="r").shape == (200, 64, 512)
