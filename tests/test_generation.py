"""Generation pieces on their own (the package kosmos2_ref/generation/).

Processors against transformers' own processor classes (run here) and hand-computed cases; the cache reorder;
settings taken from the checkpoint; bad arguments; streaming; seeded sampling; and the hypothesis properties of
docs/numerics.md §7.2 and §7.3: cached decoding equals an uncached forward at every step, and a left-padded row
decodes exactly as it does alone. Last, generation runs on the strict stand-in device namespace (backend
neutrality).
"""

from __future__ import annotations

import dataclasses
import types

import fixtures_model as fm
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.generation import logits_process as hf_lp

from kosmos2_ref import Kosmos2, generate
from kosmos2_ref import generation as gen
from kosmos2_ref.cache import KVCache
from kosmos2_ref.config import Kosmos2Config

TOL = 1e-5


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Kosmos2.from_pretrained(tiny_checkpoint[0])


def make_inputs(texts, side="left", seed=0):
    rows = [fm.image_prompt_ids(t, 64) for t in texts]
    ids, att, img = fm.padded_batch(rows, side)
    pv = np.random.default_rng(seed).standard_normal((len(texts), 3, 224, 224)).astype(np.float32)
    return pv, ids, att, img


def hf(processor, ids, scores):
    """Run a transformers processor on NumPy inputs."""
    return processor(None if ids is None else torch.from_numpy(ids), torch.from_numpy(scores.copy())).numpy()


# --------------------------------------------------------------------------------------------------------------
# Processors: hand-computed cases


def test_repetition_penalty_by_hand():
    scores = np.array([[1.0, -1.0, 2.0, 0.5]], np.float32)
    out = gen.repetition_penalty_processor(2.0, np.array([0]))(np.array([[0, 1, 1]]), scores)
    assert out.tolist() == [[0.5, -2.0, 2.0, 0.5]]  # token 1 twice: penalised once
    out = gen.repetition_penalty_processor(2.0, np.array([1]))(np.array([[0, 1, 1]]), scores)
    assert out.tolist() == [[1.0, -2.0, 2.0, 0.5]]  # position 0 (a left pad) does not count
    assert scores.tolist() == [[1.0, -1.0, 2.0, 0.5]]  # the input is left alone


def test_banned_ngrams_by_hand():
    seq = np.array([5, 6, 7, 5, 6])
    assert gen.banned_ngram_tokens(seq, 3).tolist() == [7]  # (5, 6) was followed by 7
    assert gen.banned_ngram_tokens(seq, 2).tolist() == [7]  # (6,) was followed by 7
    assert gen.banned_ngram_tokens(seq, 1).tolist() == [5, 6, 7]  # every seen token
    assert gen.banned_ngram_tokens(seq, 4).tolist() == []
    assert gen.banned_ngram_tokens(seq, 6).tolist() == []  # shorter than n


def test_top_p_by_hand():
    scores = np.log(np.array([[0.1, 0.2, 0.3, 0.4]], np.float32))
    out = gen.top_p_processor(0.75)(None, scores)  # cumulative ascending: .1 .3 .6 1 -> drop .1
    assert np.isneginf(out).tolist() == [[True, False, False, False]]
    out = gen.top_p_processor(0.05, min_tokens_to_keep=2)(None, scores)
    assert np.isneginf(out).tolist() == [[True, True, False, False]]


def test_top_k_keeps_ties_by_hand():
    scores = np.array([[3.0, 1.0, 2.0, 2.0, 0.0]], np.float32)
    out = gen.top_k_processor(2)(None, scores)
    assert np.isneginf(out).tolist() == [[False, True, False, False, True]]  # both 2.0 tie with the 2nd best


def test_min_new_tokens_by_hand():
    scores = np.zeros((2, 5), np.float32)
    proc = gen.min_new_tokens_processor(prompt_length=3, min_new_tokens=2, eos=(2, 4))
    assert np.isneginf(proc(np.zeros((2, 4), np.int64), scores)[:, [2, 4]]).all()  # 1 new token so far
    assert np.isfinite(proc(np.zeros((2, 5), np.int64), scores)).all()  # 2 made: EOS allowed


