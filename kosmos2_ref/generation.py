"""Decoding with a KV cache: greedy search, multinomial sampling and beam search, the logits processors, streaming.

Mirrors transformers 5.23 as ``Kosmos2ForConditionalGeneration.generate`` reaches it (docs/numerics.md §7): the
loops of ``generation/utils.py`` (``GenerationMixin._sample``, ``_beam_search`` and its helpers
``_get_top_k_continuations``, ``_update_finished_beams``, ``_check_early_stop_heuristic``), the processors of
``generation/logits_process.py`` and the streamer protocol of ``generation/streamers.py``. docs/generation.md
explains the choices.

How a call runs. The image is encoded once. The prompt is run once (the *prefill*) into a :class:`KVCache` sized
for prompt + ``max_new_tokens``, or for the positions the model was trained on when that is less
(:func:`initial_length`: the buffers then double as the tokens come, so an early EOS costs nothing of a huge
``max_new_tokens``); each later step feeds one token per row with ``logits_to_keep=1``. The last
position's logits [N, V] go through the processors, then a token is chosen. Arrays stay on the backend (``xp``);
the host sees the chosen ids each step ([N] ints; for beams the 2·num_beams candidates per input) and, only when
``output_scores`` is asked for, the processed scores. Bookkeeping (sequences, beam scores) lives on the host.

One deliberate difference from transformers 5.x (docs/numerics.md §7.3): positions while decoding are
*pad-aware*, the 4.37 behaviour. The token fed at a step gets position 1 + (number of non-pad ids so far,
itself included), so a left-padded row decodes exactly as it would alone. 5.x uses past_length + 2, which shifts
a left-padded row by its pad count. Both agree on rows without padding.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .backend import get_xp, to_numpy
from .checks import is_int, is_real
from .layers import softmax
from .model import _as_array, _host_int_array
from .text import position_ids_from_input_ids

# transformers' "very large negative" score for beams that must not be chosen (``_beam_search``: -1.0e9)
BEAM_NEG = -1.0e9
# transformers' default when neither the call nor the checkpoint sets a length: 20 new tokens
# (``_prepare_generated_length``: "by default let's always generate 20 new tokens")
DEFAULT_MAX_NEW_TOKENS = 20

# GenerationConfig defaults of transformers 5.23 (``GenerationConfig._get_default_generation_params``)
HF_DEFAULTS = {"min_new_tokens": 0, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
               "num_beams": 1, "length_penalty": 1.0, "early_stopping": False, "no_repeat_ngram_size": 0,
               "repetition_penalty": 1.0}
GENERATION_KEYS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_beams",
                   "length_penalty", "early_stopping", "no_repeat_ngram_size", "repetition_penalty", "eos_token_id",
                   "pad_token_id")


# ==============================================================================================================
# Outputs and settings

@dataclass
class GenerateOutput:
    """What ``generate(..., return_dict_in_generate=True)`` returns (transformers' ``GenerateDecoderOnlyOutput`` /
    ``GenerateBeamDecoderOnlyOutput`` field names)."""

    sequences: np.ndarray                       # [B, T + new] int64: prompt + new tokens, pad after EOS
    scores: tuple | None = None                 # per step [B·num_beams, V] float32 processed scores (output_scores)
    sequences_scores: np.ndarray | None = None  # beam search: [B] the returned hypotheses' final scores


@dataclass(frozen=True)
class GenerationSettings:
    """The resolved decoding settings of one call (explicit argument > checkpoint > transformers default)."""

    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    no_repeat_ngram_size: int
    repetition_penalty: float
    eos_token_id: tuple[int, ...]
    pad_token_id: int | None


def checkpoint_generation_defaults(model) -> dict:
    """The generation settings a checkpoint carries (docs/numerics.md §7.4).

    Read from the generation keys of ``config.json``'s ``text_config`` (where the released checkpoint keeps
    ``no_repeat_ngram_size = 3``, as the original demo used; transformers 5.x drops them, 4.x honoured them), then
    ``generation_config.json``, which wins where both set a key. ``max_length`` is read from
    ``generation_config.json`` only: a ``max_length: 20`` in an old ``text_config`` is a serialised default, which
    no image prompt (≥ 67 tokens) fits (one in generation_config.json that leaves no room is replaced by the
    default 20 new tokens, with a warning: :func:`_new_tokens_from_max_length`).
    """
    tc = model.config.text_config
    d = {"eos_token_id": tc.eos_token_id, "pad_token_id": tc.pad_token_id}
    d.update({k: v for k, v in tc.extra.items() if k in GENERATION_KEYS and v is not None})
    gen = model.generation_config or {}
    d.update({k: v for k, v in gen.items() if k in GENERATION_KEYS + ("max_length",) and v is not None})
    return d


def _as_eos(v, vocab_size: int) -> tuple[int, ...]:
    if v is None:
        return ()
    ids = [v] if is_int(v) else list(v) if isinstance(v, (list, tuple, np.ndarray)) else None
    if ids is None or not all(is_int(i) and 0 <= i < vocab_size for i in ids):
        raise ValueError(f"eos_token_id must be a token id or a list of ids in [0, {vocab_size - 1}], got {v!r}")
    return tuple(int(i) for i in ids)


def setting_source(model, name: str) -> str | None:
    """The file a checkpoint's generation setting ``name`` is read from (as :func:`checkpoint_generation_defaults`
    reads it: generation_config.json wins over config.json's text_config), or None when neither sets it."""
    folder = getattr(model, "folder", None)
    where = (lambda file: str(folder / file)) if folder is not None else (lambda file: file)
    if (model.generation_config or {}).get(name) is not None:
        return where("generation_config.json")
    tc = model.config.text_config
    if tc.extra.get(name) is not None or name in ("eos_token_id", "pad_token_id"):
        return where("config.json") + " (its text_config)"
    return None


