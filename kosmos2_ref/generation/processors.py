"""Logits processors (transformers' ``generation/logits_process.py``), each ``process(ids, scores) -> scores``.

ids [N, L] host int64: every token so far, prompt included; scores [N, V] float32 on the backend. A processor
returns a new array and leaves its input alone. :func:`build_processors` picks them for a call's settings, in
transformers' order.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from ..backend import get_xp, to_numpy
from ..layers import softmax
from .settings import GenerationSettings

Processor = Callable[[np.ndarray, object], object]


def host(a) -> np.ndarray:
    """A backend array (or scalar) as a plain host NumPy array: the one place device data comes home."""
    return np.asarray(to_numpy(a))


def log_softmax(x):
    """log softmax over the last axis, in float32: (x − max) − log Σ exp(x − max) (torch's formula)."""
    xp = get_xp(x)
    shifted = x - x.max(axis=-1, keepdims=True)  # [N, V]
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def _set_to_neg_inf(scores, rows: np.ndarray, cols: np.ndarray):
    """A copy of ``scores`` with the (row, col) pairs given as host index arrays set to −inf."""
    xp = get_xp(scores)
    out = scores.copy()
    if len(rows):
        out[xp.asarray(rows), xp.asarray(cols)] = -math.inf
    return out


def repetition_penalty_processor(penalty: float, skip: np.ndarray) -> Processor:
    """``RepetitionPenaltyLogitsProcessor``: each token already in a row, counted once, gets its score divided by
    ``penalty`` when positive and multiplied by it when negative. The first ``skip[n]`` positions of row n (its
    left padding; 5.x passes the same as ``prompt_ignore_length``) do not count."""

    def process(ids, scores):
        xp = get_xp(scores)
        N, L = ids.shape
        V = scores.shape[-1]
        counted = np.arange(L)[None, :] >= skip[:, None]  # [N, L]
        rows = np.broadcast_to(np.arange(N)[:, None], (N, L))[counted]
        pairs = np.unique(rows * V + ids[counted])  # each (row, token) once
        r, t = xp.asarray(pairs // V), xp.asarray(pairs % V)
        picked = scores[r, t]
        out = scores.copy()
        out[r, t] = xp.where(picked < 0, picked * penalty, picked / penalty)
        return out

    return process


def banned_ngram_tokens(seq: np.ndarray, n: int) -> np.ndarray:
    """The tokens that would complete an n-gram already present in ``seq`` [L] (``NoRepeatNGramLogitsProcessor``):
    every window of n tokens whose first n−1 equal the last n−1 tokens of ``seq`` bans its last token."""
    L = len(seq)
    if L < n:
        return np.zeros(0, np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(seq, n)  # [L-n+1, n]
    prefix = seq[L - n + 1 :]  # [n-1]
    hit = (windows[:, :-1] == prefix[None, :]).all(axis=1)
    return np.unique(windows[hit, -1])


def no_repeat_ngram_processor(n: int, skip: np.ndarray) -> Processor:
    """``NoRepeatNGramLogitsProcessor``: −inf for every token that would repeat an n-gram of the row.

    Row n's first ``skip[n]`` positions (left padding) are left out, so a padded row bans what it would ban alone;
    transformers includes the pads, which only matters if the pad id itself ends the sequence.
    """

    def process(ids, scores):
        rows, cols = [], []
        for b in range(ids.shape[0]):
            banned = banned_ngram_tokens(ids[b, skip[b] :], n)
            rows.append(np.full(len(banned), b, np.int64))
            cols.append(banned)
        return _set_to_neg_inf(scores, np.concatenate(rows), np.concatenate(cols))

    return process


def min_new_tokens_processor(prompt_length: int, min_new_tokens: int, eos: Sequence[int]) -> Processor:
    """``MinNewTokensLengthLogitsProcessor``: EOS gets −inf while fewer than ``min_new_tokens`` have been made."""

    def process(ids, scores):
        if ids.shape[1] - prompt_length >= min_new_tokens:
            return scores
        N = scores.shape[0]
        return _set_to_neg_inf(scores, np.repeat(np.arange(N), len(eos)), np.tile(np.asarray(eos), N))

    return process


def temperature_processor(temperature: float) -> Processor:
    """``TemperatureLogitsWarper``: scores / temperature."""

    def process(ids, scores):
        return scores / temperature

    return process


def top_k_processor(top_k: int, min_tokens_to_keep: int = 1) -> Processor:
    """``TopKLogitsWarper``: −inf below the k-th largest score (ties with it are kept)."""

    def process(ids, scores):
        xp = get_xp(scores)
        k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
        kth = -xp.partition(-scores, k - 1, axis=-1)[:, k - 1 : k]  # [N, 1] the k-th largest
        out = scores.copy()
        out[scores < kth] = -math.inf
        return out

    return process


def cumsum_f32(p, block: int = 256):
    """Cumulative sum over the last axis of [N, V] float32, summed in two levels (within blocks of ``block``,
    then across blocks) so the rounding error grows like (block + V/block)·eps instead of V·eps.

    Why: torch accumulates ``cumsum`` in double on CPU, so its nucleus boundary is that of the exact sum; a
    running float32 sum over 65037 probabilities drifts by ~5e-6 and moved the top-p cut by a token in up to 8 %
    of the rows of near-flat distributions (measured); the two-level sum drifts ~10× less and moved it in under
    1 %, without float64 arrays.
    """
    xp = get_xp(p)
    N, V = p.shape
    pad = (-V) % block
    if pad:
        p = xp.concatenate([p, xp.zeros((N, pad), dtype=p.dtype)], axis=1)
    inner = xp.cumsum(p.reshape(N, -1, block), axis=-1)  # [N, V/b, b] within blocks
    before = xp.cumsum(inner[:, :-1, -1], axis=-1)  # [N, V/b - 1] block totals
    offsets = xp.concatenate([xp.zeros((N, 1), dtype=p.dtype), before], axis=1)  # [N, V/b] mass before each
    return (inner + offsets[:, :, None]).reshape(N, -1)[:, :V]


def top_p_processor(top_p: float, min_tokens_to_keep: int = 1) -> Processor:
    """``TopPLogitsWarper`` (nucleus): sort ascending, and drop the tokens whose cumulative probability is
    <= 1 − top_p (the least likely ones), keeping at least ``min_tokens_to_keep``."""

    def process(ids, scores):
        xp = get_xp(scores)
        N, V = scores.shape
        order = xp.argsort(scores, axis=-1)  # [N, V] ascending (no kind=: older CuPy rejects it)
        cum = cumsum_f32(softmax(xp.take_along_axis(scores, order, axis=-1), axis=-1))
        drop_sorted = cum <= (1.0 - top_p)
        drop_sorted[:, V - min_tokens_to_keep :] = False
        drop = xp.empty_like(drop_sorted)
        drop[xp.arange(N)[:, None], order] = drop_sorted  # back to vocabulary order
        out = scores.copy()
        out[drop] = -math.inf
        return out

    return process


def build_processors(s: GenerationSettings, prompt_length: int, skip: np.ndarray) -> list[Processor]:
    """The processors of ``GenerationMixin._get_logits_processor``, in its order: repetition penalty,
    no-repeat-ngram, min-new-tokens; then, when sampling only, temperature, top-k, top-p.

    ``skip`` [N]: the left-padding length of each row. With beam sampling the warpers keep at least
    (number of EOS ids + 1) tokens, so a beam can always continue past an EOS.
    """
    procs: list[Processor] = []
    if s.repetition_penalty != 1.0:
        procs.append(repetition_penalty_processor(s.repetition_penalty, skip))
    if s.no_repeat_ngram_size > 0:
        procs.append(no_repeat_ngram_processor(s.no_repeat_ngram_size, skip))
    if s.min_new_tokens > 0 and s.eos_token_id:
        procs.append(min_new_tokens_processor(prompt_length, s.min_new_tokens, s.eos_token_id))
    if s.do_sample:
        keep = len(s.eos_token_id) + 1 if s.num_beams > 1 else 1
        if s.temperature != 1.0:
            procs.append(temperature_processor(s.temperature))
        if s.top_k != 0:
            procs.append(top_k_processor(s.top_k, keep))
        if s.top_p < 1.0:
            procs.append(top_p_processor(s.top_p, keep))
    return procs


def apply_processors(procs: Sequence[Processor], ids: np.ndarray, scores):
    """``scores`` [N, V] through each of ``procs`` in turn (ids [N, L]: the tokens so far)."""
    for p in procs:
        scores = p(ids, scores)
    return scores