# --------------------------------------------------------------------------------------------------------------
# Processors: against transformers' classes on random inputs


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40, (4, 15))
    scores = rng.standard_normal((4, 50)).astype(np.float32)
    skip = np.array([0, 3, 7, 15])
    ref = hf(hf_lp.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=torch.from_numpy(skip)), ids, scores)
    assert np.array_equal(gen.repetition_penalty_processor(penalty, skip)(ids, scores), ref)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_transformers(n):
    rng = np.random.default_rng(n)
    ids = rng.integers(0, 6, (5, 30))  # a 6-token alphabet: many repeats
    scores = rng.standard_normal((5, 10)).astype(np.float32)
    ref = hf(hf_lp.NoRepeatNGramLogitsProcessor(n), ids, scores)
    ours = gen.no_repeat_ngram_processor(n, np.zeros(5, np.int64))(ids, scores)
    assert np.isneginf(ref).any() and np.array_equal(ours, ref)


def test_no_repeat_ngram_ignores_left_padding():
    rng = np.random.default_rng(1)
    row = rng.integers(2, 6, 20)
    padded = np.concatenate([np.ones(4, np.int64), row])[None]
    scores = rng.standard_normal((1, 8)).astype(np.float32)
    alone = gen.no_repeat_ngram_processor(2, np.array([0]))(row[None], scores)
    assert np.array_equal(gen.no_repeat_ngram_processor(2, np.array([4]))(padded, scores), alone)


def test_min_new_tokens_matches_transformers():
    scores = np.random.default_rng(2).standard_normal((3, 20)).astype(np.float32)
    for length in (5, 7, 8, 12):
        ids = np.zeros((3, length), np.int64)
        ref = hf(hf_lp.MinNewTokensLengthLogitsProcessor(5, 3, [2, 7]), ids, scores)
        assert np.array_equal(gen.min_new_tokens_processor(5, 3, (2, 7))(ids, scores), ref)


@pytest.mark.parametrize("t", [0.3, 1.7])
def test_temperature_matches_transformers(t):
    scores = np.random.default_rng(3).standard_normal((3, 100)).astype(np.float32)
    assert np.array_equal(
        gen.temperature_processor(t)(None, scores), hf(hf_lp.TemperatureLogitsWarper(t), None, scores)
    )


@pytest.mark.parametrize("k,keep", [(1, 1), (10, 1), (1, 2), (500, 1)])
def test_top_k_matches_transformers(k, keep):
    rng = np.random.default_rng(k)
    scores = np.round(rng.standard_normal((4, 300)), 1).astype(np.float32)  # rounded: ties at the k-th value
    ref = hf(hf_lp.TopKLogitsWarper(k, min_tokens_to_keep=keep), None, scores)
    assert np.array_equal(gen.top_k_processor(k, keep)(None, scores), ref)


@pytest.mark.parametrize("p,keep", [(0.3, 1), (0.9, 1), (0.99, 2), (0.01, 3), (1.0, 1)])
def test_top_p_matches_transformers(p, keep):
    """Over full-vocabulary rows of several sharpnesses. A token whose cumulative probability equals 1 − top_p
    to float32 rounding may fall on either side (torch sums in double, we in two float32 levels): at most one
    such token per row, in at most 2 of the 24 rows; everything else is identical."""
    rng = np.random.default_rng(int(p * 100) + keep)
    scores = (rng.standard_normal((24, 65037)) * np.repeat([0.1, 0.5, 2.0, 6.0], 6)[:, None]).astype(np.float32)
    ref = hf(hf_lp.TopPLogitsWarper(p, min_tokens_to_keep=keep), None, scores)
    ours = gen.top_p_processor(p, keep)(None, scores)
    diff = np.isneginf(ours) != np.isneginf(ref)
    print(f"\n  top_p={p}: {int(diff.sum())} edge token(s) differ in {len(scores)} rows")
    assert diff.sum(axis=1).max() <= 1 and diff.any(axis=1).sum() <= 2
    assert np.array_equal(ours[~diff], ref[~diff])


