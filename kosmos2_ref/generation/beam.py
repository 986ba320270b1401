"""Beam search as transformers 5.23 runs it (``GenerationMixin._beam_search`` and its helpers
``_get_top_k_continuations``, ``_update_finished_beams``, ``_check_early_stop_heuristic``).

* Running beams carry cumulative log-softmax scores (float32); beam 0 starts at 0, the others at −1e9 so the
  first step expands one beam only.
* :func:`expand`: each step keeps the 2·num_beams best (beam, token) continuations of each input (sampled
  without replacement under ``do_sample``).
* :func:`keep_running`: the best num_beams that did not just finish (EOS, or the length limit) run on.
* :func:`keep_finished`: a continuation among the first num_beams that finishes becomes a hypothesis scored
  sum_logprobs / (new_length ** length_penalty), new_length = generated tokens including the EOS; the
  num_beams best hypotheses are kept.
* :func:`should_stop`: stop when no input can improve (with early_stopping="never" and length_penalty > 0 the
  best running score is judged at the maximum length), when every input holds num_beams hypotheses and
  early_stopping is True, or when every continuation finished.

Each input's best hypothesis is returned, all cut to the longest returned one (pad after EOS). The sequences and
scores live on the host ([B, K, L] and [B, K]); per step the host sees the 2·num_beams candidates of each input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import get_xp
from .processors import apply_processors, build_processors, host, log_softmax
from .search import initial_length, next_logits, prefill, with_room
from .settings import GenerateOutput, GenerationSettings, warn_past_trained_positions

# transformers' "very large negative" score for beams that must not be chosen (``_beam_search``: -1.0e9)
BEAM_NEG = -1.0e9


@dataclass
class Beams:
    """The state of a beam search over B inputs × K beams, on the host."""

    run_seq: np.ndarray  # [B, K, width] int64: the running beams' tokens (prompt included)
    run_scores: np.ndarray  # [B, K] float32: their cumulative log-probabilities
    done_seq: np.ndarray  # [B, K, width] int64: the kept hypotheses
    done_scores: np.ndarray  # [B, K] float32: their length-penalised scores (BEAM_NEG: an empty slot)
    done_flag: np.ndarray  # [B, K] bool: the slot holds a hypothesis
    done_len: np.ndarray  # [B, K] int64: generated tokens of each hypothesis
    improvable: np.ndarray  # [B] bool: transformers' is_early_stop_heuristic_unsatisfied
    att_all: np.ndarray  # [B·K, width] int64: the attention mask of every row (generated tokens: 1)


def start_beams(ids: np.ndarray, att: np.ndarray, K: int, width: int, fill: int) -> Beams:
    """K copies of each prompt (ids, att [B, T]) in buffers of ``width`` tokens; only beam 0 is live."""
    B, T = ids.shape
    run_seq = np.full((B, K, width), fill, np.int64)
    run_seq[:, :, :T] = ids[:, None, :]
    run_scores = np.zeros((B, K), np.float32)
    run_scores[:, 1:] = BEAM_NEG
    att_all = np.ones((B * K, width), np.int64)
    att_all[:, :T] = np.repeat(att, K, axis=0)
    return Beams(
        run_seq,
        run_scores,
        run_seq.copy(),
        np.full((B, K), BEAM_NEG, np.float32),
        np.zeros((B, K), bool),
        np.zeros((B, K), np.int64),
        np.ones(B, bool),
        att_all,
    )


def top_desc(values: np.ndarray, k: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k largest per row, in descending order; ties go to the lower index (or ``tiebreak``)."""
    tb = np.broadcast_to(np.arange(values.shape[1]), values.shape) if tiebreak is None else tiebreak
    return np.lexsort((tb, -values), axis=-1)[:, :k]


