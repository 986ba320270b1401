"""Generation parity with transformers' ``Kosmos2ForConditionalGeneration.generate``
(docs/numerics.md §7).

Both sides read one saved random checkpoint and transformers runs in the same test. Sequences must be equal
token for token; the per-step processed scores must have the same −inf entries (banned tokens) and agree
elsewhere within float32 tolerance (max |Δ| ≤ 1e-5 × the reference's scale, printed). For each run the smallest
gap between the reference's two best scores is printed too: a near-tie would make equal sequences luck.

transformers 5.x ignores generation keys in config.json, so every call here passes it explicit settings
(do_sample, num_beams, no_repeat_ngram_size, …) and ours the same ones.
"""

from __future__ import annotations

import json
import shutil

import fixtures_model as fm
import numpy as np
import pytest
import torch

from kosmos2_ref import Kosmos2, to_numpy
from kosmos2_ref import generation as gen

TOL = 1e-5
GREEDY = dict(do_sample=False, num_beams=1, no_repeat_ngram_size=0)

# Prompts of equal length (so a batch needs no padding), and of different lengths (for left padding).
SAME_LEN = [[712, 1648, 9, 10, 43867], [64012, 712, 1648, 9, 4464], [5950, 597, 32, 646, 17772]]
MIXED_LEN = [[712, 1648, 9, 10, 43867, 12, 99], [64012, 712], [5950, 597, 32, 646]]


# --------------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Decoding runs one tiny forward per token: torch's thread pool only adds overhead there (5× on a loaded
    2-core machine, measured), so this module runs transformers on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lively(lively_checkpoint):
    folder, hf = lively_checkpoint
    return Kosmos2.from_pretrained(folder), hf, folder


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    folder, hf = tiny_checkpoint
    return Kosmos2.from_pretrained(folder), hf, folder


@pytest.fixture(scope="module")
def tiny_odd(tiny_odd_checkpoint):
    folder, hf = tiny_odd_checkpoint
    return Kosmos2.from_pretrained(folder), hf, folder


# --------------------------------------------------------------------------------------------------------------
# Helpers


def make_inputs(texts, num_image_tokens=64, side="left", seed=0, image_size=224):
    """pixel_values [B,3,S,S] (one random image per row), ids, attention mask, image mask (padded to one length)."""
    rows = [fm.image_prompt_ids(t, num_image_tokens) for t in texts]
    ids, att, img = fm.padded_batch(rows, side)
    pv = np.random.default_rng(seed).standard_normal((len(texts), 3, image_size, image_size)).astype(np.float32)
    return pv, ids, att, img


def hf_generate(hf, pv, ids, att, img, **kw):
    """transformers' generate -> (sequences [B, L] int64, scores list of [N, V] float32, sequences_scores)."""
    with torch.no_grad():
        out = hf.generate(
            pixel_values=torch.from_numpy(pv),
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(att),
            image_embeds_position_mask=torch.from_numpy(img),
            return_dict_in_generate=True,
            output_scores=True,
            **kw,
        )
    seq_scores = getattr(out, "sequences_scores", None)
    return (
        out.sequences.numpy(),
        [s.float().numpy() for s in out.scores],
        None if seq_scores is None else seq_scores.numpy(),
    )


def ours_generate(model, pv, ids, att, img, **kw):
    out = fm.generate_with_scores(model, pv, ids, att, img, **kw)
    return out.sequences, list(out.scores), out.sequences_scores


def nucleus_edge_only(a, b, tol=TOL, per_row=2):
    """True if every entry banned on one side only is at the top-p cut: the smallest score the other side kept
    (within tol), at most ``per_row`` of them per row. Such a token's cumulative probability equals 1 − top_p
    to float32 rounding, where the summation order (ours vs torch's) decides. a, b [..., V] processed scores."""
    diff = np.isneginf(a) != np.isneginf(b)
    if not diff.any():
        return True
    if diff.sum(axis=-1).max() > per_row:
        return False
    kept_min_a = np.where(np.isneginf(a), np.inf, a).min(axis=-1, keepdims=True)
    kept_min_b = np.where(np.isneginf(b), np.inf, b).min(axis=-1, keepdims=True)
    at_edge = np.where(np.isneginf(a), np.abs(b - kept_min_b), np.abs(a - kept_min_a)) <= tol * 10.0
    return bool(at_edge[diff].all())


