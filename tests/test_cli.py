"""The command line, end to end on a tiny random checkpoint and the real photos in tests/data/images.

Most runs call ``cli.main([...])`` in-process (fast); a few run ``python -m kosmos2_ref`` as a user would.
Random weights write random text: the tests check the structure, and where boxes matter a scripted generator
"writes" a known continuation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from fixtures_tokenizer import IMAGES

from kosmos2_ref import cli, draw, tasks
from kosmos2_ref.processing import Kosmos2Processor, box_to_pixels

DOGS = IMAGES / "two_dogs.jpg"  # 1200 x 602
SNOWMAN = IMAGES / "snowman.png"  # 1024 x 1024
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.delenv("KOSMOS2_REF_MODEL", raising=False)
    monkeypatch.delenv("KOSMOS2_REF_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return str(tiny_checkpoint[0])


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, "--json", *argv)
    assert code == 0, err
    return json.loads(out)


def scripted(monkeypatch, folder, continuation):
    processor = Kosmos2Processor.from_pretrained(folder)
    new = processor.tokenizer.encode(continuation, add_special_tokens=False)

    def fake(model, inputs, max_new_tokens, streamer=None, **kwargs):
        ids = np.concatenate([inputs["input_ids"], np.array([new + [2]], dtype=np.int64)], axis=1)
        return types.SimpleNamespace(sequences=ids, scores=[])  # no scores: no confidences

    monkeypatch.setattr(tasks, "_generate", fake)


def edge_colours(path, pixel_box):
    a = np.asarray(PIL.Image.open(path).convert("RGB"))
    x1, y1, x2, y2 = pixel_box
    ym, xm = (y1 + y2) // 2, (x1 + x2) // 2
    return [tuple(a[ym, x1]), tuple(a[ym, x2]), tuple(a[y2, xm])]


# ---------------------------------------------------------------------------------------------- caption


def test_caption_json(capsys, ckpt):
    d = run_json(capsys, "--model", ckpt, "--max-new-tokens", "6", "caption", DOGS)
    assert set(d) >= {"text", "caption", "entities"}
    assert isinstance(d["text"], str) and d["text"].startswith("<grounding> An image of")
    assert d["caption"].startswith("An image of")
    assert d["image_size"] == [1200, 602]
    for e in d["entities"]:
        assert set(e) >= {"phrase", "span", "boxes"} and len(e["span"]) == 2
        assert all(len(b) == 4 for b in e["boxes"])


def test_caption_text_output_and_options_after_the_command(capsys, ckpt):
    code, out, err = run(
        capsys,
        "caption",
        DOGS,
        "--model",
        ckpt,
        "--max-new-tokens",
        "4",
        "--prompt",
        "<grounding> Describe this image in detail:",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Describe this image in detail:")
    assert lines[1].startswith("  ")  # the entities (or "(no grounded phrases)")


def test_caption_with_an_empty_prompt_uses_it(capsys, ckpt):
    """--prompt "" is a prompt (the image alone), not a request for the default one."""
    d = run_json(capsys, "--model", ckpt, "--max-new-tokens", "3", "caption", DOGS, "--prompt", "")
    assert not d["text"].startswith("<grounding>")
    d = run_json(capsys, "--model", ckpt, "--max-new-tokens", "3", "caption", DOGS)
    assert d["text"].startswith("<grounding> An image of")


def test_caption_streams_on_a_terminal(capsys, ckpt, monkeypatch):
    expected = run_json(capsys, "--model", ckpt, "--max-new-tokens", "8", "caption", DOGS)["caption"]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, err = run(capsys, "--model", ckpt, "--max-new-tokens", "8", "caption", DOGS)
    assert code == 0, err
    assert out.splitlines()[0] == expected


def test_caption_draw_boxes_where_the_entities_say(capsys, ckpt, monkeypatch, tmp_path):
    scripted(
        monkeypatch,
        ckpt,
        "<phrase> a dog</phrase><object><patch_index_0100><patch_index_0400></object> and"
        "<phrase> a dog</phrase><object><patch_index_0150><patch_index_0990></object>",
    )
    out_png = tmp_path / "boxes.png"
    d = run_json(capsys, "--model", ckpt, "--draw", out_png, "caption", DOGS)
    assert d["drawn"] == str(out_png)
    img = PIL.Image.open(out_png)
    assert img.format == "PNG" and img.size == (1200, 602)
    assert [e["phrase"] for e in d["entities"]] == ["a dog", "a dog"]
    for i, e in enumerate(d["entities"]):
        (px,) = e["pixel_boxes"]
        assert px == list(box_to_pixels(e["boxes"][0], (1200, 602)))
        assert edge_colours(out_png, px) == [draw.colour(i)] * 3
    code, out, err = run(capsys, "--model", ckpt, "caption", DOGS)
    assert "a dog  (" in out and "pixels (" in out


# ---------------------------------------------------------------------------------------------- ground


def test_ground_json_and_draw(capsys, ckpt, monkeypatch, tmp_path):
    d = run_json(capsys, "--model", ckpt, "ground", SNOWMAN, "a snowman")  # random: structure only
    assert d["phrase"] == "a snowman" and isinstance(d["boxes"], list)
    assert d["text"].startswith("<grounding><phrase> a snowman</phrase>")

    scripted(monkeypatch, ckpt, "<object><patch_index_0044><patch_index_0863></object>")
    d = run_json(capsys, "--model", ckpt, "--draw", tmp_path / "g.png", "ground", SNOWMAN, "a snowman")
    assert d["boxes"] == [[0.390625, 0.046875, 0.984375, 0.828125]]
    assert d["pixel_boxes"] == [[400, 48, 1008, 848]]
    assert PIL.Image.open(tmp_path / "g.png").size == (1024, 1024)
    assert edge_colours(tmp_path / "g.png", (400, 48, 1008, 848)) == [draw.colour(0)] * 3
    code, out, _ = run(capsys, "--model", ckpt, "ground", SNOWMAN, "a snowman")
    assert out.splitlines()[0] == "a snowman:" and "pixels (400, 48, 1008, 848)" in out


# ---------------------------------------------------------------------------------------------- describe


def test_describe_json_pixel_and_normalised_boxes(capsys, ckpt, tmp_path):
    a = run_json(capsys, "--model", ckpt, "--max-new-tokens", "4", "describe", DOGS, "--box", "0.1,0.2,0.5,0.9")
    assert set(a) >= {"box", "pixel_box", "description", "text"}
    assert a["box"] == [0.1, 0.2, 0.5, 0.9] and a["pixel_box"] == [120, 120, 600, 541]
    assert a["description"].startswith("It")
    b = run_json(
        capsys,
        "--model",
        ckpt,
        "--max-new-tokens",
        "4",
        "--draw",
        tmp_path / "d.png",
        "describe",
        DOGS,
        "--box",
        "120,120.4,600,541.8",
    )
    assert b["box"] == pytest.approx(a["box"]) and b["text"] == a["text"]
    assert PIL.Image.open(tmp_path / "d.png").size == (1200, 602)
    assert edge_colours(tmp_path / "d.png", b["pixel_box"]) == [draw.colour(0)] * 3


# ---------------------------------------------------------------------------------------------- embed


def test_embed_npy_and_folder(capsys, ckpt, tmp_path, tiny_checkpoint):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.png", "a.jpg"):
        PIL.Image.open(DOGS).resize((64, 32)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    code, out, err = run(
        capsys, "--json", "--model", ckpt, "embed", DOGS, folder, "--out", tmp_path / "e.npy", "--batch-size", "2"
    )
    assert code == 0, err
    assert "skipped 1 file(s)" in err  # notes.txt, in one note
    d = json.loads(out)
    C = 32  # the tiny config's embed_dim and vision width
    assert d["images"] == [str(DOGS), str(folder / "a.jpg"), str(folder / "b.png")]
    e = np.load(tmp_path / "e.npy")
    pooled = np.load(tmp_path / "e.pooled.npy")
    assert e.shape == (3, 64, C) and e.dtype == np.float32 and pooled.shape == (3, C)
    assert d["pooled_out"] == str(tmp_path / "e.pooled.npy") and d["index"] == str(tmp_path / "e.index.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("e.", ".e."))) == [
        "e.index.jsonl",
        "e.npy",
        "e.pooled.npy",
    ]
    # the same numbers as the Python API (run unbatched here: a batch of 2 takes other BLAS blockings, so the
    # last bit of a sum may differ; the tolerance is float32 rounding relative to the largest entry)
    from kosmos2_ref import Kosmos2

    model = Kosmos2.from_pretrained(ckpt)
    ref = tasks.embed(model, [DOGS])
    np.testing.assert_allclose(e[0], ref.image_embeds[0], rtol=0, atol=1e-6 * np.abs(ref.image_embeds[0]).max())
    np.testing.assert_allclose(pooled[0], ref.pooled[0], rtol=0, atol=1e-6 * np.abs(ref.pooled[0]).max())


def test_embed_npz(capsys, ckpt, tmp_path):
    code, out, err = run(capsys, "--model", ckpt, "embed", DOGS, SNOWMAN, "--out", tmp_path / "e.npz")
    assert code == 0, err
    assert "embedded 2 image(s)" in out
    with np.load(tmp_path / "e.npz") as z:
        assert z["image_embeds"].shape == (2, 64, 32) and z["pooled"].shape == (2, 32)
        assert list(z["names"]) == [str(DOGS), str(SNOWMAN)]


# ---------------------------------------------------------------------------------------------- errors


def one_line_error(code, out, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kosmos2-ref: error: ") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_errors_are_one_line(capsys, ckpt, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    one_line_error(*run(capsys, "--model", ckpt, "caption", tmp_path / "missing.jpg"), "missing.jpg", "not found")
    one_line_error(*run(capsys, "--model", ckpt, "caption", bad), "broken.jpg", "not a readable image")
    empty = tmp_path / "empty"  # a folder is a batch of its images (tests/test_jobs.py); none here
    empty.mkdir()
    one_line_error(*run(capsys, "--model", ckpt, "caption", empty), "no images to process")
    one_line_error(*run(capsys, "--model", ckpt, "describe", DOGS, "--box", "0.5,0.5,0.1,0.9"), "x2 > x1")
    one_line_error(*run(capsys, "--model", ckpt, "describe", DOGS, "--box", "a,b,c,d"), "four numbers")
    one_line_error(*run(capsys, "--model", ckpt, "describe", DOGS, "--box", "0,0,5000,10"), "outside")
    one_line_error(*run(capsys, "--model", tmp_path / "no-model", "caption", DOGS), "no-model", "does not exist")
    one_line_error(
        *run(capsys, "--model", "someone/not-cached", "caption", DOGS), "someone/not-cached", "HF_HUB_OFFLINE=1"
    )
    one_line_error(*run(capsys, "--model", ckpt, "--draw", tmp_path / "x.unknown", "caption", DOGS), "x.unknown")
    one_line_error(*run(capsys, "--model", ckpt, "embed", DOGS, "--out", tmp_path / "e.txt"), ".npy or .npz")
    one_line_error(*run(capsys, "--model", ckpt, "--max-new-tokens", "0", "caption", DOGS), "max-new-tokens")
    one_line_error(*run(capsys, "--model", ckpt, "ground", DOGS, "<b>"), "'<'")
    one_line_error(*run(capsys, "--model", ckpt, "embed", tmp_path / "nope", "--out", tmp_path / "e.npy"), "nope")
    one_line_error(*run(capsys, "--model", ckpt, "embed", DOGS, "--out", tmp_path / "no" / "e.npy"), "does not exist")


def test_output_paths_are_checked_before_the_model_loads(capsys, tmp_path, monkeypatch):
    no_model = tmp_path / "no-model"  # were the model loaded first, the error would be about this

    def check(argv, *needles):
        code, out, err = run(capsys, "--model", no_model, *argv)
        one_line_error(code, out, err, *needles)
        assert "no-model" not in err and ".partial" not in err

    (tmp_path / "d.npy").mkdir()
    check(["embed", DOGS, "--out", tmp_path / "d.npy"], f"--out '{tmp_path / 'd.npy'}' is a folder", ".npy file")
    (tmp_path / "z.npz").mkdir()
    check(["embed", DOGS, "--out", tmp_path / "z.npz"], "--out", "z.npz' is a folder", ".npz file")
    np.save(tmp_path / "e.npy", np.zeros(3))
    (tmp_path / "e.pooled.npy").mkdir()
    check(["embed", DOGS, "--out", tmp_path / "e.npy"], "--out", "e.pooled.npy' is a folder")
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), np.zeros(3))
    (tmp_path / "a-file").write_text("")
    check(["embed", DOGS, "--out", tmp_path / "a-file" / "e.npy"], "--out", "a-file' is not a folder")
    (tmp_path / "g.png").mkdir()
    check(["--draw", tmp_path / "g.png", "ground", DOGS, "a dog"], "--draw", "g.png' is a folder", "image file")
    check(["caption", DOGS, "--draw", tmp_path / "no" / "c.png"], "--draw", "folder", "does not exist")
    check(["describe", DOGS, "--box", "0,0,1,1", "--draw", tmp_path / "a-file" / "c.png"], "--draw", "is not a folder")
    Path("kosmos2-demo.png").mkdir()  # the demo's default --draw, in the working folder
    check(["demo"], "'kosmos2-demo.png'", "is a folder", "--draw")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode))
    check(["embed", DOGS, "--out", locked / "e.npz"], "--out", "folder", "locked'", "not writable")


def test_embed_npy_never_overwrites_and_lists_only_complete_rows(capsys, ckpt, tmp_path, monkeypatch):
    """FILE.npy is filled row by row (so memory stays flat), so the guarantee is no longer "both files or
    neither" but: existing outputs are never overwritten (pass --resume or remove them), and every row the index
    lists is complete. A failed write stops the run with one line naming the file; --resume finishes it."""
    old_embeds = np.full((1, 2), 7.0)
    np.save(tmp_path / "e.npy", old_embeds)
    code, out, err = run(capsys, "--model", ckpt, "embed", DOGS, "--out", tmp_path / "e.npy")
    one_line_error(code, out, err, "--out", "e.npy", "already exists", "--resume")
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), old_embeds)
    code, out, err = run(capsys, "--model", ckpt, "embed", DOGS, "--out", tmp_path / "e.npy", "--resume")
    one_line_error(code, out, err, "e.npy", "index", "does not")  # no index: its complete rows are unknown
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), old_embeds)

    real_pwrite = os.pwrite

    def full_disk(fd, data, offset):
        if os.fstat(fd).st_size == 128 + 32 * 4 * 2:  # the pooled vectors' file of two images
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    code, out, err = run(capsys, "--model", ckpt, "embed", DOGS, SNOWMAN, "--out", tmp_path / "f.npy")
    one_line_error(code, out, err, "--out", "f.pooled.npy", "No space left on device", "--resume")
    assert ".partial" not in err
    assert [json.loads(line).get("row") for line in (tmp_path / "f.index.jsonl").read_text().splitlines()] == [None]
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    code, out, err = run(capsys, "--model", ckpt, "embed", DOGS, SNOWMAN, "--out", tmp_path / "f.npy", "--resume")
    assert code == 0, err
    assert np.load(tmp_path / "f.npy").shape == (2, 64, 32) and np.load(tmp_path / "f.pooled.npy").shape == (2, 32)
    assert np.load(tmp_path / "f.pooled.npy").any(axis=1).all()


def test_draw_write_error_names_the_option(capsys, ckpt, tmp_path, monkeypatch):
    def full_disk(self, fp, *a, **kw):
        raise OSError(28, "No space left on device", str(fp))

    monkeypatch.setattr(PIL.Image.Image, "save", full_disk)
    code, out, err = run(
        capsys, "--model", ckpt, "--max-new-tokens", "2", "--draw", tmp_path / "out.png", "caption", DOGS
    )
    one_line_error(code, out, err, "--draw", "out.png", "No space left on device")
    assert ".partial" not in err
    assert not [p for p in tmp_path.iterdir() if "out.png" in p.name]


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    _, err = capsys.readouterr()
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and "frobnicate" in err
    with pytest.raises(SystemExit) as info:
        cli.main(["describe", str(DOGS)])
    _, err = capsys.readouterr()
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and "--box" in err


# ---------------------------------------------------------------------------------------------- demo and -m


def _fresh_env(tmp_path) -> dict:
    """A machine that has never run kosmos2-ref and cannot reach the Hub."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_", "KOSMOS2_", "XDG_", "TRANSFORMERS_"))
    }
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    return env


