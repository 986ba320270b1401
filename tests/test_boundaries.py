"""Boundary defects of issue #15: values read from files, post-processing of odd text, images, unreadable files,
interrupted writes and the warnings transformers gives. Each case names the input and what was expected."""

from __future__ import annotations

import json
import re

import fixtures_tokenizer as ft
import pytest

from kosmos2_ref.processing.tokenizer import Kosmos2Tokenizer

# ------------------------------------------------------------------------------------- tokenizer_config.json


def _tokenizer_folder(tmp_path, **changes):
    folder = ft.write_tokenizer_files(tmp_path, "synthetic")
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder, path


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("clean_up_tokenization_spaces", "false", "true or false"),
        ("clean_up_tokenization_spaces", 0, "true or false"),
        ("model_max_length", "2048 tokens", "a positive whole number"),
        ("model_max_length", 20.5, "a positive whole number"),
        ("padding_side", "middle", "'right' or 'left'"),
        ("bos_token", 7, "a token"),
    ],
)
def test_a_bad_tokenizer_config_value_names_the_file_and_key(tmp_path, key, value, expected):
    folder, path = _tokenizer_folder(tmp_path, **{key: value})
    with pytest.raises(ValueError) as info:
        Kosmos2Tokenizer.from_pretrained(folder)
    message = str(info.value)
    print(message)
    assert str(path) in message and key in message and expected in message and repr(value) in message


def test_tokenizer_config_booleans_and_lengths_that_are_fine(tmp_path):
    folder, _ = _tokenizer_folder(tmp_path, clean_up_tokenization_spaces=False, model_max_length=1e30)
    tokenizer = Kosmos2Tokenizer.from_pretrained(folder)
    assert tokenizer.clean_up_tokenization_spaces is False and tokenizer.model_max_length == int(1e30)
    folder, _ = _tokenizer_folder(tmp_path / "b", clean_up_tokenization_spaces=True, model_max_length=77)
    tokenizer = Kosmos2Tokenizer.from_pretrained(folder)
    assert tokenizer.clean_up_tokenization_spaces is True and tokenizer.model_max_length == 77


# ------------------------------------------------------------------------------------- generation_config.json


def _checkpoint_copy(tiny_checkpoint, tmp_path, generation_config=None, text_config_changes=None):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint[0], folder)
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    if text_config_changes:
        config = json.loads((folder / "config.json").read_text())
        config["text_config"].update(text_config_changes)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _tiny_prompt():
    import fixtures_model as fm
    import numpy as np

    ids, att, img = fm.padded_batch([fm.image_prompt_ids([712, 1648, 9], 64)])
    pv = np.zeros((1, 3, 224, 224), np.float32)
    return dict(pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img)


@pytest.mark.parametrize(
    "file, key, value",
    [
        ("generation_config.json", "top_k", -1),
        ("generation_config.json", "do_sample", "false"),
        ("generation_config.json", "max_new_tokens", 0),
        ("config.json", "no_repeat_ngram_size", -3),
    ],
)
def test_a_refused_generation_setting_from_a_file_names_the_file(tiny_checkpoint, tmp_path, file, key, value):
    from kosmos2_ref import Kosmos2, generate

    if file == "generation_config.json":
        folder = _checkpoint_copy(tiny_checkpoint, tmp_path, generation_config={key: value})
    else:
        folder = _checkpoint_copy(tiny_checkpoint, tmp_path, text_config_changes={key: value})
    model = Kosmos2.from_pretrained(folder)
    with pytest.raises(ValueError) as info:
        generate(model, **_tiny_prompt(), max_new_tokens=None if key == "max_new_tokens" else 2)
    message = str(info.value)
    print(message)
    assert message.startswith(key) and str(folder / file) in message
    # the same value given as an argument is the caller's: no file is named
    with pytest.raises(ValueError) as info:
        generate(model, **_tiny_prompt(), **{key: value})
    assert str(folder) not in str(info.value)


# ------------------------------------------------------------------------------------- post-processing, linear


def test_tag_scan_equals_the_regex_and_transformers_on_random_text():
    import random

    from transformers.models.kosmos2 import processing_kosmos2 as hf

    from kosmos2_ref.processing import grounding

    pieces = [
        "<",
        ">",
        "\n",
        "a",
        " b",
        "<phrase>",
        "</phrase>",
        "<object>",
        "</object>",
        "<patch_index_0044>",
        "<patch_index_0863>",
        "</delimiter_of_multi_objects/>",
        "<grounding>",
        " ",
    ]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert grounding.tag_spans(text) == [m.span() for m in re.finditer("<.*?>", text)], text
        assert grounding.strip_tags(text) == re.sub("<.*?>", "", text), text
        ours = grounding.clean_text_and_extract_entities_with_bboxes(text)
        theirs = hf.clean_text_and_extract_entities_with_bboxes(text)
        assert ours == (theirs[0], [(n, s, [tuple(b) for b in bs]) for n, s, bs in theirs[1]]), text