def compare_scores(label, ours_scores, ref_scores, tol=TOL, top_p_edge=False):
    """Same number of steps, same −inf entries, finite entries within tol; returns max |Δ|.

    ``top_p_edge``: a token exactly at the nucleus cut may be banned on one side only (:func:`nucleus_edge_only`).
    """
    assert len(ours_scores) == len(ref_scores), f"{label}: {len(ours_scores)} steps != {len(ref_scores)}"
    a = np.stack(ours_scores)  # [steps, N, V]
    b = np.stack(ref_scores)
    assert a.shape == b.shape and a.dtype == np.float32
    banned = np.isneginf(b)
    edge = np.isneginf(a) != banned
    if top_p_edge and edge.any():
        print(f"  {label}: {int(edge.sum())} token(s) at the top-p cut banned on one side only")
        assert nucleus_edge_only(a, b, tol), f"{label}: banned entries differ away from the top-p cut"
    else:
        assert not edge.any(), f"{label}: the banned (−inf) entries differ ({int(edge.sum())})"
    banned |= edge
    err = fm.check(f"{label}: scores ({len(a)} steps, {int(banned.sum())} banned)", a[~banned], b[~banned], tol)
    top2 = np.partition(np.where(banned, -np.inf, b), -2, axis=-1)[..., -2:]  # [..., 2]: 2nd best, best
    gap = float(np.min(top2[..., 1] - top2[..., 0]))
    print(f"  {label + ': reference top-2 gap':<42s} min = {gap:.3e}")
    return err


def compare_runs(label, ours, ref, tol=TOL, top_p_edge=False):
    """Equal sequences and matching scores (and beam sequences_scores when present)."""
    seq, scores, seq_scores = ours
    rseq, rscores, rseq_scores = ref
    print(f"\n[{label}] sequences {rseq.shape}, new tokens of row 0: {rseq[0, -len(rscores) :].tolist()}")
    assert seq.dtype == np.int64
    assert seq.shape == rseq.shape and np.array_equal(seq, rseq), (
        f"{label}: sequences differ\n ours {seq[:, -len(scores) :].tolist()}\n ref  {rseq[:, -len(rscores) :].tolist()}"
    )
    err = compare_scores(label, scores, rscores, tol, top_p_edge)
    if rseq_scores is not None:
        fm.check(f"{label}: sequences_scores", seq_scores, rseq_scores, tol)
    return err


# --------------------------------------------------------------------------------------------------------------
# Greedy


@pytest.mark.parametrize("which", ["lively", "tiny"])
def test_greedy_batch_matches_transformers(which, request):
    """A batch of three prompts with different images: equal sequences (EOS and pad-after-EOS on ``lively``)."""
    ours, hf, _ = request.getfixturevalue(which)
    pv, ids, att, img = make_inputs(SAME_LEN, seed=1)
    assert att.all()
    ref = hf_generate(hf, pv, ids, att, img, max_new_tokens=30, **GREEDY)
    run = ours_generate(ours, pv, ids, att, img, max_new_tokens=30, **GREEDY)
    compare_runs(f"greedy {which}, batch 3", run, ref)
    if which == "lively":  # rows end at different steps: the early ones are padded after their EOS
        ends = [(r[ids.shape[1] :] == 2).argmax() for r in ref[0]]
        assert len(set(ends)) > 1 and (ref[0][:, ids.shape[1] :] == 2).any(axis=1).all(), ends


@pytest.mark.parametrize("text,seed", [(MIXED_LEN[0], 2), (MIXED_LEN[1], 3), ([4, 5, 6], 4), ([], 5)])
def test_greedy_single_prompts_match_transformers(lively, text, seed):
    ours, hf, _ = lively
    pv, ids, att, img = make_inputs([text], seed=seed)
    compare_runs(
        f"greedy, prompt {text}",
        ours_generate(ours, pv, ids, att, img, max_new_tokens=24, **GREEDY),
        hf_generate(hf, pv, ids, att, img, max_new_tokens=24, **GREEDY),
    )


def test_greedy_odd_heads_small_image(tiny_odd):
    ours, hf, _ = tiny_odd
    pv, ids, att, img = make_inputs(SAME_LEN[:2], num_image_tokens=7, seed=6, image_size=56)
    kw = dict(max_new_tokens=12, **GREEDY)
    compare_runs(
        "greedy tiny_odd", ours_generate(ours, pv, ids, att, img, **kw), hf_generate(hf, pv, ids, att, img, **kw)
    )