def test_cumsum_f32_is_close_to_exact():
    p = np.random.default_rng(4).dirichlet(np.ones(65037), size=3).astype(np.float32)
    exact = np.cumsum(p.astype(np.float64), axis=-1)
    two_level = float(np.abs(gen.cumsum_f32(p) - exact).max())
    running = float(np.abs(np.cumsum(p, axis=-1) - exact).max())
    print(f"\n  cumsum over 65037: two-level max|Δ| {two_level:.2e}, running float32 sum {running:.2e}")
    assert gen.cumsum_f32(p).dtype == np.float32 and two_level < 1e-6 and two_level < running / 5.0


def test_log_softmax_matches_torch():
    x = (np.random.default_rng(5).standard_normal((3, 65037)) * 4).astype(np.float32)
    ours = gen.log_softmax(x)
    assert ours.dtype == np.float32
    fm.check("log_softmax", ours, torch.log_softmax(torch.from_numpy(x), -1), TOL)


def test_processor_order_is_transformers_order():
    s = gen.GenerationSettings(5, 2, True, 0.5, 3, 0.9, 1, 1.0, False, 2, 1.2, (2,), 1)
    procs = gen.build_processors(s, prompt_length=4, skip=np.zeros(1, np.int64))
    names = [p.__qualname__.split(".")[0] for p in procs]
    assert names == [
        "repetition_penalty_processor",
        "no_repeat_ngram_processor",
        "min_new_tokens_processor",
        "temperature_processor",
        "top_k_processor",
        "top_p_processor",
    ]
    greedy = gen.build_processors(dataclasses.replace(s, do_sample=False), 4, np.zeros(1, np.int64))
    assert len(greedy) == 3  # warpers only when sampling


# --------------------------------------------------------------------------------------------------------------
# Choosing tokens


def test_sampling_follows_the_distribution_and_never_draws_banned_tokens():
    probs = np.array([0.2, 0.5, 0.3, 0.0], np.float32)
    with np.errstate(divide="ignore"):
        scores = np.broadcast_to(np.log(probs), (20000, 4)).copy()  # log(0) = −inf: banned
    draws = gen.sample_next_tokens(scores, np.random.default_rng(0))
    freq = np.bincount(draws, minlength=4) / len(draws)
    print(f"\n  sampled frequencies {freq.round(4).tolist()} for {probs.tolist()}")
    assert freq[3] == 0 and np.abs(freq - probs).max() < 0.015


def test_greedy_takes_the_first_maximum():
    assert gen.greedy_next_tokens(np.array([[0.0, 2.0, 2.0], [5.0, 1.0, 5.0]], np.float32)).tolist() == [1, 0]


# --------------------------------------------------------------------------------------------------------------
# KV cache reorder (beam search)


def test_cache_reorder_gathers_and_repeats_rows():
    xp = np
    cache = KVCache(2, 3, 2, 4, capacity=6, xp=xp)
    for step in range(3):
        for layer in range(2):
            k = (
                np.full((3, 2, 1, 4), 0.0, np.float32)
                + np.arange(3, dtype=np.float32)[:, None, None, None]
                + 10.0 * step
                + 100.0 * layer
            )
            cache.update(layer, k, -k)
        cache.advance(1)
    cache.reorder(np.array([2, 0, 0, 1]))
    assert cache.batch_size == 4 and cache.length == 3 and cache.capacity == 6
    for layer in range(2):
        stored = cache.keys[layer][:, 0, :3, 0]  # [4, 3]
        expect = np.array([2, 0, 0, 1], np.float32)[:, None] + 10.0 * np.arange(3) + 100.0 * layer
        assert np.array_equal(stored, expect) and np.array_equal(cache.values[layer][:, 0, :3, 0], -expect)
    k, v = cache.update(0, np.zeros((4, 2, 1, 4), np.float32), np.zeros((4, 2, 1, 4), np.float32))
    assert k.shape == (4, 2, 4, 4) and np.array_equal(k[:, 0, :3, 0], stored - 100.0)


# --------------------------------------------------------------------------------------------------------------
# Settings


def _fake_model(text_config=None, generation_config=None):
    return types.SimpleNamespace(
        config=Kosmos2Config.from_dict({"text_config": text_config or {}}), generation_config=generation_config or {}
    )