def _new_tokens_from_max_length(max_length, prompt_length: int) -> int:
    """New tokens for a checkpoint's ``max_length``: a total length, the prompt included, as in transformers.

    Old checkpoints serialise the default ``max_length: 20``, which no image prompt (>= 67 tokens) fits. transformers
    5.23 generates Kosmos-2 through its text model, whose generation config never reads generation_config.json, so
    on such a checkpoint it generates its default 20 new tokens (and warns about relying on a default). We do the
    same, with a warning that says why; a ``max_length`` that leaves room is honoured as a total.
    """
    if not is_int(max_length) or max_length < 1:
        raise ValueError(f"generation_config.json sets max_length={max_length!r}: expected a positive integer (the "
                         f"total length, prompt included)")
    if max_length > prompt_length:
        return max_length - prompt_length
    warnings.warn(f"generation_config.json sets max_length={max_length}, a total length that leaves no room after "
                  f"the {prompt_length}-token prompt; generating transformers' default {DEFAULT_MAX_NEW_TOKENS} new "
                  f"tokens instead, as transformers does on this checkpoint. Pass max_new_tokens to choose",
                  UserWarning, stacklevel=6)
    return DEFAULT_MAX_NEW_TOKENS


def resolve_settings(model, prompt_length: int, **explicit) -> GenerationSettings:
    """Merge explicit arguments (those not None) over :func:`checkpoint_generation_defaults` over transformers'
    defaults, and validate them: a bad value raises ValueError naming the argument, and the file it was read
    from when it was not an argument."""
    picked: list[str] = []          # the settings in the order they are read; each is checked once read
    try:
        return _resolve_settings(model, prompt_length, explicit, picked)
    except ValueError as err:
        name = picked[-1] if picked else None
        source = setting_source(model, name) if name and explicit.get(name) is None else None
        if source is None:
            raise
        raise ValueError(f"{err} (read from {source})") from None


def _resolve_settings(model, prompt_length: int, explicit: dict, picked: list) -> GenerationSettings:
    unknown = set(explicit) - set(GENERATION_KEYS)
    if unknown:
        raise TypeError(f"unknown generation settings {sorted(unknown)}")
    ckpt = checkpoint_generation_defaults(model)

    def pick(name):
        picked.append(name)
        if explicit.get(name) is not None:
            return explicit[name]
        return ckpt.get(name, HF_DEFAULTS.get(name))

    vocab = model.config.text_config.vocab_size
    max_new = pick("max_new_tokens")
    if max_new is None and "max_length" in ckpt:          # generation_config.json's total length
        max_new = _new_tokens_from_max_length(ckpt["max_length"], prompt_length)
    if max_new is None:
        max_new = DEFAULT_MAX_NEW_TOKENS
    if not is_int(max_new) or max_new < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new!r}")
    min_new = pick("min_new_tokens")
    if not is_int(min_new) or min_new < 0:
        raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new!r}")
    num_beams = pick("num_beams")
    if not is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    do_sample = pick("do_sample")
    if not isinstance(do_sample, (bool, np.bool_)):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    temperature = pick("temperature")
    if not is_real(temperature) or not math.isfinite(temperature) or (do_sample and temperature <= 0):
        raise ValueError(f"temperature must be a number > 0 when sampling (do_sample=True), got {temperature!r}; "
                         f"for greedy decoding set do_sample=False")
    top_k = pick("top_k")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    top_p = pick("top_p")
    if not is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    rep = pick("repetition_penalty")
    if not is_real(rep) or not math.isfinite(rep) or rep <= 0:
        raise ValueError(f"repetition_penalty must be a number > 0 (1.0 = none), got {rep!r}")
    ngram = pick("no_repeat_ngram_size")
    if not is_int(ngram) or ngram < 0:
        raise ValueError(f"no_repeat_ngram_size must be an integer >= 0 (0 disables it), got {ngram!r}")
    lp = pick("length_penalty")
    if not is_real(lp) or not math.isfinite(lp):
        raise ValueError(f"length_penalty must be a finite number, got {lp!r}")
    es = pick("early_stopping")
    if es is not True and es is not False and es != "never":
        raise ValueError(f"early_stopping must be True, False or 'never', got {es!r}")
    eos = _as_eos(pick("eos_token_id"), vocab)
    pad = pick("pad_token_id")
    if pad is not None and (not is_int(pad) or not 0 <= pad < vocab):
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab - 1}], got {pad!r}")
    if pad is None and eos:
        pad = eos[0]            # transformers does the same (with a warning): finished rows need a filler
    return GenerationSettings(int(max_new), int(min_new), bool(do_sample), float(temperature), int(top_k),
                              float(top_p), int(num_beams), float(lp), es, int(ngram), float(rep), eos,
                              None if pad is None else int(pad))


