"""``kosmos2-ref convert SRC DST [--dtype D]``: any loadable checkpoint -> a safetensors folder that both libraries
read with the same numbers, written atomically (never a half-written output)."""

from __future__ import annotations

import json
import shutil

import fixtures_model as fm
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from kosmos2_ref import Kosmos2, cli, convert
from kosmos2_ref.config import Kosmos2Config
from kosmos2_ref.weights import WeightsError, load_flat

EMBED, HEAD = "text_model.model.embed_tokens.weight", "text_model.lm_head.weight"


@pytest.fixture(scope="module")
def bin_folder(tiny_checkpoint, tmp_path_factory):
    """The tiny model as a sharded pytorch_model.bin checkpoint (tied head stored twice, as 4.x wrote it) with the
    tokenizer and processor files beside it."""
    src, hf = tiny_checkpoint
    folder = fm.save_bin_checkpoint(hf, tmp_path_factory.mktemp("bin") / "ckpt", max_shard_bytes=1_000_000)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json",):
            shutil.copy(f, folder)
    return folder


def _logits(model_or_hf, torch_side=False):
    ids, img = fm.image_prompt_ids([712, 1648, 9, 10, 43867], 64)
    pv = np.random.default_rng(9).standard_normal((1, 3, 224, 224)).astype(np.float32)
    if torch_side:
        with torch.no_grad():
            return model_or_hf(
                pixel_values=torch.from_numpy(pv),
                input_ids=torch.tensor([ids]),
                image_embeds_position_mask=torch.tensor([img]),
            ).logits
    return model_or_hf(pixel_values=pv, input_ids=np.array([ids]), image_embeds_position_mask=np.array([img])).logits


def test_bin_to_safetensors_same_numbers_both_libraries(bin_folder, tmp_path):
    from transformers import Kosmos2ForConditionalGeneration

    dst = tmp_path / "out"
    assert cli.main(["convert", str(bin_folder), str(dst)]) == 0
    names = sorted(f.name for f in dst.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names and "preprocessor_config.json" in names
    assert not any(n.endswith(".bin") for n in names)
    stored = load_file(dst / "model.safetensors")  # the safetensors library reads it
    assert EMBED in stored and HEAD not in stored  # the tied head once, as save_pretrained does
    cfg = Kosmos2Config.from_pretrained(dst)
    a, b = load_flat(bin_folder, cfg), load_flat(dst, cfg)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # bit for bit
    hf = Kosmos2ForConditionalGeneration.from_pretrained(dst, attn_implementation="eager").eval()
    print()
    fm.check(
        "logits, converted folder (ours vs transformers)",
        _logits(Kosmos2.from_pretrained(dst)),
        _logits(hf, torch_side=True),
    )
    assert not list(tmp_path.glob(".*partial"))  # no temp folder left behind


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_converts_every_tensor_as_torch_does(bin_folder, tiny_checkpoint, tmp_path, dtype):
    from transformers import Kosmos2ForConditionalGeneration

    dst = tmp_path / dtype
    assert cli.main(["convert", str(bin_folder), str(dst), "--dtype", dtype]) == 0
    tdt = getattr(torch, dtype)
    header = json.loads(
        (dst / "model.safetensors").read_bytes()[
            8 : 8 + int.from_bytes((dst / "model.safetensors").read_bytes()[:8], "little")
        ]
    )
    tag = {"bfloat16": "BF16", "float16": "F16"}[dtype]
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {tag}
    from safetensors.torch import load_file as load_torch

    got = load_torch(dst / "model.safetensors")
    ref = tiny_checkpoint[1].state_dict()
    for k, t in got.items():
        assert torch.equal(t.view(torch.int16), ref[k].to(tdt).view(torch.int16)), k  # bit for bit
    config = json.loads((dst / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == dtype
    hf = Kosmos2ForConditionalGeneration.from_pretrained(dst, dtype=torch.float32, attn_implementation="eager").eval()
    print()
    fm.check(
        f"logits, {dtype} converted folder (ours vs transformers)",
        _logits(Kosmos2.from_pretrained(dst)),
        _logits(hf, torch_side=True),
    )


def test_untied_head_that_differs_is_kept(tiny_checkpoint, tmp_path):
    """A tied config whose checkpoint holds a different lm_head: both are written, so the converted folder loads
    as the source does (transformers unties them too; see test_tied_weights)."""
    from safetensors.numpy import save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint[0], src)
    flat = load_file(src / "model.safetensors")
    flat[HEAD] = flat[EMBED] * 0.5
    save_file(flat, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="not tied"):
        convert.convert_checkpoint(src, tmp_path / "dst")
    assert HEAD in load_file(tmp_path / "dst" / "model.safetensors")


def test_existing_output_is_refused_and_untouched(bin_folder, tmp_path, capsys):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    assert cli.main(["convert", str(bin_folder), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kosmos2-ref: error: output folder") and "already exists" in err and err.count("\n") == 1
    assert [f.name for f in dst.iterdir()] == ["mine.txt"]


def test_failure_midway_leaves_nothing(bin_folder, tmp_path, monkeypatch):
    """A failure while the weights are being written (here: at the fifth tensor, after four were written) leaves
    neither dst nor a temp folder."""
    real = convert._chunks
    calls = []

    def disk_full():
        yield np.zeros(1, np.float32)
        raise OSError("No space left on device")

    def failing(*args):
        calls.append(1)
        return disk_full() if len(calls) == 5 else real(*args)

    monkeypatch.setattr(convert, "_chunks", failing)
    with pytest.raises(OSError, match="No space left"):
        convert.convert_checkpoint(bin_folder, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_source_fails_before_writing(tiny_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint[0], src)
    flat = load_file(src / "model.safetensors")
    del flat["text_model.model.layer_norm.bias"]
    from safetensors.numpy import save_file

    save_file(flat, src / "model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match=r"missing key 'text_model\.model\.layer_norm\.bias'"):
        convert.convert_checkpoint(src, out)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["src"]


def test_hub_era_bin_converts_and_transformers_reads_the_result(tmp_path):
    """The pytorch_model.bin transformers 4.37.2 wrote (tests/data/hub_era) -> safetensors: the same bits as the
    safetensors 4.37 wrote beside it, and transformers 5.23 reads the converted folder."""
    from hub_era import hub_era_folder
    from transformers import Kosmos2ForConditionalGeneration

    src = hub_era_folder(tmp_path / "src", weights="bin")
    dst = convert.convert_checkpoint(src, tmp_path / "dst")
    ref = load_file(hub_era_folder(tmp_path / "st", weights="safetensors") / "model.safetensors")
    got = load_file(dst / "model.safetensors")
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    hf = Kosmos2ForConditionalGeneration.from_pretrained(dst, dtype=torch.float32, attn_implementation="eager")
    print()
    fm.check(
        "logits, converted 4.37 .bin (ours vs transformers)",
        _logits(Kosmos2.from_pretrained(dst)),
        _logits(hf.eval(), torch_side=True),
    )