def test_settings_come_from_the_checkpoint_and_explicit_arguments_win():
    m = _fake_model({"no_repeat_ngram_size": 3, "max_length": 20, "num_beams": 1}, {"eos_token_id": 2})
    s = gen.resolve_settings(m, prompt_length=70)
    assert (s.no_repeat_ngram_size, s.max_new_tokens, s.do_sample, s.num_beams) == (3, 20, False, 1)
    assert s.eos_token_id == (2,) and s.pad_token_id == 1 and s.top_k == 50 and s.early_stopping is False
    assert gen.resolve_settings(m, 70, no_repeat_ngram_size=0, max_new_tokens=5).no_repeat_ngram_size == 0
    # generation_config.json wins over text_config; its max_length is a total length
    m = _fake_model({"no_repeat_ngram_size": 3}, {"no_repeat_ngram_size": 4, "max_length": 80})
    s = gen.resolve_settings(m, prompt_length=70)
    assert s.no_repeat_ngram_size == 4 and s.max_new_tokens == 10
    # a max_length that leaves no room (the serialised default 20, say): transformers' default 20, with a warning
    with pytest.warns(
        UserWarning,
        match=r"max_length=60, a total length that leaves no room after the 70-token "
        r"prompt; generating transformers' default 20 new tokens",
    ):
        assert gen.resolve_settings(_fake_model(generation_config={"max_length": 60}), 70).max_new_tokens == 20
    with pytest.raises(ValueError, match=r"max_length='20': expected a positive integer"):
        gen.resolve_settings(_fake_model(generation_config={"max_length": "20"}), prompt_length=70)
    s = gen.resolve_settings(
        _fake_model(generation_config={"pad_token_id": None}), 5, eos_token_id=[2, 7], pad_token_id=None
    )
    assert s.eos_token_id == (2, 7) and s.pad_token_id == 1  # text_config's pad id


BAD = [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(num_beams=0), "num_beams"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(eos_token_id=70000), "eos_token_id"),
    (dict(pad_token_id=-3), "pad_token_id"),
    (dict(do_sample="yes"), "do_sample"),
    (dict(seed=1, rng=np.random.default_rng(1)), "seed or rng"),
    (dict(rng=3), "rng"),
    (dict(num_beams=2, streamer=gen.TextStreamer(None)), "streamer"),
    (dict(num_beams=2, callback=print), "callback"),
    (dict(callback=3), "callback"),
    (dict(do_sample=True, seed=-1), r"seed must be None"),
    (dict(do_sample=True, seed="abc"), r"seed must be None"),
    (dict(do_sample=True, seed=1.5), r"seed must be None"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[m + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_settings_raise_naming_the_argument(model, kw, match):
    pv, ids, att, img = make_inputs([[5, 6]])
    with pytest.raises(ValueError, match=match):
        generate(
            model,
            pixel_values=pv,
            input_ids=ids,
            attention_mask=att,
            image_embeds_position_mask=img,
            **{"max_new_tokens": 2, **kw},
        )


def test_bad_inputs_raise_naming_the_argument(model):
    pv, ids, att, img = make_inputs([[5, 6], [7, 8]])
    emb = model.get_image_features(pv)
    kw = dict(input_ids=ids, attention_mask=att, image_embeds_position_mask=img, max_new_tokens=2)
    with pytest.raises(ValueError, match="needs an image.*pixel_values"):
        generate(model, **kw)
    with pytest.raises(ValueError, match="either pixel_values or image_embeds"):
        generate(model, pixel_values=pv, image_embeds=emb, **kw)
    with pytest.raises(ValueError, match="pixel_values holds 1 images but input_ids has 2"):
        generate(model, pixel_values=pv[:1], **kw)
    with pytest.raises(ValueError, match="image_embeds must have shape"):
        generate(model, image_embeds=emb[:1], **kw)
    bad = img.copy()
    bad[0, -1] = 1
    with pytest.raises(ValueError, match=r"marks \[65, 64\].*latent_query_num"):
        generate(model, pixel_values=pv, **{**kw, "image_embeds_position_mask": bad})
    with pytest.raises(ValueError, match="image_embeds_position_mask has shape"):
        generate(model, pixel_values=pv, **{**kw, "image_embeds_position_mask": img[:, :-1]})
    with pytest.raises(ValueError, match="attention_mask has shape"):
        generate(model, pixel_values=pv, **{**kw, "attention_mask": att[:1]})
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, pixel_values=pv, **{**kw, "input_ids": ids[0]})
    with pytest.raises(ValueError, match="image_embeds_position_mask is required"):
        generate(model, pixel_values=pv, **{**kw, "image_embeds_position_mask": None})


def test_non_finite_images_are_refused(model):
    """A NaN image used to give NaN logits, and then token 0 at every step without a word."""
    pv, ids, att, img = make_inputs([[5, 6]])
    kw = dict(input_ids=ids, attention_mask=att, image_embeds_position_mask=img, max_new_tokens=2)
    emb = model.get_image_features(pv)
    bad = pv.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"pixel_values holds 1 non-finite value\(s\) \(NaN or inf\)"):
        generate(model, pixel_values=bad, **kw)
    bad = emb.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"image_embeds holds 1 non-finite value\(s\) \(NaN or inf\)"):
        generate(model, image_embeds=bad, **kw)