# ==============================================================================================================
# Warnings where transformers warns (GenerationConfig.validate, MaxLengthCriteria)

# settings that only one decoding mode reads, with the value that changes nothing
SAMPLING_ONLY = (("temperature", 1.0), ("top_p", 1.0), ("top_k", 50))
BEAM_ONLY = (("early_stopping", False), ("length_penalty", 1.0))


def _should_warn(mode_switch: str, name: str, user_set: set) -> bool:
    """transformers' rule: stay quiet about a setting inherited from the checkpoint when the caller chose the
    mode explicitly (do_sample=False with a temperature from generation_config.json is harmless)."""
    return not (mode_switch in user_set and name not in user_set)


def warn_ignored_settings(s: GenerationSettings, user_set: set) -> None:
    """One UserWarning naming the settings this call ignores: sampling settings under greedy decoding or plain
    beam search, beam settings with one beam (as ``GenerationConfig.validate`` warns). ``user_set``: the names the
    caller passed."""
    ignored = []
    if not s.do_sample:
        ignored += [f"{name}={getattr(s, name)!r}" for name, neutral in SAMPLING_ONLY
                    if getattr(s, name) != neutral and _should_warn("do_sample", name, user_set)]
    if s.num_beams == 1:
        ignored += [f"{name}={getattr(s, name)!r}" for name, neutral in BEAM_ONLY
                    if getattr(s, name) != neutral and _should_warn("num_beams", name, user_set)]
    if ignored:
        warnings.warn(f"generate ignores {', '.join(ignored)}: temperature, top_p and top_k are used only when "
                      f"sampling (do_sample=True), early_stopping and length_penalty only by beam search "
                      f"(num_beams > 1); set the mode that uses them, or leave them unset", UserWarning, stacklevel=4)


def warn_past_trained_positions(model, cur_len: int, prompt_length: int) -> None:
    """A UserWarning, once per call, when the sequence first grows past ``max_position_embeddings`` while decoding
    goes on (transformers' MaxLengthCriteria reminder). The sinusoidal positions go on, but the model never saw
    them in training."""
    trained = model.config.text_config.max_position_embeddings
    if cur_len == max(trained, prompt_length) + 1:
        warnings.warn(f"generate: the sequence ({cur_len} tokens) is now longer than the {trained} positions the "
                      f"model was trained on (max_position_embeddings); the text may degrade from here",
                      UserWarning, stacklevel=5)


# ==============================================================================================================
# Logits processors: each is ``process(ids, scores) -> scores`` (transformers' ``LogitsProcessor.__call__``).
# ids [N, L] host int64: every token so far, prompt included; scores [N, V] float32 on the backend. A processor
# returns a new array and leaves its input alone.

Processor = Callable[[np.ndarray, object], object]


def _host(a) -> np.ndarray:
    """A backend array (or scalar) as a plain host NumPy array: the one place device data comes home."""
    return np.asarray(to_numpy(a))


def log_softmax(x):
    """log softmax over the last axis, in float32: (x − max) − log Σ exp(x − max) (torch's formula)."""
    xp = get_xp(x)
    shifted = x - x.max(axis=-1, keepdims=True)                          # [N, V]
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
        counted = np.arange(L)[None, :] >= skip[:, None]                          # [N, L]
        rows = np.broadcast_to(np.arange(N)[:, None], (N, L))[counted]
        pairs = np.unique(rows * V + ids[counted])                                 # each (row, token) once
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
    windows = np.lib.stride_tricks.sliding_window_view(seq, n)                    # [L-n+1, n]
    prefix = seq[L - n + 1:]                                                       # [n-1]
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
            banned = banned_ngram_tokens(ids[b, skip[b]:], n)
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
        kth = -xp.partition(-scores, k - 1, axis=-1)[:, k - 1:k]                 # [N, 1] the k-th largest
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
    inner = xp.cumsum(p.reshape(N, -1, block), axis=-1)                           # [N, V/b, b] within blocks
    before = xp.cumsum(inner[:, :-1, -1], axis=-1)                                 # [N, V/b - 1] block totals
    offsets = xp.concatenate([xp.zeros((N, 1), dtype=p.dtype), before], axis=1)    # [N, V/b] mass before each
    return (inner + offsets[:, :, None]).reshape(N, -1)[:, :V]