def top_candidates(acc, k: int, keys=None):
    """The k best of ``keys`` [B, M] (default ``acc``) on the backend -> host (indices [B, k], acc there [B, k]),
    best first. ``argpartition`` finds them without sorting all M = num_beams·V."""
    xp = get_xp(acc)
    keys = acc if keys is None else keys
    part = xp.argpartition(-keys, k - 1, axis=-1)[:, :k]  # [B, k] unordered
    # One download per step: the indices and both score arrays travel together as float64, which holds all of them
    # exactly (indices < num_beams·V < 2^53; float32 scores widen without rounding).
    home = host(
        xp.stack(
            [
                part.astype(xp.float64),
                xp.take_along_axis(keys, part, axis=-1).astype(xp.float64),
                xp.take_along_axis(acc, part, axis=-1).astype(xp.float64),
            ]
        )
    )  # [3, B, k]
    part_h = home[0].astype(np.int64)
    key_h = home[1].astype(keys.dtype)
    acc_h = home[2].astype(acc.dtype)
    order = top_desc(key_h, k, tiebreak=part_h)
    return np.take_along_axis(part_h, order, 1), np.take_along_axis(acc_h, order, 1)


def expand(beams: Beams, logp, kk: int, cur_len: int, fill: int, rng=None):
    """The kk best continuations of each input from the processed log-probabilities ``logp`` [B·K, V]: ->
    (their sequences [B, kk, width] with the new token at ``cur_len``, their scores [B, kk], parent beams [B, kk],
    tokens [B, kk]). With ``rng`` they are drawn without replacement ∝ softmax (the Gumbel-top-k trick)."""
    xp = get_xp(logp)
    B, K = beams.run_scores.shape
    V = logp.shape[-1]
    acc = (logp.reshape(B, K, V) + xp.asarray(beams.run_scores)[:, :, None]).reshape(B, K * V)
    keys = None
    if rng is not None:
        u = rng.random((B, K * V), dtype=np.float32) + np.float32(1e-20)  # (0, 1), never 1
        keys = acc + xp.asarray(-np.log(-np.log(u)))  # + Gumbel noise
    cand, cand_scores = top_candidates(acc, kk, keys)  # host [B, kk]
    parent, tok = cand // V, cand % V
    if cur_len >= beams.run_seq.shape[-1]:  # full: double the buffers
        beams.run_seq = with_room(beams.run_seq, cur_len + 1, fill)
        beams.att_all = with_room(beams.att_all, cur_len + 1, 1)
        beams.done_seq = with_room(beams.done_seq, cur_len + 1, fill)
    cand_seq = np.take_along_axis(beams.run_seq, parent[:, :, None], axis=1)  # [B, kk, width]
    cand_seq[:, :, cur_len] = tok
    return cand_seq, cand_scores, parent, tok


def keep_running(beams: Beams, cand_seq, cand_scores, parent, finished) -> np.ndarray:
    """The running beams of the next step: the best K candidates that did not finish. -> for each new row of
    the cache [B·K], the row it continues (for :meth:`KVCache.reorder`)."""
    B, K = beams.run_scores.shape
    alive = cand_scores + finished.astype(np.float32) * BEAM_NEG
    nxt = top_desc(alive, K)
    beams.run_seq = np.take_along_axis(cand_seq, nxt[:, :, None], axis=1)
    beams.run_scores = np.take_along_axis(alive, nxt, axis=1)
    return (np.arange(B)[:, None] * K + np.take_along_axis(parent, nxt, axis=1)).reshape(B * K)


def keep_finished(beams: Beams, cand_seq, cand_scores, finished, new_len: int, s: GenerationSettings) -> None:
    """Merge the candidates among the first K that just finished (length ``new_len``) into the kept hypotheses,
    keeping the K best of each input. None is added to an input that cannot improve, nor to a full one under
    early_stopping=True."""
    B, K = beams.done_scores.shape
    kk = cand_scores.shape[1]
    just_done = finished & (np.arange(kk) < K)[None, :]
    hyp = cand_scores / (new_len**s.length_penalty)
    full = beams.done_flag.all(axis=1, keepdims=True) & (s.early_stopping is True)
    for refused in (full, ~beams.improvable[:, None], ~just_done):  # each reason adds its −1e9, as transformers
        hyp = hyp + refused.astype(np.float32) * BEAM_NEG
    m_scores = np.concatenate([beams.done_scores, hyp], axis=1)  # [B, K + kk]
    keep = top_desc(m_scores, K)
    beams.done_seq = np.take_along_axis(np.concatenate([beams.done_seq, cand_seq], 1), keep[:, :, None], axis=1)
    beams.done_scores = np.take_along_axis(m_scores, keep, axis=1)
    beams.done_flag = np.take_along_axis(np.concatenate([beams.done_flag, just_done], 1), keep, axis=1)
    beams.done_len = np.take_along_axis(np.concatenate([beams.done_len, np.full((B, kk), new_len)], 1), keep, axis=1)