def test_nested_lists_are_accepted_or_named(model):
    pv, ids, att, img = make_inputs([[5, 6], [7, 8]], side="right")
    emb = model.get_image_features(pv)
    kw = dict(attention_mask=att, image_embeds_position_mask=img, max_new_tokens=2)
    want = generate(model, image_embeds=emb, input_ids=ids, **kw)
    np.testing.assert_array_equal(generate(model, image_embeds=emb.tolist(), input_ids=ids.tolist(), **kw), want)
    with pytest.raises(ValueError, match=r"input_ids must be an integer array .*rows of different lengths"):
        generate(model, pixel_values=pv, input_ids=[ids[0].tolist(), ids[1, :-1].tolist()], **kw)
    with pytest.raises(ValueError, match=r"image_embeds_position_mask must be an integer array .*different lengths"):
        generate(model, pixel_values=pv, input_ids=ids, **{**kw, "image_embeds_position_mask": [[1], [1, 1]]})
    with pytest.raises(ValueError, match=r"pixel_values must be an array of shape .*rows of different lengths"):
        generate(model, pixel_values=[pv[0].tolist(), [[[0.0]]]], input_ids=ids, **kw)


def test_outputs_are_int64_prompt_plus_new_and_float32_scores(model):
    pv, ids, att, img = make_inputs([[5, 6], [7, 8, 9]])
    out = generate(
        model,
        pixel_values=pv,
        input_ids=ids,
        attention_mask=att,
        image_embeds_position_mask=img,
        max_new_tokens=3,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert isinstance(out, gen.GenerateOutput) and out.sequences.dtype == np.int64
    assert out.sequences.shape == (2, ids.shape[1] + 3) and np.array_equal(out.sequences[:, : ids.shape[1]], ids)
    assert len(out.scores) == 3 and all(s.dtype == np.float32 and s.shape == (2, 65037) for s in out.scores)
    plain = generate(
        model, pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img, max_new_tokens=3
    )
    assert isinstance(plain, np.ndarray) and np.array_equal(plain, out.sequences)
    # the default length: transformers' 20 new tokens (no length in this checkpoint)
    assert (
        generate(model, pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img).shape[1]
        == ids.shape[1] + 20
    )


def test_attention_mask_is_inferred_from_pad_like_transformers(model):
    pv, ids, att, img = make_inputs([[5, 6, 7, 8], [9]], side="left")
    kw = dict(pixel_values=pv, input_ids=ids, image_embeds_position_mask=img, max_new_tokens=3)
    assert np.array_equal(generate(model, **kw), generate(model, attention_mask=att, **kw))


# --------------------------------------------------------------------------------------------------------------
# Streaming


class WordTokenizer:
    """decode(ids) -> "w<id>" words joined by spaces; id 99 is a newline."""

    def decode(self, ids, **kw):
        return "".join("\n" if i == 99 else f" w{i}" for i in ids)


def test_text_streamer_releases_whole_words():
    got = []
    st_ = gen.TextStreamer(WordTokenizer(), skip_prompt=True, on_text=lambda t, end: got.append((t, end)))
    st_.put(np.array([[1, 2, 3]]))  # the prompt: skipped
    for tok in (5, 6, 99, 7):
        st_.put(np.array([tok]))
    st_.end()
    # a word is released once the next one starts (a later token may still extend it); a newline flushes
    assert got == [(" ", False), ("w5 ", False), ("w6\n", False), (" ", False), ("w7", True)]
    assert st_.text == " w5 w6\n w7"
    with pytest.raises(ValueError, match="batch of 2"):
        st_.put(np.zeros((2, 3), np.int64))


def test_streamer_and_callback_see_every_token(model):
    pv, ids, att, img = make_inputs([[5, 6, 7]])

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, x):
            self.puts.append(np.asarray(x).copy())

        def end(self):
            self.ended += 1

    rec, calls = Recorder(), []
    text = gen.TextStreamer(WordTokenizer(), skip_prompt=True, on_text=lambda t, end: None)
    seq = generate(
        model,
        pixel_values=pv,
        input_ids=ids,
        attention_mask=att,
        image_embeds_position_mask=img,
        max_new_tokens=5,
        no_repeat_ngram_size=2,
        streamer=rec,
        callback=lambda step, toks: calls.append((step, toks.tolist())),
    )
    assert rec.ended == 1 and np.array_equal(rec.puts[0], ids)
    assert np.array_equal(np.concatenate([p.reshape(1, -1) for p in rec.puts], axis=1), seq)
    assert calls == [(k, [int(seq[0, ids.shape[1] + k])]) for k in range(5)]
    generate(
        model,
        pixel_values=pv,
        input_ids=ids,
        attention_mask=att,
        image_embeds_position_mask=img,
        max_new_tokens=5,
        no_repeat_ngram_size=2,
        streamer=text,
    )
    assert text.text == WordTokenizer().decode(seq[0, ids.shape[1] :].tolist())


