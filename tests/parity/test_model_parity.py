"""Stage-by-stage parity of the forward pass with transformers' Kosmos2ForConditionalGeneration.

Both sides read the same saved checkpoint; transformers runs in the same test. Tolerance: max |Δ| ≤ 1e-5 × the
reference's scale (max |ref|, at least 1), float32 on both sides. Measured errors are printed (pytest -s).
"""

from __future__ import annotations

import fixtures_model as fm
import numpy as np
import pytest
import torch

from kosmos2_ref import Kosmos2, fast, to_numpy

TOL = 1e-5


def _inputs(cfg_q: int, rows_text: list[list[int]], side="right", seed=0, image_size=224, batch=None):
    rows = [fm.image_prompt_ids(t, cfg_q) for t in rows_text]
    ids, att, img = fm.padded_batch(rows, side)
    rng = np.random.default_rng(seed)
    pv = rng.standard_normal((len(rows), 3, image_size, image_size)).astype(np.float32)
    return pv, ids, att, img


def _hf_forward(hf, pv, ids, att, img, **kw):
    with torch.no_grad():
        return hf(
            pixel_values=torch.from_numpy(pv),
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(att),
            image_embeds_position_mask=torch.from_numpy(img),
            **kw,
        )


def _compare_all(ours_model, hf, pv, ids, att, img, labels=None, label=""):
    print(f"\n[{label}] B={ids.shape[0]} T={ids.shape[1]}")
    ref = _hf_forward(
        hf,
        pv,
        ids,
        att,
        img,
        output_hidden_states=True,
        output_attentions=True,
        labels=None if labels is None else torch.from_numpy(labels),
    )
    with torch.no_grad():
        ref_vis = hf.vision_model(pixel_values=torch.from_numpy(pv), output_hidden_states=True, output_attentions=True)
    out = ours_model(
        pixel_values=pv,
        input_ids=ids,
        attention_mask=att,
        image_embeds_position_mask=img,
        labels=labels,
        output_hidden_states=True,
        output_attentions=True,
    )
    vo = out.vision_model_output
    for i, (a, b) in enumerate(zip(vo.hidden_states, ref_vis.hidden_states, strict=True)):
        fm.check(f"vision hidden_states[{i}]", a, b, TOL)
    for i, (a, b) in enumerate(zip(vo.attentions, ref_vis.attentions, strict=True)):
        fm.check(f"vision attentions[{i}]", a, b, TOL)
    fm.check("vision last_hidden_state", vo.last_hidden_state, ref_vis.last_hidden_state, TOL)
    fm.check("vision pooler_output", vo.pooler_output, ref_vis.pooler_output, TOL)
    fm.check("image_embeds", out.image_embeds, ref.image_embeds, TOL)
    fm.check("projection_attentions", out.projection_attentions, ref.projection_attentions, TOL)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        fm.check(f"text hidden_states[{i}]", a, b, TOL)
    for i, (a, b) in enumerate(zip(out.attentions, ref.attentions, strict=True)):
        fm.check(f"text attentions[{i}]", a, b, TOL)
    fm.check("logits", out.logits, ref.logits, TOL)
    if labels is not None:
        fm.check("loss", out.loss, ref.loss, TOL)
    return out, ref


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    folder, hf = tiny_checkpoint
    return Kosmos2.from_pretrained(folder), hf


@pytest.fixture(scope="module")
def tiny_odd(tiny_odd_checkpoint):
    folder, hf = tiny_odd_checkpoint
    return Kosmos2.from_pretrained(folder), hf


TEXTS = [[712, 1648, 9, 10, 43867], [64012, 712, 1648, 9], [5950, 597, 32, 646, 4, 6, 5, 8, 12, 1264, 17772]]


def test_single_prompt_every_stage(tiny):
    ours, hf = tiny
    pv, ids, att, img = _inputs(64, TEXTS[:1])
    labels = ids.copy()
    labels[img == 1] = -100
    _compare_all(ours, hf, pv, ids, att, img, labels=labels, label="tiny, one prompt")


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_every_stage(tiny, side):
    ours, hf = tiny
    pv, ids, att, img = _inputs(64, TEXTS, side=side, seed=3)
    labels = np.where(att == 1, ids, -100)
    _compare_all(ours, hf, pv, ids, att, img, labels=labels, label=f"tiny, batch 3, {side}-padded")