def test_demo_offline_on_a_fresh_machine(tmp_path):
    env = _fresh_env(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "kosmos2_ref", "demo"], env=env, cwd=work, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    note = proc.stderr.strip().splitlines()
    assert len(note) == 1 and "real weights unavailable" in note[0] and "trained on synthetic shapes" in note[0]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("[miniature] An image of")
    assert lines[-1].endswith("-> kosmos2-demo.png") and "[miniature]" in lines[-1] and "generated scene" in lines[-1]
    assert PIL.Image.open(work / "kosmos2-demo.png").size == (224, 224)  # the scene, boxes drawn
    assert not (tmp_path / "home" / ".cache" / "kosmos2_ref").exists()  # the miniature is packaged

    # again, now cached, with --json and --draw
    proc = subprocess.run(
        [sys.executable, "-m", "kosmos2_ref", "--json", "--max-new-tokens", "4", "demo", "--draw", "out.png"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["miniature"] is True and d["drawn"] == "out.png" and set(d) >= {"text", "caption", "entities"}
    assert d["image"] is None and d["scene"]["seed"] == 3 and 1 <= len(d["scene"]["objects"]) <= 4


def test_a_closed_pipe_ends_quietly(tmp_path, ckpt):
    """`kosmos2-ref ... --json | head -0`: the reader is gone before the output is written; the command stops with
    status 141 (128 + SIGPIPE, as a shell reports it) and prints no error or traceback."""
    env = _fresh_env(tmp_path)
    # the tiny checkpoint was trained on 64 positions, fewer than any image prompt, so generate warns (as
    # transformers does); that warning is not what this test is about
    env["PYTHONWARNINGS"] = "ignore::UserWarning"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kosmos2_ref", "--json", "--max-new-tokens", "2", "--model", ckpt, "caption", str(DOGS)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # nobody will read what it prints
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert err == ""


def test_demo_uses_real_weights_when_given(capsys, ckpt):
    code, out, err = run(capsys, "--model", ckpt, "--max-new-tokens", "4", "demo")
    assert code == 0, err
    assert "[miniature]" not in out and err == ""
    assert Path("kosmos2-demo.png").is_file()


def test_demo_falls_back_in_process(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # the streaming path, labelled too
    code, out, err = run(capsys, "--max-new-tokens", "4", "demo")
    assert code == 0, err
    assert out.startswith("[miniature] An image of")
    assert "HF_HUB_OFFLINE=1" in err and len(err.strip().splitlines()) == 1


def test_python_m_help_and_version():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "kosmos2_ref", "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    for command in ("caption", "ground", "describe", "embed", "demo", "--model", "--json", "--draw"):
        assert command in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "kosmos2_ref", "--version"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.startswith("kosmos2-ref ")


def test_draw_confidence_labels_each_box_with_its_json_probability(capsys, tmp_path):
    """--draw-confidence on the miniature: the picture is the one draw_boxes makes with "phrase p" labels, p the
    box probability the --json output reports for the same run."""
    from kosmos2_ref import world

    scene = world.make_scene(1_500_000_003, num_objects=1)
    scene_png = tmp_path / "scene.png"
    world.render(scene).save(scene_png)
    phrase = world.referring_examples(scene)[0][0]
    out_png = tmp_path / "g.png"
    d = run_json(capsys, "--model", "mini", "--draw", out_png, "--draw-confidence", "ground", scene_png, phrase)
    (entity,) = [e for e in d["entities"] if e["phrase"] == phrase]
    probabilities = [b["probability"] for b in entity["confidence"]["boxes"]]
    assert probabilities and all(0 < p <= 1 for p in probabilities)
    labels = [draw.box_label(phrase, p) for p in probabilities]
    expected = draw.draw_boxes(PIL.Image.open(scene_png), entity["boxes"], labels, [draw.colour(0)] * len(labels))
    assert (np.asarray(PIL.Image.open(out_png)) == np.asarray(expected)).all()