def top_p_processor(top_p: float, min_tokens_to_keep: int = 1) -> Processor:
    """``TopPLogitsWarper`` (nucleus): sort ascending, and drop the tokens whose cumulative probability is
    <= 1 − top_p (the least likely ones), keeping at least ``min_tokens_to_keep``."""
    def process(ids, scores):
        xp = get_xp(scores)
        N, V = scores.shape
        order = xp.argsort(scores, axis=-1)           # [N, V] ascending (no kind=: older CuPy rejects it)
        cum = cumsum_f32(softmax(xp.take_along_axis(scores, order, axis=-1), axis=-1))
        drop_sorted = cum <= (1.0 - top_p)
        drop_sorted[:, V - min_tokens_to_keep:] = False
        drop = xp.empty_like(drop_sorted)
        drop[xp.arange(N)[:, None], order] = drop_sorted                         # back to vocabulary order
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
    for p in procs:
        scores = p(ids, scores)
    return scores


# ==============================================================================================================
# Choosing tokens

def greedy_next_tokens(scores) -> np.ndarray:
    """argmax per row (the first maximum on ties, like torch). [N, V] -> host [N] int64."""
    return _host(scores.argmax(axis=-1)).astype(np.int64)


def sample_next_tokens(scores, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from softmax(scores), by inverting the cumulative distribution with one uniform number
    per row from ``rng``. [N, V] -> host [N] int64. Tokens at −inf (probability 0) are never drawn."""
    xp = get_xp(scores)
    N, V = scores.shape
    probs = softmax(scores, axis=-1)                                               # [N, V]
    cum = cumsum_f32(probs)
    u = xp.asarray(rng.random(N, dtype=np.float32)) * cum[:, -1]                   # [N] in [0, total mass)
    idx = (cum <= u[:, None]).sum(axis=-1)                                         # first index with cum > u
    # float rounding can put u at the total mass; fall back to the last token that has probability
    last = (V - 1) - (probs[:, ::-1] > 0).argmax(axis=-1)
    return _host(xp.minimum(idx, last)).astype(np.int64)


# ==============================================================================================================
# Streaming

class TextStreamer:
    """Decode tokens as they are generated and hand out finished text (transformers' ``TextStreamer`` idea).

    ``generate(..., streamer=TextStreamer(tokenizer))`` calls :meth:`put` with the prompt ids [1, T], then with
    each new token [1], and :meth:`end` at the end. Text is released up to the last space (a later token can
    still change a word), at once after a newline, and entirely at :meth:`end`; a trailing U+FFFD (half of a
    multi-byte character split over byte tokens) is held back. ``on_text(text, end)`` receives it (default:
    print); :attr:`text` holds everything released so far. ``tokenizer`` is anything with ``decode(ids, **kw)``.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, on_text: Callable[[str, bool], None] | None = None,
                 **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.on_text = on_text if on_text is not None else self._print
        self.text = ""
        self._tokens: list[int] = []
        self._released = 0            # characters of decode(self._tokens) already handed out
        self._saw_prompt = False

    @staticmethod
    def _print(text: str, end: bool) -> None:
        print(text, end="\n" if end else "", flush=True)

    def _emit(self, text: str, end: bool = False) -> None:
        self.text += text
        self.on_text(text, end)

    def put(self, token_ids) -> None:
        ids = np.asarray(token_ids)
        if ids.ndim > 1:
            if ids.shape[0] != 1:
                raise ValueError(f"TextStreamer streams one sequence; got a batch of {ids.shape[0]}")
            ids = ids[0]
        if not self._saw_prompt:
            self._saw_prompt = True
            if self.skip_prompt:
                return
        self._tokens.extend(int(i) for i in ids.reshape(-1))
        full = self.tokenizer.decode(self._tokens, **self.decode_kwargs)
        if full.endswith("\n"):                   # a line is complete: release it and start afresh
            self._emit(full[self._released:])
            self._tokens, self._released = [], 0
            return
        stable = full.rstrip("\ufffd")
        cut = stable.rfind(" ") + 1
        if cut > self._released:
            self._emit(full[self._released:cut])
            self._released = cut

    def end(self) -> None:
        rest = self.tokenizer.decode(self._tokens, **self.decode_kwargs)[self._released:] if self._tokens else ""
        self._tokens, self._released, self._saw_prompt = [], 0, False
        self._emit(rest, end=True)


# ==============================================================================================================
# Inputs and one decoding step

def _prepare_inputs(model, s: GenerationSettings, pixel_values, input_ids, attention_mask,
                    image_embeds_position_mask, image_embeds):
    """Validate the inputs; return host ids [B, T], attention [B, T], image mask [B, T] and image_embeds
    [B, Q, C] on the backend (the image encoded here, once)."""
    if pixel_values is None and image_embeds is None:
        raise ValueError("generate needs an image: pass pixel_values (or precomputed image_embeds)")
    if pixel_values is not None and image_embeds is not None:
        raise ValueError("pass either pixel_values or image_embeds, not both")
    ids, att, *_ = model.check_text_inputs(input_ids, attention_mask)
    B, T = ids.shape
    if att is None:
        # transformers infers the mask from the pad id when the prompt holds it (and pad is not EOS)
        pad = s.pad_token_id
        if pad is not None and pad not in s.eos_token_id and (ids == pad).any():
            att = (ids != pad).astype(np.int64)
        else:
            att = np.ones((B, T), np.int64)
    if image_embeds_position_mask is not None:       # the slot count, checked before the image is encoded
        img = _host_int_array("image_embeds_position_mask", image_embeds_position_mask)
        Q = model.config.latent_query_num
        if img.shape == (B, T) and ((img != 0).sum(axis=1) != Q).any():
            raise ValueError(f"image_embeds_position_mask marks {(img != 0).sum(axis=1).tolist()} image positions "
                             f"per row, but each row needs exactly {Q} (latent_query_num)")
    if pixel_values is not None:
        pixel_values = _as_array("pixel_values", pixel_values, "[batch, 3, height, width]")   # lists accepted
        shape = tuple(pixel_values.shape)
        if len(shape) == 4 and shape[0] != B:
            raise ValueError(f"pixel_values holds {shape[0]} images but input_ids has {B} rows: the batch sizes "
                             f"must agree")
        image_embeds = model.encode_image(pixel_values)[0]                         # [B, Q, C]; NaN/inf refused
    else:
        image_embeds = model.check_float_input("image_embeds", image_embeds)      # lists accepted, NaN/inf refused
    ids, att, img, image_embeds, *_ = model.check_text_inputs(ids, att, image_embeds_position_mask, image_embeds)
    return ids, att, img, image_embeds


def _decode_step(model, cache, seq: np.ndarray, att: np.ndarray, cur_len: int):
    """Feed the tokens at column ``cur_len`` of ``seq`` [N, Lmax] (one per row) through the cached model;
    return the next logits [N, V].

    Pad-aware position (docs/numerics.md §7.3, 4.37): 1 + number of non-pad ids in the row so far, this token
    included (pad ids get the zero row), exactly the prefill's rule continued, so left padding changes nothing.
    """
    pad_idx = model.config.text_config.pad_token_id
    pos = position_ids_from_input_ids(seq[:, :cur_len + 1], pad_idx)[:, -1:]      # [N, 1]
    mask = att[:, :cur_len + 1]
    out = model.forward(input_ids=seq[:, cur_len:cur_len + 1], position_ids=pos, past_key_values=cache,
                        attention_mask=None if mask.all() else mask,   # all ones: no mask, same numbers
                        logits_to_keep=1)
    return out.logits[:, -1]                                                       # [N, V]


def initial_length(model, prompt_length: int, max_length: int) -> int:
    """How many tokens (prompt included) the buffers of one call are first made for: all ``max_length`` when they
    fit in the positions the model was trained on (``max_position_embeddings``), else the larger of those and the
    prompt + 1; past that the buffers double as needed (:func:`with_room`, :meth:`KVCache.update`)."""
    trained = model.config.text_config.max_position_embeddings
    return min(max_length, max(trained, prompt_length + 1))


def with_room(a: np.ndarray, length: int, fill) -> np.ndarray:
    """``a`` [..., L] when L >= ``length``, else a copy with room for twice L (at least ``length``) along the
    last axis, the new columns set to ``fill``."""
    if a.shape[-1] >= length:
        return a
    out = np.full(a.shape[:-1] + (max(length, 2 * a.shape[-1]),), fill, a.dtype)
    out[..., :a.shape[-1]] = a
    return out


def _out_of_memory(model, s: GenerationSettings, batch: int, prompt_length: int) -> MemoryError:
    """The MemoryError of a call whose buffers do not fit, saying what was asked for and what it needs."""
    tc = model.config.text_config
    rows, length = batch * s.num_beams, initial_length(model, prompt_length, prompt_length + s.max_new_tokens)
    kv = 2 * tc.layers * rows * tc.attention_heads * length * tc.head_dim * 4            # keys and values, float32
    logits = rows * tc.vocab_size * 4
    return MemoryError(
        f"generate ran out of memory: {batch} prompt(s) × {s.num_beams} beam(s) = {rows} rows with room for {length} "
        f"tokens need {kv / 2 ** 30:.1f} GiB for the KV cache and {logits / 2 ** 30:.1f} GiB per step for the "
        f"logits, more than this machine can allocate; use fewer prompts, beams or new tokens")


def _prefill(model, ids, att, img, image_embeds, capacity: int):
    """Run the prompt once into a new cache; return (cache, last-position logits [B, V])."""
    cache = model.new_cache(ids.shape[0], capacity)
    out = model.forward(input_ids=ids, attention_mask=att, image_embeds_position_mask=img,
                        image_embeds=image_embeds, past_key_values=cache, logits_to_keep=1)
    return cache, out.logits[:, -1]


# ==============================================================================================================
# Greedy search and sampling (``GenerationMixin._sample``)

def _greedy_or_sample(model, s: GenerationSettings, ids, att, img, image_embeds, rng, output_scores,
                      streamer, callback) -> GenerateOutput:
    """One token per row per step: processors, then argmax (or a draw). A row that produced EOS is finished:
    from then on it gets the pad id (it is still fed, as in transformers, so every row stays in step). Stops when
    every row is finished or ``max_new_tokens`` are made. ids, att, img: host [B, T]."""
    B, T = ids.shape
    max_len = T + s.max_new_tokens
    width = initial_length(model, T, max_len)       # the buffers' length; they double when it is reached
    fill = s.pad_token_id if s.pad_token_id is not None else 0
    seq = np.full((B, width), fill, np.int64)
    seq[:, :T] = ids
    att_all = np.ones((B, width), np.int64)        # generated tokens are always attended (as transformers)
    att_all[:, :T] = att
    skip = (att != 0).argmax(axis=1)               # left-padding length per row
    procs = build_processors(s, T, skip)
    eos = np.asarray(s.eos_token_id, np.int64)
    cache, logits = _prefill(model, ids, att, img, image_embeds, width)
    if streamer is not None:
        streamer.put(ids.copy())
    unfinished = np.ones(B, bool)
    scores_out = []
    cur_len = T
    while True:
        scores = apply_processors(procs, seq[:, :cur_len], logits)                  # [B, V]
        if output_scores:
            scores_out.append(_host(scores))
        tok = sample_next_tokens(scores, rng) if s.do_sample else greedy_next_tokens(scores)   # host [B]
        if len(eos):
            tok = np.where(unfinished, tok, s.pad_token_id)    # finished rows get pad
        seq, att_all = with_room(seq, cur_len + 1, fill), with_room(att_all, cur_len + 1, 1)
        seq[:, cur_len] = tok
        if streamer is not None:
            streamer.put(tok.copy())
        if callback is not None:
            callback(cur_len - T, tok.copy())
        unfinished &= ~np.isin(tok, eos)
        cur_len += 1
        if cur_len >= max_len or not unfinished.any():
            break
        warn_past_trained_positions(model, cur_len, T)
        logits = _decode_step(model, cache, seq, att_all, cur_len - 1)
    if streamer is not None:
        streamer.end()
    return GenerateOutput(seq[:, :cur_len].copy(), tuple(scores_out) if output_scores else None)


# ==============================================================================================================
# Beam search (``GenerationMixin._beam_search``, transformers 5.23 semantics)

def _top_desc(values: np.ndarray, k: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k largest per row, in descending order; ties go to the lower index (or ``tiebreak``)."""
    tb = np.broadcast_to(np.arange(values.shape[1]), values.shape) if tiebreak is None else tiebreak
    return np.lexsort((tb, -values), axis=-1)[:, :k]


def _top_candidates(acc, k: int, keys=None):
    """The k best of ``keys`` [B, M] (default ``acc``) on the backend -> host (indices [B, k], acc there [B, k]),
    best first. ``argpartition`` finds them without sorting all M = num_beams·V."""
    xp = get_xp(acc)
    keys = acc if keys is None else keys
    part = xp.argpartition(-keys, k - 1, axis=-1)[:, :k]                           # [B, k] unordered
    # One download per step: the indices and both score arrays travel together as float64, which holds all of them
    # exactly (indices < num_beams·V < 2^53; float32 scores widen without rounding).
    home = _host(xp.stack([part.astype(xp.float64), xp.take_along_axis(keys, part, axis=-1).astype(xp.float64),
                           xp.take_along_axis(acc, part, axis=-1).astype(xp.float64)]))   # [3, B, k]
    part_h = home[0].astype(np.int64)
    key_h = home[1].astype(keys.dtype)
    acc_h = home[2].astype(acc.dtype)
    order = _top_desc(key_h, k, tiebreak=part_h)
    return np.take_along_axis(part_h, order, 1), np.take_along_axis(acc_h, order, 1)


def _beam_search(model, s: GenerationSettings, ids, att, img, image_embeds, rng, output_scores):
    """Beam search as transformers 5.23 runs it.

    * Running beams carry cumulative log-softmax scores (float32); beam 0 starts at 0, the others at −1e9 so the
      first step expands one beam only.
    * Each step keeps the 2·num_beams best (beam, token) continuations of each input (sampled without
      replacement under ``do_sample``); the best num_beams that did not just finish (EOS, or the length limit)
      run on.
    * A continuation among the first num_beams that finishes becomes a hypothesis scored
      sum_logprobs / (new_length ** length_penalty), new_length = generated tokens including the EOS; the
      num_beams best hypotheses are kept.
    * Stop when no input can improve (``_check_early_stop_heuristic``; with early_stopping="never" and
      length_penalty > 0 the best running score is judged at the maximum length), when every input holds
      num_beams hypotheses and early_stopping is True, or when every continuation finished.
    Returns each input's best hypothesis, all cut to the longest returned one (pad after EOS).
    """
    xp = model.xp
    B, T = ids.shape
    K = s.num_beams
    N = B * K
    max_len = T + s.max_new_tokens
    width = initial_length(model, T, max_len)           # the buffers' length; they double when it is reached
    kk = max(2, 1 + len(s.eos_token_id)) * K            # candidates kept per input
    fill = s.pad_token_id if s.pad_token_id is not None else (s.eos_token_id[0] if s.eos_token_id else -1)
    eos = np.asarray(s.eos_token_id, np.int64)
    lp, es = s.length_penalty, s.early_stopping

    run_seq = np.full((B, K, width), fill, np.int64)
    run_seq[:, :, :T] = ids[:, None, :]
    run_scores = np.zeros((B, K), np.float32)
    run_scores[:, 1:] = BEAM_NEG
    done_seq = run_seq.copy()
    done_scores = np.full((B, K), BEAM_NEG, np.float32)
    done_flag = np.zeros((B, K), bool)
    done_len = np.zeros((B, K), np.int64)              # generated tokens of each hypothesis
    improvable = np.ones(B, bool)                      # transformers' is_early_stop_heuristic_unsatisfied
    top_mask = np.arange(kk) < K                       # only the first K candidates may finish

    att_all = np.ones((N, width), np.int64)
    att_all[:, :T] = np.repeat(att, K, axis=0)
    skip = np.repeat((att != 0).argmax(axis=1), K)
    procs = build_processors(s, T, skip)

    # The prompt runs once per input; the cache is then copied to its K beams (rows b·K … b·K+K-1).
    cache, logits = _prefill(model, ids, att, img, image_embeds, width)
    cache.reorder(np.repeat(np.arange(B), K))
    logits = xp.repeat(logits, K, axis=0)                                          # [N, V]
    scores_out = []
    cur_len = T
    while True:
        logp = log_softmax(logits)                                                 # [N, V]
        logp = apply_processors(procs, run_seq.reshape(N, -1)[:, :cur_len], logp)
        if output_scores:
            scores_out.append(_host(logp))
        V = logp.shape[-1]
        acc = (logp.reshape(B, K, V) + xp.asarray(run_scores)[:, :, None]).reshape(B, K * V)
        keys = None
        if s.do_sample:   # sampling kk without replacement ∝ softmax(acc): the Gumbel-top-k trick
            u = rng.random((B, K * V), dtype=np.float32) + np.float32(1e-20)        # (0, 1), never 1
            keys = acc + xp.asarray(-np.log(-np.log(u)))                              # + Gumbel noise
        cand, cand_scores = _top_candidates(acc, kk, keys)                          # host [B, kk]
        parent, tok = cand // V, cand % V
        if cur_len >= run_seq.shape[-1]:                                           # full: double the buffers
            run_seq, att_all = with_room(run_seq, cur_len + 1, fill), with_room(att_all, cur_len + 1, 1)
            done_seq = with_room(done_seq, cur_len + 1, fill)
        cand_seq = np.take_along_axis(run_seq, parent[:, :, None], axis=1)          # [B, kk, width]
        cand_seq[:, :, cur_len] = tok
        finished = np.isin(tok, eos) | (cur_len + 1 >= max_len)                      # [B, kk]

        # the running beams of the next step: the best K candidates that did not finish
        alive = cand_scores + finished.astype(np.float32) * BEAM_NEG
        nxt = _top_desc(alive, K)
        run_seq = np.take_along_axis(cand_seq, nxt[:, :, None], axis=1)
        run_scores = np.take_along_axis(alive, nxt, axis=1)
        beam_src = (np.arange(B)[:, None] * K + np.take_along_axis(parent, nxt, axis=1)).reshape(N)

        # the hypotheses: merge the candidates that just finished into the kept ones
        new_len = cur_len + 1 - T
        just_done = finished & top_mask[None, :]
        hyp = cand_scores / (new_len ** lp)
        full = done_flag.all(axis=1, keepdims=True) & (es is True)
        hyp = hyp + full.astype(np.float32) * BEAM_NEG
        hyp = hyp + (~improvable[:, None]).astype(np.float32) * BEAM_NEG
        hyp = hyp + (~just_done).astype(np.float32) * BEAM_NEG
        m_scores = np.concatenate([done_scores, hyp], axis=1)                        # [B, K + kk]
        keep = _top_desc(m_scores, K)
        done_seq = np.take_along_axis(np.concatenate([done_seq, cand_seq], 1), keep[:, :, None], axis=1)
        done_scores = np.take_along_axis(m_scores, keep, axis=1)
        done_flag = np.take_along_axis(np.concatenate([done_flag, just_done], 1), keep, axis=1)
        done_len = np.take_along_axis(np.concatenate([done_len, np.full((B, kk), new_len)], 1), keep, axis=1)

        cur_len += 1
        # can a running beam still beat the worst kept hypothesis?
        best_len = (max_len - T) if (es == "never" and lp > 0.0) else (cur_len - T)
        best_possible = run_scores[:, :1] / (best_len ** lp)                         # [B, 1]
        worst_done = np.where(done_flag, done_scores.min(axis=1, keepdims=True), np.float32(BEAM_NEG))
        improvable &= (best_possible > worst_done).any(axis=1)
        go_on = improvable.any() and not (done_flag.all() and es is True) and not finished.all()
        if not go_on:
            break
        warn_past_trained_positions(model, cur_len, T)
        cache.reorder(beam_src)
        logits = _decode_step(model, cache, run_seq.reshape(N, -1), att_all, cur_len - 1)

    out_len = T + int(done_len[:, 0].max())
    return GenerateOutput(done_seq[:, 0, :out_len].copy(), tuple(scores_out) if output_scores else None,
                          done_scores[:, 0].copy() if output_scores else None)


# ==============================================================================================================
# Entry point

def generate(model, pixel_values=None, input_ids=None, attention_mask=None, image_embeds_position_mask=None,
             image_embeds=None, *, max_new_tokens=None, min_new_tokens=None, do_sample=None, temperature=None,
             top_k=None, top_p=None, num_beams=None, length_penalty=None, early_stopping=None,
             no_repeat_ngram_size=None, repetition_penalty=None, eos_token_id=None, pad_token_id=None,
             seed=None, rng=None, output_scores=False, return_dict_in_generate=False, streamer=None,
             callback=None):
    """Generate after the prompt; return prompt + new ids [B, T + new] (int64, pad after EOS), or a
    :class:`GenerateOutput` when ``return_dict_in_generate``.

    Like ``Kosmos2ForConditionalGeneration.generate`` (docs/numerics.md §7.1): an image is required
    (``pixel_values`` [B, 3, H, W] or ``image_embeds`` [B, Q, C]); ``image_embeds_position_mask`` marks the Q image
    slots of each row. Settings left None come from the checkpoint (:func:`checkpoint_generation_defaults`), then
    transformers' defaults: greedy, 20 new tokens. ``do_sample`` draws from a NumPy Generator: ``rng``, or
    ``np.random.default_rng(seed)``. ``num_beams`` > 1 runs beam search (beam sampling with ``do_sample``).
    ``output_scores`` keeps each step's processed scores [B·num_beams, V] (log-probabilities under beam search).
    ``streamer.put(ids)`` receives the prompt [B, T] and then each step's tokens [B], and ``streamer.end()``
    closes; ``callback(step, ids)`` receives the step index and tokens [B] (host int64). Neither works with beams,
    whose tokens are not final until the end.
    """
    if seed is not None and rng is not None:
        raise ValueError("pass either seed or rng, not both")
    if seed is not None and (not is_int(seed) or seed < 0):
        raise ValueError(f"seed must be None or an integer >= 0 (it seeds numpy.random.default_rng), got {seed!r}")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if callback is not None and not callable(callback):
        raise ValueError("callback must be callable as callback(step, token_ids)")
    if streamer is not None and not (hasattr(streamer, "put") and hasattr(streamer, "end")):
        raise ValueError("streamer must have put(token_ids) and end() methods")
    try:                        # only for a max_length setting; check_text_inputs reports bad input_ids
        prompt_len = _host(input_ids).shape[-1]
    except (ValueError, TypeError, IndexError):
        prompt_len = 0
    s = resolve_settings(model, prompt_len, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                         do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                         num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                         no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if s.num_beams > 1 and (streamer is not None or callback is not None):
        raise ValueError("streamer and callback need num_beams=1: beam search settles its tokens only at the end")
    explicit = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
                    length_penalty=length_penalty, early_stopping=early_stopping)
    warn_ignored_settings(s, {name for name, value in explicit.items() if value is not None})
    ids, att, img, emb = _prepare_inputs(model, s, pixel_values, input_ids, attention_mask,
                                         image_embeds_position_mask, image_embeds)
    if rng is None:
        rng = np.random.default_rng(seed)
    try:
        if s.num_beams > 1:
            out = _beam_search(model, s, ids, att, img, emb, rng, output_scores)
        else:
            out = _greedy_or_sample(model, s, ids, att, img, emb, rng, output_scores, streamer, callback)
    except MemoryError:
        raise _out_of_memory(model, s, *ids.shape) from None
    return out if return_dict_in_generate else out.sequences