@pytest.mark.parametrize("form", ["x-first", "measured"])
def test_padded_batch_in_each_product_form(tiny, form, monkeypatch):
    """The suite takes the many-row products weight first (conftest); here x first, and as measured per shape
    (the default outside the tests: the first calls of each shape alternate, then one form is kept)."""
    ours, hf = tiny
    if form == "measured":
        monkeypatch.delenv(fast.PRODUCT_FORM_ENV)
        monkeypatch.setattr(fast, "_forms", {})
        monkeypatch.setattr(fast, "_form_trials", {})
    else:
        monkeypatch.setenv(fast.PRODUCT_FORM_ENV, form)
    pv, ids, att, img = _inputs(64, TEXTS, side="left", seed=3)
    labels = np.where(att == 1, ids, -100)
    for _ in range(2 if form == "measured" else 1):  # measured: while the forms alternate, then once kept
        _compare_all(ours, hf, pv, ids, att, img, labels=labels, label=f"tiny, batch 3, products {form}")
    if form == "measured":
        assert fast.product_forms() and set(fast.product_forms().values()) <= {fast.WEIGHT_FIRST, fast.X_FIRST}


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_with_attention_in_query_blocks(tiny, side, monkeypatch):
    """Without attention probabilities, attention takes the queries a few at a time and skips the keys no query
    of a block can see. Shrunk blocks (a handful of rows) so the tiny model takes that path: every hidden state
    and the logits still equal transformers', pad rows included."""
    from kosmos2_ref import fast

    ours, hf = tiny
    pv, ids, att, img = _inputs(64, TEXTS, side=side, seed=3)
    B, T = ids.shape
    monkeypatch.setattr(fast, "ATTENTION_BLOCK_BYTES", 4 * B * T * 5)  # one head, 5 query rows per block
    needed = []
    real = fast._keys_needed
    monkeypatch.setattr(fast, "_keys_needed", lambda m, S: needed.append(real(m, S)) or needed[-1])
    out = ours(
        pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img, output_hidden_states=True
    )
    ref = _hf_forward(hf, pv, ids, att, img, output_hidden_states=True)
    if ours.xp is np:  # the trailing-key check reads the mask on the host: NumPy only (a device attends them all)
        assert needed and min(needed) < T  # blocks did leave keys out
    print(f"\n[tiny, batch 3, {side}-padded, 5-query blocks] keys per block: {sorted(set(needed))} of {T}")
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        fm.check(f"text hidden_states[{i}]", a, b, TOL)
    fm.check("logits", out.logits, ref.logits, TOL)


def test_odd_heads_every_stage(tiny_odd):
    ours, hf = tiny_odd
    pv, ids, att, img = _inputs(7, TEXTS[1:], side="left", seed=5, image_size=56)
    labels = np.where(att == 1, ids, -100)
    _compare_all(ours, hf, pv, ids, att, img, labels=labels, label="odd heads (3 text, 5 vision), Q=7, 56px")


def test_base_model_last_hidden_state(tiny_checkpoint, tiny):
    """The base Kosmos2Model output (before the LM head) is reachable and equal."""
    from transformers import Kosmos2Model

    _, hf = tiny_checkpoint
    ours, _ = tiny
    # The base model with the saved model's weights (its decoder without the LM head), from the state dict:
    # Kosmos2Model.from_pretrained of a ForConditionalGeneration folder finds the decoder's weights in transformers
    # 5.23 but not in 5.17, which then starts the decoder from random. The decoder's keys are text_model.model.*
    # in some releases and text_model.* in others: each weight goes to whichever name the base model has.
    base = Kosmos2Model(hf.config).eval()
    names = set(base.state_dict())
    state = {}
    for key, value in hf.state_dict().items():
        name = next((n for n in (key, key.replace("text_model.model.", "text_model.", 1)) if n in names), None)
        if name is not None:
            state[name] = value
    base.load_state_dict(state)  # strict: every weight of the base model found
    pv, ids, att, img = _inputs(64, TEXTS[:2], side="right", seed=7)
    ref = _hf_forward(base, pv, ids, att, img)
    out = ours(pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img, compute_logits=False)
    assert out.logits is None
    fm.check("Kosmos2Model last_hidden_state", out.last_hidden_state, ref.last_hidden_state, TOL)