LARGE_INPUTS = """
import sys
from kosmos2_ref.processing import grounding

n = 200_000
caption, entities = grounding.post_process_generation("x<" * n)           # quadratic: ~10 minutes
assert caption == ("x<" * n).strip() and entities == [], "unmatched <"
lines = grounding.post_process_generation(("<" * 1000 + "\\n") * 200 + "<b>c")   # every line fails, then a tag
assert lines[0] == ("<" * 1000 + "\\n") * 200 + "c"
one = "<phrase> a dog</phrase><object><patch_index_0000><patch_index_1023></object> and"
caption, entities = grounding.post_process_generation(one * 20_000)   # per-entity prefixes: ~minutes
assert len(entities) == 20_000 and caption == ("a dog and " * 20_000).strip()
assert entities[-1] == ("a dog", (len(caption) - 9, len(caption) - 4), [(0.015625, 0.015625, 0.984375, 0.984375)])
print("ok")
"""


def test_post_processing_is_linear_in_unmatched_brackets_and_entities(tmp_path):
    """Inputs that take the quadratic algorithm minutes finish well inside the subprocess limit (no timing is
    asserted beyond that limit), with the right answer."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", LARGE_INPUTS], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# ------------------------------------------------------------------------------------- patch indices off the grid


def test_a_patch_index_off_the_grid_never_becomes_a_box_outside_the_image():
    from transformers.models.kosmos2 import processing_kosmos2 as hf

    from kosmos2_ref.processing import Kosmos2Processor

    processor = Kosmos2Processor.default()
    text = (
        "<image></image><grounding><phrase> a dog</phrase><object><patch_index_9999><patch_index_1023></object>"
        " and<phrase> a cat</phrase><object><patch_index_0044><patch_index_0863></object>"
        "</delimiter_of_multi_objects/><patch_index_1024><patch_index_1050></object>"
        " near<object><patch_index_0000><patch_index_2000></object>"
    )
    caption, entities = processor.post_process_generation(text)
    assert caption == "a dog and a cat near"
    # the dog's only box and the unnamed box are off the grid: those entities go; the cat keeps its good box
    assert entities == [("a cat", (10, 15), [(0.390625, 0.046875, 0.984375, 0.828125)])]
    for _, _, boxes in entities:
        assert all(0.0 <= v <= 1.0 for box in boxes for v in box)
    # transformers turns the same text into boxes far outside [0, 1] (the difference docs/parity.md names)
    _, theirs = hf.clean_text_and_extract_entities_with_bboxes(text.split("</image>")[-1])
    print("transformers:", theirs)
    assert max(v for _, _, boxes in theirs for box in boxes for v in box) > 1.0


# ------------------------------------------------------------------------------------- float images of 0 and 1


def test_a_float_image_of_only_zeros_and_ones_is_intensities(tmp_path):
    import numpy as np
    from transformers import AutoProcessor

    from kosmos2_ref.processing import Kosmos2Processor

    folder = ft.write_tokenizer_files(tmp_path, "synthetic")
    ours = Kosmos2Processor.from_pretrained(folder)
    theirs = AutoProcessor.from_pretrained(folder, backend="pil").image_processor
    checker = (np.indices((40, 30)).sum(axis=0) % 2)[:, :, None].repeat(3, axis=2)  # [40, 30, 3] 0/1
    as_float, as_levels = checker.astype(np.float32), (checker * 255).astype(np.uint8)
    got = ours(images=as_float)["pixel_values"]
    # the docstring's rule: floats in [0, 1] are intensities, so 1.0 is white, as 255 is
    np.testing.assert_array_equal(got, ours(images=as_levels)["pixel_values"])

    def hf(image):
        return theirs(image, return_tensors="np", input_data_format="channels_last")["pixel_values"]

    np.testing.assert_array_equal(got, hf(as_levels))
    # transformers reads the float array as levels 0 and 1 of 255: nearly black (docs/parity.md)
    dark = hf(as_float)
    print(f"mean pixel value: ours {got.mean():.3f}, transformers on the float array {dark.mean():.3f}")
    assert dark.mean() < got.mean() - 1.0
    # a float array of levels (values above 1) is still read as levels
    np.testing.assert_array_equal(ours(images=as_levels.astype(np.float64))["pixel_values"], got)


# ------------------------------------------------------------------------------------- unreadable files


def _link_to_nothing(path):
    path.unlink(missing_ok=True)
    path.symlink_to(path.parent / "gone" / path.name)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "tokenizer.json", "preprocessor_config.json"])
def test_a_broken_link_in_a_processor_folder_is_named_as_one(tmp_path, name):
    from kosmos2_ref.processing import Kosmos2Processor

    folder = ft.write_tokenizer_files(tmp_path, "synthetic")
    _link_to_nothing(folder / name)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}' is a broken symbolic link: it points to") as info:
        Kosmos2Processor.from_pretrained(folder)
    assert "not a valid" not in str(info.value) and "no tokenizer" not in str(info.value)


def test_a_folder_or_a_pipe_where_a_file_belongs_is_named(tmp_path):
    import os

    from kosmos2_ref.processing import Kosmos2Processor

    folder = ft.write_tokenizer_files(tmp_path, "synthetic")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").mkdir()
    with pytest.raises(ValueError, match=r"tokenizer.json' is a folder; expected a file"):
        Kosmos2Processor.from_pretrained(folder)
    (folder / "tokenizer.json").rmdir()
    ft.write_tokenizer_files(folder, "synthetic")
    (folder / "preprocessor_config.json").unlink()
    os.mkfifo(folder / "preprocessor_config.json")  # reading it would wait for a writer forever
    with pytest.raises(ValueError, match=r"preprocessor_config.json' is a named pipe \(FIFO\); expected a file"):
        Kosmos2Processor.from_pretrained(folder)


def _refuse_to_open(monkeypatch, target):
    """Opening ``target`` raises PermissionError, as it would for a file without read permission (the tests run
    as root, for whom chmod 000 stops nothing); every other file opens as usual."""
    import pathlib

    real_open = pathlib.Path.open

    def open_(self, *args, **kwargs):
        if self == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", open_)


def test_a_file_without_read_permission_says_so(tmp_path, monkeypatch, tiny_checkpoint):
    import shutil

    from kosmos2_ref import Kosmos2
    from kosmos2_ref.processing import Kosmos2Processor

    folder = ft.write_tokenizer_files(tmp_path / "p", "synthetic")
    _refuse_to_open(monkeypatch, folder / "tokenizer.json")
    with pytest.raises(ValueError, match=r"tokenizer.json' cannot be read: Permission denied") as info:
        Kosmos2Processor.from_pretrained(folder)
    assert "not a valid" not in str(info.value)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint[0], ckpt)
    (ckpt / "generation_config.json").write_text("{}")
    for name in ("generation_config.json", "config.json"):
        _refuse_to_open(monkeypatch, ckpt / name)
        with pytest.raises(ValueError, match=rf"{name}' cannot be read: Permission denied"):
            Kosmos2.from_pretrained(ckpt)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_broken_link_in_a_checkpoint_folder_is_named_as_one(tmp_path, tiny_checkpoint, name):
    import shutil

    from kosmos2_ref import Kosmos2

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint[0], ckpt)
    _link_to_nothing(ckpt / name)
    with pytest.raises(ValueError, match=rf"broken symbolic links: {re.escape(name)} \(a broken symbolic link") as info:
        Kosmos2.from_pretrained(ckpt)
    assert f"has no {name}" not in str(info.value)


def test_a_cached_snapshot_with_a_broken_link_is_named_as_one(tmp_path, tiny_checkpoint, monkeypatch):
    from test_hub import REPO, make_snapshot

    from kosmos2_ref.hub import CheckpointNotFoundError, resolve_checkpoint

    cache = tmp_path / "hf"
    snap = make_snapshot(cache, tiny_checkpoint[0], "a" * 40)
    (snap / "model.safetensors").resolve().unlink()  # the blob is gone, the link stays
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(CheckpointNotFoundError, match=r"without model.safetensors \(a broken symbolic link to"):
        resolve_checkpoint(REPO, local_files_only=True)


# ------------------------------------------------------------------------------------- SIGTERM during a write

SLOW_WRITE = """
import signal, sys, time
from pathlib import Path
import numpy as np
from kosmos2_ref import cli

