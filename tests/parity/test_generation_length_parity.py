"""A checkpoint's ``max_length`` against transformers 5.23 on the same folder (issue: old checkpoints serialise the
default ``max_length: 20``, which no image prompt fits).

transformers generates Kosmos-2 through its text model, whose generation config does not read
generation_config.json: with ``max_length: 20`` there it generates its default 20 new tokens. We warn and generate
the same tokens. A ``max_length`` that leaves room is a total length (prompt included) on our side, which is what
transformers makes of the same number passed to ``generate``; both pinned here, token for token.
"""

from __future__ import annotations

import copy
import json

import fixtures_model as fm
import numpy as np
import pytest
import torch

from kosmos2_ref import Kosmos2, generate

CFG = copy.deepcopy(fm.TINY)
CFG["text_config"]["max_position_embeddings"] = 128  # room for a 74-token prompt + 20 (transformers caps there)


@pytest.fixture(scope="module")
def folder_with_max_length(tmp_path_factory):
    hf = fm.build_hf_model(CFG, seed=3)
    with torch.no_grad():  # small embeddings: tokens vary (see the generation tests)
        emb = hf.text_model.model.embed_tokens.weight
        emb.copy_(0.05 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(5)))
    folder = fm.save_checkpoint(hf, tmp_path_factory.mktemp("max_length"))
    return folder


def _inputs():
    ids, img = fm.image_prompt_ids([712, 1648, 9, 10, 43867, 12, 99], 64)
    pv = np.random.default_rng(11).standard_normal((1, 3, 224, 224)).astype(np.float32)
    return pv, np.array([ids]), np.array([img])


def _with_generation_config(folder, max_length):
    g = json.loads((folder / "generation_config.json").read_text())
    g["max_length"] = max_length
    (folder / "generation_config.json").write_text(json.dumps(g))


def _hf_generate(folder, **kwargs):
    from transformers import Kosmos2ForConditionalGeneration

    hf = Kosmos2ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    pv, ids, img = _inputs()
    with torch.no_grad():
        return hf.generate(
            pixel_values=torch.from_numpy(pv),
            input_ids=torch.from_numpy(ids),
            image_embeds_position_mask=torch.from_numpy(img),
            do_sample=False,
            num_beams=1,
            **kwargs,
        ).numpy()


def test_serialised_default_max_length_generates_what_transformers_generates(folder_with_max_length):
    folder = folder_with_max_length
    _with_generation_config(folder, 20)
    pv, ids, img = _inputs()
    ref = _hf_generate(folder)  # no max_new_tokens: what a user of transformers gets
    ours_model = Kosmos2.from_pretrained(folder)
    T = ids.shape[1]  # 74: <s> <image> 64 slots </image> and 7 words
    with pytest.warns(
        UserWarning,
        match=rf"max_length=20, a total length that leaves no room after the {T}-token "
        r"prompt; generating transformers' default 20 new tokens",
    ):
        ours = generate(ours_model, pixel_values=pv, input_ids=ids, image_embeds_position_mask=img)
    print(
        f"\n  max_length=20, {T}-token prompt: transformers {ref.shape[1] - T} new tokens, ours "
        f"{ours.shape[1] - T}; ids equal: {np.array_equal(ours, ref)}"
    )
    assert ref.shape[1] == T + 20
    assert np.array_equal(ours, ref)


def test_max_length_with_room_is_a_total_length(folder_with_max_length):
    folder = folder_with_max_length
    _with_generation_config(folder, 80)
    pv, ids, img = _inputs()
    ref = _hf_generate(folder, max_length=80)  # transformers' meaning of max_length: prompt included
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = generate(Kosmos2.from_pretrained(folder), pixel_values=pv, input_ids=ids, image_embeds_position_mask=img)
    print(f"\n  max_length=80, {ids.shape[1]}-token prompt: {ours.shape[1] - ids.shape[1]} new tokens on both sides")
    assert ours.shape == ref.shape == (1, 80)
    assert np.array_equal(ours, ref)
