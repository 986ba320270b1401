"""``generate`` is the textbook loop (kosmos2_ref/generation/reference.py) with more around it.

Greedy ``generate`` with no processors must return what :func:`greedy_generate` returns, token for token: on the
tiny random checkpoint (near-flat distributions, where a bug in positions or masks flips argmaxes) and on the
trained miniature (which writes EOS, so finished rows and the early stop are compared too), each with one prompt
and with a left-padded batch. And the decoding loop checks its inputs once: no step re-checks the whole sequence.
"""

from __future__ import annotations

import fixtures_model as fm
import numpy as np
import pytest

from kosmos2_ref import Kosmos2, Kosmos2Processor, checks, generate, world
from kosmos2_ref.generation import greedy_generate

PLAIN = dict(do_sample=False, num_beams=1, no_repeat_ngram_size=0, repetition_penalty=1.0, min_new_tokens=0)


def generate_plainly(model, inputs, max_new_tokens):
    tc = model.config.text_config
    return generate(
        model,
        **inputs,
        max_new_tokens=max_new_tokens,
        eos_token_id=tc.eos_token_id,
        pad_token_id=tc.pad_token_id,
        **PLAIN,
    )


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return Kosmos2.from_pretrained(tiny_checkpoint[0])


def tiny_inputs(texts):
    ids, att, img = fm.padded_batch([fm.image_prompt_ids(t, 64) for t in texts], side="left")
    pv = np.random.default_rng(len(texts)).standard_normal((len(texts), 3, 224, 224)).astype(np.float32)
    return dict(pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img)


@pytest.mark.parametrize("texts", [[[712, 1648, 9]], [[712, 1648, 9, 33, 4], [5]]], ids=["one", "left-padded"])
def test_generate_is_the_reference_loop_on_the_tiny_checkpoint(tiny, texts):
    inputs = tiny_inputs(texts)
    want = greedy_generate(tiny, **inputs, max_new_tokens=8)
    got = generate_plainly(tiny, inputs, 8)
    assert got.shape == want.shape == (len(texts), inputs["input_ids"].shape[1] + 8)
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def mini():
    return Kosmos2.from_pretrained("mini"), Kosmos2Processor.from_pretrained("mini")


SCENES = [1_500_000_003, 1_500_000_011]  # held-out scenes of the miniature's world


@pytest.mark.parametrize("rows", [1, 2], ids=["one", "left-padded"])
def test_generate_is_the_reference_loop_on_the_miniature(mini, rows):
    model, processor = mini
    scenes = [world.make_scene(seed) for seed in SCENES[:rows]]
    prompts = ["<grounding> An image of", f"<grounding><phrase> {world.referring_examples(scenes[-1])[0][0]}</phrase>"]
    inputs = processor(text=prompts[:rows], images=[world.render(s) for s in scenes], padding=True, padding_side="left")
    inputs = {k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask", "image_embeds_position_mask")}
    assert rows == 1 or (inputs["attention_mask"] == 0).any(), "the batch is padded"
    want = greedy_generate(model, **inputs, max_new_tokens=48)
    got = generate_plainly(model, inputs, 48)
    np.testing.assert_array_equal(got, want)
    T = inputs["input_ids"].shape[1]
    assert np.isin(got[:, T:], model.config.text_config.eos_token_id).any(axis=1).all(), "every row wrote EOS"


def test_the_decoding_steps_check_nothing(tiny, monkeypatch):
    """The inputs are checked once per call: a step does not look at the whole sequence again."""
    calls = []
    for name in ("host_int_array", "as_array"):  # every check of ids, masks and images goes through these
        real = getattr(checks, name)
        monkeypatch.setattr(checks, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    generate_plainly(tiny, tiny_inputs([[712, 1648, 9]]), 1)
    once = len(calls)
    calls.clear()
    generate_plainly(tiny, tiny_inputs([[712, 1648, 9]]), 12)
    assert 0 < once == len(calls), "the checks ran again while decoding"