def should_stop(beams: Beams, finished, generated: int, s: GenerationSettings) -> bool:
    """After a step that made ``generated`` tokens: can a running beam still beat the worst kept hypothesis?
    Updates each input's ``improvable``; True when the search is over."""
    lp, es = s.length_penalty, s.early_stopping
    best_len = s.max_new_tokens if (es == "never" and lp > 0.0) else generated
    best_possible = beams.run_scores[:, :1] / (best_len**lp)  # [B, 1]
    worst_done = np.where(beams.done_flag, beams.done_scores.min(axis=1, keepdims=True), np.float32(BEAM_NEG))
    beams.improvable &= (best_possible > worst_done).any(axis=1)
    return not beams.improvable.any() or (beams.done_flag.all() and es is True) or finished.all()


def beam_search(model, s: GenerationSettings, ids, att, img, image_embeds, rng, output_scores) -> GenerateOutput:
    """Beam search (beam sampling with ``do_sample``) over host ids, att, img [B, T], checked: the loop of
    expand, keep the running beams, keep the finished ones, stop (this module's docstring)."""
    xp = model.xp
    B, T = ids.shape
    K = s.num_beams
    max_len = T + s.max_new_tokens
    width = initial_length(model, T, max_len)  # the buffers' length; they double when it is reached
    kk = max(2, 1 + len(s.eos_token_id)) * K  # candidates kept per input
    fill = s.pad_token_id if s.pad_token_id is not None else (s.eos_token_id[0] if s.eos_token_id else -1)
    eos = np.asarray(s.eos_token_id, np.int64)
    beams = start_beams(ids, att, K, width, fill)
    procs = build_processors(s, T, skip=np.repeat((att != 0).argmax(axis=1), K))  # skip: left padding
    # The prompt runs once per input; the cache is then copied to its K beams (rows b·K … b·K+K-1).
    cache, logits = prefill(model, ids, att, img, image_embeds, width)
    cache.reorder(np.repeat(np.arange(B), K))
    logits = xp.repeat(logits, K, axis=0)  # [B·K, V]
    scores_out = []
    cur_len = T
    while True:
        logp = apply_processors(procs, beams.run_seq.reshape(B * K, -1)[:, :cur_len], log_softmax(logits))
        if output_scores:
            scores_out.append(host(logp))
        cand_seq, cand_scores, parent, tok = expand(beams, logp, kk, cur_len, fill, rng if s.do_sample else None)
        finished = np.isin(tok, eos) | (cur_len + 1 >= max_len)  # [B, kk]
        beam_src = keep_running(beams, cand_seq, cand_scores, parent, finished)
        keep_finished(beams, cand_seq, cand_scores, finished, cur_len + 1 - T, s)
        cur_len += 1
        if should_stop(beams, finished, cur_len - T, s):
            break
        warn_past_trained_positions(model, cur_len, T)
        cache.reorder(beam_src)
        logits = next_logits(model, cache, beams.run_seq.reshape(B * K, -1), beams.att_all, cur_len - 1)
    out_len = T + int(beams.done_len[:, 0].max())
    return GenerateOutput(
        beams.done_seq[:, 0, :out_len].copy(),
        tuple(scores_out) if output_scores else None,
        beams.done_scores[:, 0].copy() if output_scores else None,
    )
