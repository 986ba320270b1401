"""The textbook primitives alone (``reference=True``) against transformers on the tiny configs: every stage of
the forward pass, the logits and loss, and greedy generation; and the switch itself (argument, environment
variable, per thread), with the fast and reference modes giving the same tokens.

The same checkpoints (conftest: built with transformers and saved) and tolerance as test_model_parity.py:
max |Δ| ≤ 1e-5 × the reference's scale. Measured errors are printed (pytest -s).
"""

from __future__ import annotations

import threading

import fixtures_model as fm
import numpy as np
import pytest
import torch
from test_model_parity import TEXTS, _compare_all, _inputs

from kosmos2_ref import Kosmos2, fast, layers, primitives

TOL = 1e-5
GREEDY = dict(do_sample=False, num_beams=1, no_repeat_ngram_size=0)


@pytest.fixture(scope="module")
def tiny_ref(tiny_checkpoint):
    folder, hf = tiny_checkpoint
    return Kosmos2.from_pretrained(folder, reference=True), hf


@pytest.fixture
def no_fast(monkeypatch):
    """Every fast primitive refuses to run: a reference-mode call that reached one would fail."""

    def refuse(*args, **kwargs):
        raise AssertionError("a fast primitive ran in reference mode")

    for name in ("linear", "layer_norm", "gelu", "quick_gelu", "attention"):
        monkeypatch.setattr(fast, name, refuse)


def test_reference_mode_every_stage(tiny_ref, no_fast):
    ours, hf = tiny_ref
    assert ours.reference and "reference=True" in repr(ours)
    pv, ids, att, img = _inputs(64, TEXTS[:1])
    labels = ids.copy()
    labels[img == 1] = -100
    _compare_all(ours, hf, pv, ids, att, img, labels=labels, label="tiny, one prompt, reference primitives")


@pytest.mark.parametrize("side", ["right", "left"])
def test_reference_mode_padded_batch(tiny_ref, side, no_fast):
    ours, hf = tiny_ref
    pv, ids, att, img = _inputs(64, TEXTS, side=side, seed=3)
    labels = np.where(att == 1, ids, -100)
    _compare_all(ours, hf, pv, ids, att, img, labels=labels, label=f"tiny, batch 3, {side}-padded, reference")


def test_reference_mode_odd_heads(tiny_odd_checkpoint, no_fast):
    folder, hf = tiny_odd_checkpoint
    ours = Kosmos2.from_pretrained(folder, reference=True)
    pv, ids, att, img = _inputs(7, TEXTS[1:], side="left", seed=5, image_size=56)
    labels = np.where(att == 1, ids, -100)
    _compare_all(ours, hf, pv, ids, att, img, labels=labels, label="odd heads, Q=7, 56px, reference")


SAME_LEN = [[712, 1648, 9, 10, 43867], [64012, 712, 1648, 9, 4464], [5950, 597, 32, 646, 17772]]