def test_sdpa_reference_agrees(tiny_checkpoint, tiny):
    """transformers' default attention (SDPA) gives the same logits as its eager path, and as ours."""
    from transformers import Kosmos2ForConditionalGeneration

    folder, _ = tiny_checkpoint
    ours, _ = tiny
    sdpa = Kosmos2ForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa").eval()
    pv, ids, att, img = _inputs(64, TEXTS, side="left", seed=11)
    ref = _hf_forward(sdpa, pv, ids, att, img)
    out = ours(pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img)
    real = att.astype(bool)  # SDPA's pad-query rows are garbage of another kind; compare real tokens
    fm.check("logits vs SDPA reference (real tokens)", out.logits[real], ref.logits.numpy()[real], TOL)


@pytest.mark.parametrize("hw", [(224, 224), (168, 252), (252, 196), (98, 98)])
def test_interpolate_pos_encoding(tiny_checkpoint, tiny, hw):
    """Other image sizes: get_image_features with interpolate_pos_encoding (transformers' Kosmos2Model path)."""
    from transformers import Kosmos2Model

    folder, _ = tiny_checkpoint
    ours, _ = tiny
    base = Kosmos2Model.from_pretrained(folder).eval()
    H, W = hw
    pv = np.random.default_rng(H * W).standard_normal((2, 3, H, W)).astype(np.float32)
    with torch.no_grad():
        ref = base.get_image_features(torch.from_numpy(pv), interpolate_pos_encoding=True)
        ref_vis = base.vision_model(torch.from_numpy(pv), interpolate_pos_encoding=True)
    print(f"\n[interpolate_pos_encoding {H}x{W}]")
    emb, _, vo = ours.encode_image(pv, interpolate_pos_encoding=True)
    fm.check("vision last_hidden_state", vo.last_hidden_state, ref_vis.last_hidden_state, TOL)
    ref_emb = ref.pooler_output if hasattr(ref, "pooler_output") else ref
    fm.check("image_embeds", emb, ref_emb, TOL)
    fm.check("get_image_features", ours.get_image_features(pv, interpolate_pos_encoding=True), ref_emb, TOL)


def test_wrong_image_size_without_interpolation(tiny):
    ours, _ = tiny
    with pytest.raises(ValueError, match=r"168x252.*interpolate_pos_encoding"):
        ours.get_image_features(np.zeros((1, 3, 168, 252), np.float32))


def test_precomputed_image_embeds_and_explicit_positions(tiny):
    ours, hf = tiny
    pv, ids, att, img = _inputs(64, TEXTS[:2], side="right", seed=13)
    emb = ours.get_image_features(pv)
    pos = np.arange(ids.shape[1])[None].repeat(2, 0) + 5
    with torch.no_grad():
        ref = hf(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(att),
            image_embeds=torch.from_numpy(to_numpy(emb)),  # to_numpy: emb may live on a GPU
            image_embeds_position_mask=torch.from_numpy(img),
            position_ids=torch.from_numpy(pos),
        )
    out = ours(input_ids=ids, attention_mask=att, image_embeds=emb, image_embeds_position_mask=img, position_ids=pos)
    print()
    fm.check("logits (image_embeds given, raw position_ids)", out.logits, ref.logits, TOL)


def test_cached_step_matches_transformers(tiny):
    """A prefill into our KVCache then one cached token equals transformers with its DynamicCache."""
    ours, hf = tiny
    pv, ids, att, img = _inputs(64, TEXTS[:1], seed=17)
    nxt = np.array([[4464]])
    with torch.no_grad():
        r1 = _hf_forward(hf, pv, ids, att, img, use_cache=True)
        att2 = np.concatenate([att, np.ones((1, 1), np.int64)], 1)
        # transformers wants an image even on a cached step (it is ignored once past > 0)
        r2 = hf(
            input_ids=torch.from_numpy(nxt),
            attention_mask=torch.from_numpy(att2),
            image_embeds=r1.image_embeds,
            past_key_values=r1.past_key_values,
            use_cache=True,
        )
    cache = ours.new_cache(1, ids.shape[1] + 4)
    o1 = ours(pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img, past_key_values=cache)
    o2 = ours(input_ids=nxt, attention_mask=att2, past_key_values=cache)
    print()
    fm.check("prefill logits", o1.logits, r1.logits, TOL)
    fm.check("cached step logits", o2.logits, r2.logits, TOL)
    assert cache.length == ids.shape[1] + 1
    for layer in range(len(cache.keys)):
        k_ref = r2.past_key_values.layers[layer].keys
        fm.check(f"cache keys layer {layer}", cache.keys[layer][:, :, : cache.length], k_ref, TOL)