def test_generation_past_the_sinusoid_table(tiny_odd):
    """tiny_odd has max_position_embeddings 32, so transformers' table starts with 34 rows and must grow while
    decoding; ours computes rows directly. 40 forced new tokens take positions well past row 34."""
    ours, hf, _ = tiny_odd
    pv, ids, att, img = make_inputs([SAME_LEN[0]], num_image_tokens=7, seed=7, image_size=56)
    table_rows = ours.config.text_config.max_position_embeddings + 2
    first_rows = hf.text_model.model.embed_positions.weights.shape[0]
    kw = dict(max_new_tokens=40, min_new_tokens=40, **GREEDY)
    run = ours_generate(ours, pv, ids, att, img, **kw)
    ref = hf_generate(hf, pv, ids, att, img, **kw)
    last_position = run[0].shape[1] + 1  # positions are 2 … T+1 without padding
    print(
        f"\n  table rows at start {first_rows} (= {table_rows}), last position used {last_position}, "
        f"transformers' table now {hf.text_model.model.embed_positions.weights.shape[0]} rows"
    )
    assert first_rows <= table_rows and last_position > table_rows
    compare_runs("past the sinusoid table", run, ref)


# --------------------------------------------------------------------------------------------------------------
# Beam search

BEAM_CASES = [
    dict(num_beams=3, length_penalty=1.0, early_stopping=False),
    dict(num_beams=4, length_penalty=1.0, early_stopping=True),
    dict(num_beams=3, length_penalty=2.0, early_stopping="never"),
    dict(num_beams=4, length_penalty=-0.5, early_stopping=False),
    dict(num_beams=4, length_penalty=0.0, early_stopping="never"),
    dict(num_beams=3, length_penalty=0.7, early_stopping=True, min_new_tokens=18),
    dict(num_beams=4, length_penalty=1.5, early_stopping=False, min_new_tokens=10),
]