def test_reference_mode_generates_transformers_tokens(lively_checkpoint):
    """Greedy decoding of a batch of three: the reference mode's tokens are transformers', and the fast mode's
    too; the per-step scores agree within the tolerance."""
    folder, hf = lively_checkpoint
    pv, ids, att, img = _inputs(64, SAME_LEN, side="left", seed=1)
    kw = dict(max_new_tokens=30, **GREEDY)
    runs = {}
    for reference in (True, False):
        out = fm.generate_with_scores(Kosmos2.from_pretrained(folder, reference=reference), pv, ids, att, img, **kw)
        runs[reference] = out.sequences, np.stack(out.scores)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # one tiny forward per token: torch's thread pool only adds overhead
    try:
        with torch.no_grad():
            hf_out = hf.generate(
                pixel_values=torch.from_numpy(pv),
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(att),
                image_embeds_position_mask=torch.from_numpy(img),
                return_dict_in_generate=True,
                output_scores=True,
                **kw,
            )
    finally:
        torch.set_num_threads(n)
    (seq_ref, sc_ref), (seq_fast, sc_fast) = runs[True], runs[False]
    print(f"\n[greedy, batch 3] new tokens of row 0: {seq_ref[0, ids.shape[1] :].tolist()}")
    assert np.array_equal(seq_ref, hf_out.sequences.numpy()), "reference mode: tokens differ from transformers"
    assert np.array_equal(seq_fast, seq_ref), "fast and reference modes give different tokens"
    assert len(set(seq_ref[0, ids.shape[1] :].tolist())) > 1  # the tokens do vary
    ref_scores = np.stack([s.float().numpy() for s in hf_out.scores])
    fin = np.isfinite(ref_scores)
    assert np.array_equal(fin, np.isfinite(sc_ref)) and np.array_equal(fin, np.isfinite(sc_fast))
    fm.check("reference-mode scores vs transformers", sc_ref[fin], ref_scores[fin], TOL)
    fm.check("fast-mode scores vs reference mode", sc_fast[fin], sc_ref[fin], TOL)


# --------------------------------------------------------------------------------------------------------------
# The switch


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("0", False), ("", False), ("off", False)])
def test_environment_variable_sets_the_default(tiny_checkpoint, monkeypatch, value, expected):
    folder, _ = tiny_checkpoint
    monkeypatch.setenv("KOSMOS2_REFERENCE", value)
    assert Kosmos2.from_pretrained(folder).reference is expected
    assert Kosmos2.from_pretrained(folder, reference=not expected).reference is (not expected)  # argument wins


def test_environment_variable_reaches_the_primitives(tiny_checkpoint, monkeypatch, no_fast):
    """KOSMOS2_REFERENCE=1 and no argument: the forward pass runs without touching a fast primitive."""
    folder, _ = tiny_checkpoint
    monkeypatch.setenv("KOSMOS2_REFERENCE", "1")
    model = Kosmos2.from_pretrained(folder)
    pv, ids, att, img = _inputs(64, TEXTS[:1])
    out = model(pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img)
    assert np.isfinite(out.logits).all()
    monkeypatch.setenv("KOSMOS2_REFERENCE", "0")
    with pytest.raises(AssertionError, match="a fast primitive ran"):
        Kosmos2.from_pretrained(folder)(
            pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img
        )


@pytest.mark.parametrize("bad", ["2", "maybe"])
def test_bad_switch_values_are_refused(tiny_checkpoint, monkeypatch, bad):
    folder, _ = tiny_checkpoint
    monkeypatch.setenv("KOSMOS2_REFERENCE", bad)
    with pytest.raises(ValueError, match="KOSMOS2_REFERENCE"):
        Kosmos2.from_pretrained(folder)
    monkeypatch.delenv("KOSMOS2_REFERENCE")
    with pytest.raises(ValueError, match="reference must be True, False or None"):
        Kosmos2.from_pretrained(folder, reference=bad)


def test_the_mode_is_per_thread():
    """A thread inside reference_mode does not switch another thread's primitives (nor the caller's after it)."""
    inside, seen = threading.Barrier(2), {}

    def worker():
        with primitives.reference_mode(True):
            seen["worker"] = primitives.in_reference_mode()
            inside.wait()  # the main thread looks while this one is in reference mode
            inside.wait()

    t = threading.Thread(target=worker)
    t.start()
    inside.wait()
    seen["main"] = primitives.in_reference_mode()
    x = np.ones((2, 4), np.float32)
    seen["main_impl"] = primitives._impl() is fast
    inside.wait()
    t.join()
    assert seen == {"worker": True, "main": False, "main_impl": True}
    with primitives.reference_mode():
        assert primitives._impl() is layers
        np.testing.assert_array_equal(primitives.linear(x, np.eye(4, dtype=np.float32)), x)
    assert not primitives.in_reference_mode()