# --------------------------------------------------------------------------------------------------------------
# Seeded sampling


@pytest.mark.parametrize("num_beams", [1, 3])
def test_seeded_sampling_is_deterministic(model, num_beams):
    pv, ids, att, img = make_inputs([[5, 6, 7], [8, 9, 10]], seed=1)
    kw = dict(
        pixel_values=pv,
        input_ids=ids,
        attention_mask=att,
        image_embeds_position_mask=img,
        max_new_tokens=6,
        do_sample=True,
        top_k=0,
        num_beams=num_beams,
    )
    a, b = generate(model, seed=0, **kw), generate(model, seed=0, **kw)
    c = generate(model, rng=np.random.default_rng(0), **kw)
    others = [generate(model, seed=s, **kw) for s in (1, 2, 3)]
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert any(not np.array_equal(a, o) for o in others)
    T = ids.shape[1]
    print(f"\n  seed 0: {a[:, T:].tolist()}   seed 1: {others[0][:, T:].tolist()}")


def test_sampling_with_top_k_1_is_greedy(model):
    pv, ids, att, img = make_inputs([[5, 6, 7]], seed=2)
    kw = dict(
        pixel_values=pv,
        input_ids=ids,
        attention_mask=att,
        image_embeds_position_mask=img,
        max_new_tokens=6,
        no_repeat_ngram_size=2,
    )
    assert np.array_equal(generate(model, do_sample=True, top_k=1, seed=5, **kw), generate(model, **kw))


# --------------------------------------------------------------------------------------------------------------
# Properties (docs/numerics.md §7.2, §7.3)

