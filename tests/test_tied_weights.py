"""Tied-weight and naming variants of a checkpoint: each one loads as transformers 5.23 loads the same folder (the
logits compared), or gets a clear error.

| variant (tie_word_embeddings true unless said)         | transformers 5.23          | kosmos2_ref                 |
|---------------------------------------------------------|----------------------------|-----------------------------|
| embed_tokens only (what save_pretrained writes)         | tied                       | tied                        |
| lm_head only (some .bin -> safetensors conversions)     | the head read as embedding | the same                    |
| both, equal                                             | tied                       | tied, one matrix            |
| both, different                                         | not tied, warns            | the same; lm_head -> logits |
| derived buffers (position_ids, embed_positions.weights) | ignored                    | ignored silently            |
| an unknown extra key                                    | ignored, reported          | ignored, warns              |
| no __metadata__ in the safetensors header               | loads                      | loads                       |
| untied config, lm_head missing                          | random head, a report      | WeightsError naming the key |
| untied config, both keys                                | untied                     | untied                      |
"""

from __future__ import annotations

import json
import shutil
import warnings

import fixtures_model as fm
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from kosmos2_ref import Kosmos2
from kosmos2_ref.weights import WeightsError

EMBED, HEAD = "text_model.model.embed_tokens.weight", "text_model.lm_head.weight"


def _inputs():
    ids, img = fm.image_prompt_ids([712, 1648, 9, 10, 43867], 64)
    pv = np.random.default_rng(7).standard_normal((1, 3, 224, 224)).astype(np.float32)
    return pv, np.array([ids]), np.array([img])


def _compare_with_transformers(folder, name):
    """Load ``folder`` with both libraries and compare the logits (printed, 1e-5 of the scale)."""
    from transformers import Kosmos2ForConditionalGeneration

    ref_model = Kosmos2ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    pv, ids, img = _inputs()
    with torch.no_grad():
        ref = ref_model(
            pixel_values=torch.from_numpy(pv),
            input_ids=torch.from_numpy(ids),
            image_embeds_position_mask=torch.from_numpy(img),
        ).logits
    ours = Kosmos2.from_pretrained(folder)
    print()
    fm.check(f"logits, {name}", ours(pixel_values=pv, input_ids=ids, image_embeds_position_mask=img).logits, ref)
    return ours, ref_model


@pytest.fixture
def variant(tiny_checkpoint, tmp_path):
    """make(name, edit, metadata) -> a copy of the tiny checkpoint whose tensors ``edit(flat)`` changed."""
    src, _ = tiny_checkpoint

    def make(name, edit, metadata=("pt",), config_edit=None):
        folder = tmp_path / name
        shutil.copytree(src, folder)
        flat = load_file(folder / "model.safetensors")
        edit(flat)
        save_file(flat, folder / "model.safetensors", metadata={"format": metadata[0]} if metadata else None)
        if config_edit is not None:
            cfg = json.loads((folder / "config.json").read_text())
            config_edit(cfg)
            (folder / "config.json").write_text(json.dumps(cfg))
        return folder

    return make


def _no_warnings(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def test_embedding_only(variant):
    folder = variant("embed_only", lambda f: None)
    assert HEAD not in load_file(folder / "model.safetensors")
    _no_warnings(lambda: _compare_with_transformers(folder, "embed_tokens only"))


def test_lm_head_only_is_read_as_the_embedding(variant):
    folder = variant("head_only", lambda f: f.__setitem__(HEAD, f.pop(EMBED)))
    ours, ref = _no_warnings(lambda: _compare_with_transformers(folder, "lm_head only"))
    emb = ours.params["text_model"]["model"]["embed_tokens"]["weight"]
    assert np.array_equal(emb, ref.text_model.model.embed_tokens.weight.detach().numpy())
    assert "lm_head" not in ours.params["text_model"]


def test_both_equal_is_one_matrix(variant):
    folder = variant("both_equal", lambda f: f.__setitem__(HEAD, f[EMBED].copy()))
    ours, _ = _no_warnings(lambda: _compare_with_transformers(folder, "both, equal"))
    assert "lm_head" not in ours.params["text_model"]


def test_both_different_are_not_tied_and_the_head_makes_the_logits(variant):
    """transformers 5.23 keeps both (and warns); a test that the head wins: the logits differ from the tied ones."""

    def edit(f):
        f[HEAD] = (f[EMBED] * 0.5 + 0.01).astype(np.float32)

    folder = variant("both_different", edit)
    with pytest.warns(
        UserWarning,
        match=r"holds both with different values, so they are not tied .* the logits "
        r"use 'text_model\.lm_head\.weight'",
    ):
        ours, ref = _compare_with_transformers(folder, "both, different (lm_head wins)")
    assert not torch.equal(ref.text_model.lm_head.weight, ref.text_model.model.embed_tokens.weight)
    assert np.array_equal(
        ours.params["text_model"]["lm_head"]["weight"], ref.text_model.lm_head.weight.detach().numpy()
    )


def test_derived_buffers_are_ignored_silently(variant):
    def edit(f):
        f["vision_model.model.embeddings.position_ids"] = np.arange(257, dtype=np.int64)[None]
        f["text_model.model.embed_positions.weights"] = np.zeros((66, 32), np.float32)

    folder = variant("buffers", edit)
    _no_warnings(lambda: _compare_with_transformers(folder, "with derived buffers"))


def test_unknown_extra_key_warns(variant):
    folder = variant("extra", lambda f: f.__setitem__("text_model.model.rotary.inv_freq", np.ones(4, np.float32)))
    with pytest.warns(UserWarning, match=r"1 unexpected key\(s\), ignored: \['text_model\.model\.rotary\.inv_freq'\]"):
        _compare_with_transformers(folder, "with an unknown extra key")


def test_no_metadata(variant):
    folder = variant("no_metadata", lambda f: None, metadata=None)
    raw = (folder / "model.safetensors").read_bytes()
    assert b"__metadata__" not in raw[: int.from_bytes(raw[:8], "little") + 8]
    _no_warnings(lambda: _compare_with_transformers(folder, "no __metadata__"))


def _untie(cfg):
    cfg["text_config"]["tie_word_embeddings"] = False
    cfg["tie_word_embeddings"] = False


def test_untied_config_without_head_is_a_clear_error(variant):
    folder = variant("untied_missing", lambda f: None, config_edit=_untie)
    with pytest.raises(
        WeightsError,
        match=r"missing key 'text_model\.lm_head\.weight' \(tie_word_embeddings is "
        r"false, so the LM head is a weight of its own\)",
    ):
        Kosmos2.from_pretrained(folder)


def test_untied_config_with_both(variant):
    def edit(f):
        f[HEAD] = (f[EMBED][:, ::-1] * 0.3).astype(np.float32)

    folder = variant("untied_both", edit, config_edit=_untie)
    ours, _ = _no_warnings(lambda: _compare_with_transformers(folder, "untied, both"))
    assert "lm_head" in ours.params["text_model"]