@pytest.mark.parametrize("case", BEAM_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_beam_search_matches_transformers(lively, case):
    ours, hf, _ = lively
    pv, ids, att, img = make_inputs(SAME_LEN[:2], seed=8)
    kw = dict(max_new_tokens=26, do_sample=False, no_repeat_ngram_size=0, **case)
    compare_runs(f"beam {case}", ours_generate(ours, pv, ids, att, img, **kw), hf_generate(hf, pv, ids, att, img, **kw))


EDGE_CASES = [
    dict(max_new_tokens=1, num_beams=1),
    dict(max_new_tokens=1, num_beams=3),
    dict(max_new_tokens=20, num_beams=1, eos_token_id=[2, 18707]),
    dict(max_new_tokens=20, num_beams=3, eos_token_id=[2, 18707]),  # 3·num_beams candidates with 2 EOS ids
]


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_one_token_and_several_eos_ids_match_transformers(lively, case):
    ours, hf, _ = lively
    pv, ids, att, img = make_inputs(SAME_LEN[:2], seed=8)
    kw = dict(do_sample=False, no_repeat_ngram_size=0, **case)
    compare_runs(f"{case}", ours_generate(ours, pv, ids, att, img, **kw), hf_generate(hf, pv, ids, att, img, **kw))


def test_beam_search_to_the_length_limit(tiny):
    """On the looping tiny model no beam emits EOS: every hypothesis ends at max_new_tokens."""
    ours, hf, _ = tiny
    pv, ids, att, img = make_inputs(SAME_LEN[1:], seed=9)
    kw = dict(max_new_tokens=15, do_sample=False, num_beams=3, no_repeat_ngram_size=2)
    compare_runs(
        "beam to max length, 2-gram ban",
        ours_generate(ours, pv, ids, att, img, **kw),
        hf_generate(hf, pv, ids, att, img, **kw),
    )


# --------------------------------------------------------------------------------------------------------------
# Logits processors


@pytest.mark.parametrize("num_beams", [1, 3])
def test_no_repeat_ngram_3_matches_transformers(tiny, num_beams):
    """The tiny model loops on one token; a 3-gram ban forces it off the loop again and again."""
    ours, hf, _ = tiny
    pv, ids, att, img = make_inputs(SAME_LEN[:2], seed=10)
    kw = dict(max_new_tokens=25, do_sample=False, num_beams=num_beams, no_repeat_ngram_size=3)
    run = ours_generate(ours, pv, ids, att, img, **kw)
    compare_runs(f"no_repeat_ngram_size=3, beams {num_beams}", run, hf_generate(hf, pv, ids, att, img, **kw))
    for row in run[0]:  # and indeed no trigram repeats
        grams = [tuple(row[i : i + 3]) for i in range(len(row) - 2)]
        assert len(grams) == len(set(grams))


@pytest.mark.parametrize(
    "kw",
    [dict(repetition_penalty=1.8), dict(repetition_penalty=0.6), dict(repetition_penalty=1.3, no_repeat_ngram_size=2)],
)
def test_repetition_penalty_matches_transformers(tiny, kw):
    ours, hf, _ = tiny
    pv, ids, att, img = make_inputs(SAME_LEN, seed=11)
    kw = dict(max_new_tokens=20, do_sample=False, num_beams=1, **{"no_repeat_ngram_size": 0, **kw})
    compare_runs(f"{kw}", ours_generate(ours, pv, ids, att, img, **kw), hf_generate(hf, pv, ids, att, img, **kw))


def test_min_new_tokens_matches_transformers(lively):
    """EOS is banned (−inf in the scores) for the first 20 steps, then allowed; the rows end later."""
    ours, hf, _ = lively
    pv, ids, att, img = make_inputs(SAME_LEN, seed=1)
    kw = dict(max_new_tokens=40, min_new_tokens=20, **GREEDY)
    run = ours_generate(ours, pv, ids, att, img, **kw)
    compare_runs("min_new_tokens=20", run, hf_generate(hf, pv, ids, att, img, **kw))
    scores = np.stack(run[1])
    assert np.isneginf(scores[:20, :, 2]).all() and np.isfinite(scores[20:, :, 2]).all()


SAMPLING_CASES = [
    dict(temperature=0.7, top_k=20, top_p=0.9),
    dict(temperature=1.3, top_k=0, top_p=0.5),
    dict(temperature=1.0, top_k=5, top_p=1.0),
    dict(temperature=0.05, top_k=50, top_p=0.95, repetition_penalty=1.2),
]


@pytest.mark.parametrize("case", SAMPLING_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sampling_processed_scores_match_transformers(lively, case, monkeypatch):
    """Random draws cannot match (torch.multinomial vs NumPy), so our draw is replaced by a replay of the
    tokens transformers drew; everything else (processors, decoding, EOS handling) is ours. The processed scores
    (temperature, top-k, top-p, repetition penalty) must then match step for step, −inf entries included."""
    ours, hf, _ = lively
    pv, ids, att, img = make_inputs(SAME_LEN[:2], seed=12)
    kw = dict(max_new_tokens=20, do_sample=True, num_beams=1, no_repeat_ngram_size=0, **case)
    torch.manual_seed(0)
    ref = hf_generate(hf, pv, ids, att, img, **kw)
    T = ids.shape[1]
    drawn = iter(ref[0][:, T:].T)  # the tokens transformers drew, step by step

    def replay(scores, rng):
        tok = next(drawn).astype(np.int64)
        s = to_numpy(scores)  # on the host (the scores live on the GPU under KOSMOS2_BACKEND=cupy)
        alive = np.asarray([np.isfinite(s[i, t]) for i, t in enumerate(tok)])
        assert alive[tok != 1].all(), "transformers drew a token our processors removed"
        return tok

    monkeypatch.setattr(gen.search, "sample_next_tokens", replay)  # the loop reads it there
    compare_runs(f"sampling {case}", ours_generate(ours, pv, ids, att, img, **kw), ref, top_p_edge=True)


def test_beam_sampling_first_step_matches_transformers(lively):
    """Beam sampling: the warpers keep ≥ 2 tokens (EOS + 1). Step 0 (before any draw) must match."""
    ours, hf, _ = lively
    pv, ids, att, img = make_inputs(SAME_LEN[:1], seed=13)
    kw = dict(
        max_new_tokens=5, do_sample=True, num_beams=3, temperature=0.8, top_k=1, top_p=0.9, no_repeat_ngram_size=0
    )
    torch.manual_seed(0)
    ref = hf_generate(hf, pv, ids, att, img, **kw)
    run = ours_generate(ours, pv, ids, att, img, seed=0, **kw)
    print()
    compare_scores("beam sampling, step 0", run[1][:1], ref[1][:1])
    assert (np.isfinite(run[1][0]).sum(axis=-1) == 2).all()  # top_k=1 widened to 2 tokens per beam


# --------------------------------------------------------------------------------------------------------------
# Left padding: pad-aware positions (ours, transformers 4.37) vs past_length + 2 (transformers 5.x),
# docs/numerics.md §7.3


def test_left_padded_batch_generates_each_row_alone_unlike_transformers_5(lively):
    ours, hf, _ = lively
    pv, ids, att, img = make_inputs(MIXED_LEN, side="left", seed=14)
    kw = dict(max_new_tokens=16, min_new_tokens=16, **GREEDY)
    batch = ours_generate(ours, pv, ids, att, img, **kw)
    hf_batch = hf_generate(hf, pv, ids, att, img, **kw)
    T = ids.shape[1]
    hf_diffs = []
    for b, text in enumerate(MIXED_LEN):
        p = int((att[b] == 0).sum())
        _, ids1, att1, img1 = make_inputs([text])
        pv1 = pv[b : b + 1]
        alone = hf_generate(hf, pv1, ids1, att1, img1, **kw)  # transformers, this row unpadded
        ours_row = (batch[0][b : b + 1, p:], [s[b : b + 1] for s in batch[1]], None)
        compare_runs(f"ours padded row {b} ({p} pads) vs transformers alone", ours_row, alone)
        # transformers 5.x on the padded batch: the same prefill, then positions shifted by p
        hf_row = np.stack([s[b] for s in hf_batch[1]])
        alone_row = np.stack([s[0] for s in alone[1]])
        finite = np.isfinite(alone_row)  # EOS is −inf in both (min_new_tokens)
        diff = float(np.max(np.abs(hf_row[finite] - alone_row[finite])))
        print(f"  transformers 5.x, padded row {b} vs alone: max|Δscores| = {diff:.3e}")
        hf_diffs.append((p, diff))
        assert np.array_equal(batch[0][b, :p], np.ones(p, np.int64))  # the pads stay in front
    for p, diff in hf_diffs:
        assert (diff > 1e-3) if p > 0 else (diff < 1e-4), hf_diffs
    assert batch[0].shape[1] == T + 16


# --------------------------------------------------------------------------------------------------------------
# Defaults from the checkpoint (docs/numerics.md §7.4)


def test_defaults_come_from_the_checkpoint(tiny, tmp_path):
    """text_config.no_repeat_ngram_size (as the released config.json has it) and generation_config.json's
    max_new_tokens are honoured with no arguments; transformers 5.x needs them passed explicitly. Explicit
    arguments win over the checkpoint."""
    _, hf, folder = tiny
    ck = tmp_path / "ckpt"
    shutil.copytree(folder, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["text_config"].update(no_repeat_ngram_size=3, max_length=20)  # 4.x-era keys, as in the released file
    (ck / "config.json").write_text(json.dumps(cfg))
    gcfg = json.loads((ck / "generation_config.json").read_text())
    gcfg["max_new_tokens"] = 14
    (ck / "generation_config.json").write_text(json.dumps(gcfg))
    ours = Kosmos2.from_pretrained(ck)
    pv, ids, att, img = make_inputs(SAME_LEN[:1], seed=15)
    run = ours_generate(ours, pv, ids, att, img)
    compare_runs(
        "checkpoint defaults (3-gram ban, 14 tokens)",
        run,
        hf_generate(hf, pv, ids, att, img, max_new_tokens=14, do_sample=False, num_beams=1, no_repeat_ngram_size=3),
    )
    run0 = ours_generate(ours, pv, ids, att, img, no_repeat_ngram_size=0, max_new_tokens=6)
    compare_runs("explicit arguments win", run0, hf_generate(hf, pv, ids, att, img, max_new_tokens=6, **GREEDY))


# --------------------------------------------------------------------------------------------------------------
# Full size (called from tests/parity/test_full_size.py with its shared full-size fixture)


def full_size_greedy_check(
    ours_model,
    hf_model,
    pixel_values,
    input_ids,
    attention_mask,
    image_embeds_position_mask,
    max_new_tokens: int = 8,
    tol: float = 2e-5,
):
    """Greedy decoding of the full-size model equals transformers': sequences token for token, scores within
    ``tol`` × scale. Ours runs the batch as given; each row is compared with transformers on that row alone with
    its left padding removed (pad-aware positions: a padded row must generate what it generates alone; on
    unpadded rows transformers 5.x agrees). Returns the max |Δ| of the scores."""
    pv = np.asarray(pixel_values, np.float32)
    ids, att, img = (np.asarray(a, np.int64) for a in (input_ids, attention_mask, image_embeds_position_mask))
    kw = dict(max_new_tokens=max_new_tokens, **GREEDY)
    seq, scores, _ = ours_generate(ours_model, pv, ids, att, img, **kw)
    worst = 0.0
    for b in range(ids.shape[0]):
        p = int(np.argmax(att[b] != 0))
        ref = hf_generate(hf_model, pv[b : b + 1], ids[b : b + 1, p:], att[b : b + 1, p:], img[b : b + 1, p:], **kw)
        mine = (seq[b : b + 1, p:], [s[b : b + 1] for s in scores], None)
        worst = max(worst, compare_runs(f"full size greedy, row {b} ({p} pads)", mine, ref, tol))
    return worst