# A shell without job control starts background commands with SIGINT ignored (so CI may hand us that); a
# terminal's Ctrl-C is what this test stands for, so restore Python's own handler.
signal.signal(signal.SIGINT, signal.default_int_handler)

def slow_save(f, *args, **kwargs):              # part of the file, then a long wait: the write is in progress
    f.write(b"\\x93NUMPY" + bytes(4096))
    f.flush()
    Path(sys.argv[1]).write_text("writing")
    time.sleep(120)

np.savez = slow_save        # the .npz output is written at the end, through a .partial file (.npy streams rows)
sys.exit(cli.main(["embed", sys.argv[2], "--model", sys.argv[3], "--out", sys.argv[4]]))
"""


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_during_a_write_leaves_no_partial_file(tmp_path, tiny_checkpoint, signum):
    import signal
    import subprocess
    import sys
    import time

    from fixtures_tokenizer import IMAGES

    marker, out_dir = tmp_path / "marker", tmp_path / "out"
    out_dir.mkdir()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_WRITE,
            str(marker),
            str(IMAGES / "two_dogs.jpg"),
            str(tiny_checkpoint[0]),
            str(out_dir / "emb.npz"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(1200):  # wait (at most 2 minutes) until the write has begun
            if marker.exists() or child.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), child.communicate()[1][-2000:]
        assert [p.name for p in out_dir.iterdir()] == [".emb.npz.partial"]  # mid-write
        child.send_signal(getattr(signal, signum))
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    print(signum, child.returncode, stderr.strip())
    assert child.returncode == (143 if signum == "SIGTERM" else 130)
    assert list(out_dir.iterdir()) == []  # nothing half-written is left
    assert stderr.strip().splitlines()[-1] == (
        "kosmos2-ref: terminated" if signum == "SIGTERM" else "kosmos2-ref: interrupted"
    )


# ------------------------------------------------------------------------------------- warnings, as transformers


def _hf_flagged(**kwargs) -> set:
    """The settings transformers' GenerationConfig.validate names as ignored, for ``kwargs`` set by the caller."""
    from transformers import GenerationConfig

    try:
        GenerationConfig(**kwargs).validate(strict=True, user_set_attributes=set(kwargs))
    except ValueError as err:
        return set(re.findall(r"- `(\w+)`:", str(err)))
    return set()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.7),
        dict(do_sample=False, top_p=0.9, top_k=5),
        dict(num_beams=1, length_penalty=2.0),
        dict(early_stopping=True),
        dict(do_sample=True, temperature=0.7, top_k=5),  # nothing ignored
        dict(num_beams=2, length_penalty=2.0),  # nothing ignored
    ],
)
def test_ignored_settings_warn_once_as_transformers_does(tiny_checkpoint, kwargs):
    import warnings

    from kosmos2_ref import Kosmos2, generate

    model = Kosmos2.from_pretrained(tiny_checkpoint[0])
    theirs = _hf_flagged(**kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(model, **_tiny_prompt(), max_new_tokens=1, seed=0, **kwargs)
    ours = [w for w in caught if "generate ignores" in str(w.message)]
    print(kwargs, "transformers:", sorted(theirs), "ours:", [str(w.message)[:80] for w in ours])
    if theirs:
        assert len(ours) == 1  # one warning naming them all
        named = set(re.findall(r"(\w+)=", str(ours[0].message).split(":")[0]))
        assert named == theirs
    else:
        assert ours == []


def test_a_checkpoint_temperature_under_an_explicit_greedy_call_is_not_named(tiny_checkpoint, tmp_path):
    import warnings

    from kosmos2_ref import Kosmos2, generate

    model = Kosmos2.from_pretrained(_checkpoint_copy(tiny_checkpoint, tmp_path, generation_config={"top_p": 0.5}))
    with pytest.warns(UserWarning, match=r"generate ignores top_p=0.5"):
        generate(model, **_tiny_prompt(), max_new_tokens=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # do_sample=False chosen: quiet, as in transformers
        generate(model, **_tiny_prompt(), max_new_tokens=1, do_sample=False)
    assert _hf_flagged(do_sample=False) == set()


@pytest.mark.parametrize("num_beams", [1, 2])
def test_growing_past_the_trained_positions_warns_once(tiny_checkpoint, num_beams):
    import warnings

    from kosmos2_ref import Kosmos2, generate

    model = Kosmos2.from_pretrained(tiny_checkpoint[0])  # trained on 64 positions; the prompt has 70
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(model, **_tiny_prompt(), max_new_tokens=5, num_beams=num_beams, eos_token_id=[])
    past = [str(w.message) for w in caught if "positions the model was trained on" in str(w.message)]
    assert out.shape[1] == 70 + 5
    assert past == [
        "generate: the sequence (71 tokens) is now longer than the 64 positions the model was trained "
        "on (max_position_embeddings); the text may degrade from here"
    ]
    with warnings.catch_warnings():  # one new token: the sequence ends there, no warning
        warnings.simplefilter("error", UserWarning)
        generate(model, **_tiny_prompt(), max_new_tokens=1, num_beams=num_beams)
