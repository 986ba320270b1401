"""The settings of one ``generate`` call: explicit argument > checkpoint > transformers' default, each validated
once (docs/numerics.md §7.4); the outputs; and the warnings transformers gives (``GenerationConfig.validate``,
``MaxLengthCriteria``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ..checks import is_int, is_real

# transformers' default when neither the call nor the checkpoint sets a length: 20 new tokens
# (``_prepare_generated_length``: "by default let's always generate 20 new tokens")
DEFAULT_MAX_NEW_TOKENS = 20

# GenerationConfig defaults of transformers 5.23 (``GenerationConfig._get_default_generation_params``)
HF_DEFAULTS = {
    "min_new_tokens": 0,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "num_beams": 1,
    "length_penalty": 1.0,
    "early_stopping": False,
    "no_repeat_ngram_size": 0,
    "repetition_penalty": 1.0,
}
GENERATION_KEYS = (
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "no_repeat_ngram_size",
    "repetition_penalty",
    "eos_token_id",
    "pad_token_id",
)


@dataclass
class GenerateOutput:
    """What ``generate(..., return_dict_in_generate=True)`` returns (transformers' ``GenerateDecoderOnlyOutput`` /
    ``GenerateBeamDecoderOnlyOutput`` field names)."""

    sequences: np.ndarray  # [B, T + new] int64: prompt + new tokens, pad after EOS
    scores: tuple | None = None  # per step [B·num_beams, V] float32 processed scores (output_scores)
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


# ==============================================================================================================
# Where a setting comes from


def checkpoint_generation_defaults(model) -> dict:
    """The generation settings a checkpoint carries (docs/numerics.md §7.4).

    Read from the generation keys of ``config.json``'s ``text_config`` (where the released checkpoint keeps
    ``no_repeat_ngram_size = 3``, as the original demo used; transformers 5.x drops them, 4.x honoured them), then
    ``generation_config.json``, which wins where both set a key. ``max_length`` is read from
    ``generation_config.json`` only: a ``max_length: 20`` in an old ``text_config`` is a serialised default, which
    no image prompt (≥ 67 tokens) fits (one in generation_config.json that leaves no room is replaced by the
    default 20 new tokens, with a warning: :func:`new_tokens_from_max_length`).
    """
    tc = model.config.text_config
    d = {"eos_token_id": tc.eos_token_id, "pad_token_id": tc.pad_token_id}
    d.update({k: v for k, v in tc.extra.items() if k in GENERATION_KEYS and v is not None})
    gen = model.generation_config or {}
    d.update({k: v for k, v in gen.items() if k in GENERATION_KEYS + ("max_length",) and v is not None})
    return d


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


def new_tokens_from_max_length(max_length, prompt_length: int, stacklevel: int = 2) -> int:
    """New tokens for a checkpoint's ``max_length``: a total length, the prompt included, as in transformers.

    Old checkpoints serialise the default ``max_length: 20``, which no image prompt (>= 67 tokens) fits. transformers
    5.23 generates Kosmos-2 through its text model, whose generation config never reads generation_config.json, so
    on such a checkpoint it generates its default 20 new tokens (and warns about relying on a default). We do the
    same, with a warning that says why; a ``max_length`` that leaves room is honoured as a total. ``stacklevel``:
    the warning's frame, as ``warnings.warn`` counts it from here.
    """
    if not is_int(max_length) or max_length < 1:
        raise ValueError(
            f"generation_config.json sets max_length={max_length!r}: expected a positive integer (the "
            f"total length, prompt included)"
        )
    if max_length > prompt_length:
        return max_length - prompt_length
    warnings.warn(
        f"generation_config.json sets max_length={max_length}, a total length that leaves no room after "
        f"the {prompt_length}-token prompt; generating transformers' default {DEFAULT_MAX_NEW_TOKENS} new "
        f"tokens instead, as transformers does on this checkpoint. Pass max_new_tokens to choose",
        UserWarning,
        stacklevel=stacklevel,
    )
    return DEFAULT_MAX_NEW_TOKENS


# ==============================================================================================================
# Resolving and validating


def resolve_settings(model, prompt_length: int, **explicit) -> GenerationSettings:
    """Merge explicit arguments (those not None) over :func:`checkpoint_generation_defaults` over transformers'
    defaults, and validate them: a bad value raises ValueError naming the argument, and the file it was read
    from when it was not an argument."""
    unknown = set(explicit) - set(GENERATION_KEYS)
    if unknown:
        raise TypeError(f"unknown generation settings {sorted(unknown)}")
    ckpt = checkpoint_generation_defaults(model)
    picked: list[str] = []  # the settings in the order they are read; each is checked once read

    def pick(name):
        picked.append(name)
        if explicit.get(name) is not None:
            return explicit[name]
        return ckpt.get(name, HF_DEFAULTS.get(name))

    try:
        max_new = pick("max_new_tokens")
        if max_new is None and "max_length" in ckpt:  # generation_config.json's total length
            max_new = new_tokens_from_max_length(ckpt["max_length"], prompt_length, stacklevel=4)
        return GenerationSettings(
            **_lengths(max_new, pick),
            **_search_mode(pick),
            **_penalties(pick),
            **_token_ids(pick, model.config.text_config.vocab_size),
        )
    except ValueError as err:
        name = picked[-1] if picked else None
        source = setting_source(model, name) if name and explicit.get(name) is None else None
        if source is None:
            raise
        raise ValueError(f"{err} (read from {source})") from None


def _lengths(max_new, pick) -> dict:
    if max_new is None:
        max_new = DEFAULT_MAX_NEW_TOKENS
    if not is_int(max_new) or max_new < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new!r}")
    min_new = pick("min_new_tokens")
    if not is_int(min_new) or min_new < 0:
        raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new!r}")
    return {"max_new_tokens": int(max_new), "min_new_tokens": int(min_new)}


def _search_mode(pick) -> dict:
    num_beams = pick("num_beams")
    if not is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    do_sample = pick("do_sample")
    if not isinstance(do_sample, (bool, np.bool_)):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    temperature = pick("temperature")
    if not is_real(temperature) or not math.isfinite(temperature) or (do_sample and temperature <= 0):
        raise ValueError(
            f"temperature must be a number > 0 when sampling (do_sample=True), got {temperature!r}; "
            f"for greedy decoding set do_sample=False"
        )
    top_k = pick("top_k")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    top_p = pick("top_p")
    if not is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    return {
        "num_beams": int(num_beams),
        "do_sample": bool(do_sample),
        "temperature": float(temperature),
        "top_k": int(top_k),
        "top_p": float(top_p),
    }


def _penalties(pick) -> dict:
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
    return {
        "repetition_penalty": float(rep),
        "no_repeat_ngram_size": int(ngram),
        "length_penalty": float(lp),
        "early_stopping": es,
    }


def _token_ids(pick, vocab_size: int) -> dict:
    v = pick("eos_token_id")
    ids = [] if v is None else [v] if is_int(v) else list(v) if isinstance(v, (list, tuple, np.ndarray)) else None
    if ids is None or not all(is_int(i) and 0 <= i < vocab_size for i in ids):
        raise ValueError(f"eos_token_id must be a token id or a list of ids in [0, {vocab_size - 1}], got {v!r}")
    eos = tuple(int(i) for i in ids)
    pad = pick("pad_token_id")
    if pad is not None and (not is_int(pad) or not 0 <= pad < vocab_size):
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab_size - 1}], got {pad!r}")
    if pad is None and eos:
        pad = eos[0]  # transformers does the same (with a warning): finished rows need a filler
    return {"eos_token_id": eos, "pad_token_id": None if pad is None else int(pad)}


def check_call_arguments(seed, rng, streamer, callback) -> None:
    """The arguments of ``generate`` that are not settings: a seed or a Generator, and the two listeners."""
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


# ==============================================================================================================
# Warnings where transformers warns (GenerationConfig.validate, MaxLengthCriteria)

# settings that only one decoding mode reads, with the value that changes nothing
SAMPLING_ONLY = (("temperature", 1.0), ("top_p", 1.0), ("top_k", 50))
BEAM_ONLY = (("early_stopping", False), ("length_penalty", 1.0))


def _should_warn(mode_switch: str, name: str, user_set: set) -> bool:
    """transformers' rule: stay quiet about a setting inherited from the checkpoint when the caller chose the
    mode explicitly (do_sample=False with a temperature from generation_config.json is harmless)."""
    return not (mode_switch in user_set and name not in user_set)


def warn_ignored_settings(s: GenerationSettings, user_set: set, stacklevel: int = 2) -> None:
    """One UserWarning naming the settings this call ignores: sampling settings under greedy decoding or plain
    beam search, beam settings with one beam (as ``GenerationConfig.validate`` warns). ``user_set``: the names the
    caller passed; ``stacklevel``: the caller's frame, counted from the function that calls this one."""
    ignored = []
    if not s.do_sample:
        ignored += [
            f"{name}={getattr(s, name)!r}"
            for name, neutral in SAMPLING_ONLY
            if getattr(s, name) != neutral and _should_warn("do_sample", name, user_set)
        ]
    if s.num_beams == 1:
        ignored += [
            f"{name}={getattr(s, name)!r}"
            for name, neutral in BEAM_ONLY
            if getattr(s, name) != neutral and _should_warn("num_beams", name, user_set)
        ]
    if ignored:
        warnings.warn(
            f"generate ignores {', '.join(ignored)}: temperature, top_p and top_k are used only when "
            f"sampling (do_sample=True), early_stopping and length_penalty only by beam search "
            f"(num_beams > 1); set the mode that uses them, or leave them unset",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def warn_past_trained_positions(model, cur_len: int, prompt_length: int) -> None:
    """A UserWarning, once per call, when the sequence first grows past ``max_position_embeddings`` while decoding
    goes on (transformers' MaxLengthCriteria reminder). The sinusoidal positions go on, but the model never saw
    them in training. (Warned from the decoding loop, two frames below ``generate``'s caller.)"""
    trained = model.config.text_config.max_position_embeddings
    if cur_len == max(trained, prompt_length) + 1:
        warnings.warn(
            f"generate: the sequence ({cur_len} tokens) is now longer than the {trained} positions the "
            f"model was trained on (max_position_embeddings); the text may degrade from here",
            UserWarning,
            stacklevel=4,
        )
