"""kosmos2_ref.confidence: token probabilities against transformers, and the grounded groups of the ids against
the processor's own post-processing of the text they decode to."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_tokenizer import IMAGES
from hypothesis import given, settings
from hypothesis import strategies as st

from kosmos2_ref import Kosmos2, Kosmos2Processor, generate
from kosmos2_ref.confidence import TagIds, entity_confidences, find_groups, token_probabilities

SETTINGS = dict(do_sample=False, num_beams=1, no_repeat_ngram_size=3, max_new_tokens=16)


@pytest.fixture(scope="module")
def real_processor():
    return Kosmos2Processor.default()


@pytest.fixture(scope="module")
def tags(real_processor):
    return TagIds.from_tokenizer(real_processor.tokenizer)


def test_probabilities_match_transformers_on_the_same_run(tiny_checkpoint):
    """Greedy on the tiny checkpoint, both sides: the same tokens, and p(token) from our scores against the same
    probability from transformers' scores, as torch computes it in float64 (log_softmax, then the chosen entry).

    transformers' own ``compute_transition_scores(normalize_logits=True)`` is printed and compared too, with a
    looser bound: it runs log_softmax in float32, whose sum of 65037 exponentials is off by ~1e-4 relative
    (measured here: float64 from the same scores agrees with ours to 1e-14)."""
    folder, hf = tiny_checkpoint
    ours = Kosmos2.from_pretrained(folder)
    processor = Kosmos2Processor.from_pretrained(folder)
    inputs = processor(text="<grounding> An image of", images=str(IMAGES / "snowman.png"))
    T = inputs["input_ids"].shape[1]
    run = generate(ours, **inputs, output_scores=True, return_dict_in_generate=True, **SETTINGS)
    with torch.no_grad():
        ref = hf.generate(
            **{k: torch.from_numpy(v) for k, v in inputs.items()},
            output_scores=True,
            return_dict_in_generate=True,
            **SETTINGS,
        )
        ref_f32 = hf.compute_transition_scores(ref.sequences, ref.scores, normalize_logits=True).exp()[0].numpy()
        tokens = ref.sequences[0, T:]
        logp64 = torch.log_softmax(torch.stack(ref.scores)[:, 0].double(), dim=-1)  # [steps, V]
        ref_f64 = logp64[torch.arange(len(tokens)), tokens].exp().numpy()
    assert np.array_equal(run.sequences, ref.sequences.numpy())
    probs = token_probabilities(run.scores, run.sequences[0, T:])
    err = float(np.abs(probs - ref_f64).max())
    rel_f32 = float((np.abs(probs - ref_f32) / ref_f32).max())
    print(
        f"\np(token), {len(probs)} greedy steps (p from {probs.min():.3f} to {probs.max():.3f}): ours vs "
        f"transformers' scores in float64 max |Δ| = {err:.2e}; vs compute_transition_scores (float32) max "
        f"relative Δ = {rel_f32:.2e}"
    )
    assert err < 1e-5
    assert rel_f32 < 1e-3


def test_token_probabilities_by_hand():
    scores = [np.log(np.array([[0.5, 0.25, 0.25]])), np.array([0.0, -np.inf, 0.0])]
    assert np.allclose(token_probabilities(scores, [1, 1]), [0.25, 0.0])
    with pytest.raises(ValueError, match="2 steps but 1 tokens"):
        token_probabilities(scores, [1])
    with pytest.raises(ValueError, match="outside the 3 scores"):
        token_probabilities(scores[:1], [3])


def test_entity_confidence_by_hand(real_processor, tags):
    """ "<phrase> a dog</phrase><object> A B </object>" generated after a 2-token prompt: the phrase's confidence
    is the mean of its two words, the box's the product of its two location tokens."""
    tok = real_processor.tokenizer
    words = tok.encode(" a dog", add_special_tokens=False)
    assert len(words) == 2
    ids = [0, 64012] + [
        tags.phrase,
        *words,
        tags.end_phrase,
        tags.object,
        tags.first_patch + 44,
        tags.first_patch + 863,
        tags.end_object,
    ]
    probs = [0.9, 0.6, 0.4, 0.95, 0.5, 0.2, 0.1, 0.99]
    (conf,) = entity_confidences(ids, 2, probs, tags)
    assert conf.phrase == pytest.approx(0.5) and conf.object == pytest.approx(0.5)
    assert conf.boxes[0].probability == pytest.approx(0.02)
    assert (conf.boxes[0].upper_left, conf.boxes[0].lower_right) == (0.2, 0.1)
    given_prompt = entity_confidences(ids, 7, probs[5:], tags)[0]  # the phrase and <object> were the prompt's
    assert given_prompt.phrase is None and given_prompt.object is None
    assert given_prompt.boxes[0].probability == pytest.approx(0.02)


# Random token sequences made of tags, patch tokens and words, in any order (well-formed or not).
PIECES = st.sampled_from(
    ["phrase", "end_phrase", "object", "end_object", "delimiter", "patch", "patch", "patch", "word", "word"]
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(PIECES, st.integers(0, 1023)), max_size=24))
def test_groups_are_the_entities_post_processing_finds(real_processor, tags, pieces):
    word_ids = real_processor.tokenizer.encode(" the dog on a red sofa", add_special_tokens=False)
    ids = []
    for kind, k in pieces:
        if kind == "patch":
            ids.append(tags.first_patch + k)
        elif kind == "word":
            ids.append(word_ids[k % len(word_ids)])
        else:
            ids.append(getattr(tags, kind))
    text = real_processor.decode(ids, skip_special_tokens=True)
    _, entities = real_processor.post_process_generation(text)
    confidences = entity_confidences(ids, 0, np.full(len(ids), 0.5), tags, entities)
    assert len(confidences) == len(entities)
    assert all(c is not None for c in confidences), (text, entities, find_groups(ids, tags))
    named = [e for e in entities if not e[0].startswith("<patch_index_")]
    assert all(c.phrase == pytest.approx(0.5) for c, e in zip(confidences, entities) if e in named)