texts_st = st.lists(st.lists(st.integers(3, 64000), min_size=0, max_size=7), min_size=1, max_size=3)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(texts=texts_st, seed=st.integers(0, 2**16))
def test_cached_decoding_equals_uncached_forward(model, texts, seed):
    """Every step's logits from the cache equal a full forward of the whole prefix with no cache."""
    pv, ids, att, img = make_inputs(texts, side="left", seed=seed)
    emb = model.get_image_features(pv)
    out = generate(
        model,
        image_embeds=emb,
        input_ids=ids,
        attention_mask=att,
        image_embeds_position_mask=img,
        max_new_tokens=5,
        no_repeat_ngram_size=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    B, T = ids.shape
    worst = 0.0
    for k, step in enumerate(out.scores):
        n = T + k
        full = model(
            input_ids=out.sequences[:, :n],
            image_embeds=emb,
            attention_mask=np.concatenate([att, np.ones((B, k), np.int64)], 1),
            image_embeds_position_mask=np.concatenate([img, np.zeros((B, k), np.int64)], 1),
        )
        ref = full.logits[:, -1]
        err = float(np.abs(step - ref).max())
        worst = max(worst, err)
        assert err <= TOL * max(1.0, float(np.abs(ref).max())), (k, err)
    print(f"\n  cached vs uncached: B={B} T={T}, 5 steps, max|Δ| = {worst:.2e}")


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(texts=texts_st, seed=st.integers(0, 2**16), beams=st.sampled_from([1, 1, 2]))
def test_left_padded_row_generates_what_it_generates_alone(model, texts, seed, beams):
    """Pad-aware positions, and processors that skip the pads: each row of a left-padded batch gives the same
    tokens as the row alone (and the same scores, to float32 tolerance)."""
    pv, ids, att, img = make_inputs(texts, side="left", seed=seed)
    kw = dict(
        max_new_tokens=6,
        no_repeat_ngram_size=2,
        repetition_penalty=1.2,
        num_beams=beams,
        output_scores=True,
        return_dict_in_generate=True,
    )
    batch = generate(model, pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img, **kw)
    for b, text in enumerate(texts):
        p = int((att[b] == 0).sum())
        _, ids1, att1, img1 = make_inputs([text])
        alone = generate(
            model,
            pixel_values=pv[b : b + 1],
            input_ids=ids1,
            attention_mask=att1,
            image_embeds_position_mask=img1,
            **kw,
        )
        row = batch.sequences[b, p:]
        # rows of a batch run to the longest; a row that finished earlier is padded
        n = alone.sequences.shape[1]
        assert np.array_equal(row[:n], alone.sequences[0]) and (row[n:] == 1).all(), (b, p)
        if beams == 1:
            for s_b, s_1 in zip(batch.scores, alone.scores):
                fin = np.isfinite(s_1[0])
                assert np.array_equal(np.isfinite(s_b[b]), fin)
                assert np.abs(s_b[b][fin] - s_1[0][fin]).max() <= TOL * max(1.0, float(np.abs(s_1[0][fin]).max()))


# --------------------------------------------------------------------------------------------------------------
# Backend neutrality: generation on the strict stand-in device namespace (tests/strict_xp.py)


def test_generation_runs_on_the_strict_namespace(tiny_checkpoint, model, monkeypatch):
    """Bit for bit, so NumPy takes the many-row products weight first and its attention's heads from the split
    product, and NumPy's own LayerNorm, as the strict namespace always does (on NumPy the form is otherwise
    measured per shape, kosmos2_ref.fast.product_form, the heads are views that AVX-512 kernels multiply in
    another order, and LayerNorm is Numba's compiled one where installed)."""
    from strict_xp import STRICT_BACKEND

    from kosmos2_ref import fast

    monkeypatch.setenv(fast.PRODUCT_FORM_ENV, fast.WEIGHT_FIRST)
    monkeypatch.setattr(fast, "HEADS_AS_VIEWS", False)
    monkeypatch.setenv("KOSMOS2_FUSED", "off")

    strict = Kosmos2.from_pretrained(tiny_checkpoint[0], backend=STRICT_BACKEND)
    pv, ids, att, img = make_inputs([[5, 6, 7], [8]], side="left", seed=3)
    base = dict(
        pixel_values=pv,
        input_ids=ids,
        attention_mask=att,
        image_embeds_position_mask=img,
        max_new_tokens=4,
        output_scores=True,
        return_dict_in_generate=True,
    )
    cases = [
        dict(),
        dict(num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=2),
        dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=0),
        dict(do_sample=True, num_beams=2, top_k=0, seed=0),
    ]
    for kw in cases:
        a = generate(strict, **base, **kw)
        b = generate(model, **base, **kw)
        assert type(a.sequences) is np.ndarray and type(a.scores[0]) is np.ndarray
        assert np.array_equal(a.sequences, b.sequences), kw
        assert all(np.array_equal(x, y) for x, y in zip(a.scores, b.scores)), kw
