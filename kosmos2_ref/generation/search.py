"""Greedy search and multinomial sampling (``GenerationMixin._sample``), and what every loop shares: the
inputs checked once, the prefill, one cached step, the buffers.

How a call runs. The image is encoded once. The prompt is run once (the *prefill*) into a :class:`KVCache` sized
for prompt + ``max_new_tokens``, or for the positions the model was trained on when that is less
(:func:`initial_length`: the buffers then double as the tokens come, so an early EOS costs nothing of a huge
``max_new_tokens``); each later step feeds one token per row through :meth:`Kosmos2.decode_step`, which checks
nothing (the inputs were checked once, here, at the start). The last position's logits [N, V] go through the
processors, then a token is chosen. Arrays stay on the backend (``xp``); the host sees the chosen ids each step
([N] ints) and, only when ``output_scores`` is asked for, the processed scores. Bookkeeping lives on the host.

Positions while decoding are *pad-aware* (docs/numerics.md §7.3, the 4.37 behaviour): the token fed at a step
gets position 1 + (number of non-pad ids so far, itself included), so a left-padded row decodes exactly as it
would alone. transformers 5.x uses past_length + 2, which shifts a left-padded row by its pad count; both agree
on rows without padding.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_xp
from ..checks import (
    as_array,
    check_attention_mask,
    check_float_input,
    check_image_embeds,
    check_image_slots,
    check_pixel_values,
    check_token_ids,
)
from ..decoder import position_ids_from_input_ids
from ..layers import softmax
from .processors import apply_processors, build_processors, cumsum_f32, host
from .settings import GenerateOutput, GenerationSettings, warn_past_trained_positions

# ==============================================================================================================
# Inputs, checked once


def prepare_inputs(
    model, s: GenerationSettings, pixel_values, input_ids, attention_mask, image_embeds_position_mask, image_embeds
):
    """Check the inputs of one call; return host ids [B, T], attention [B, T], image slots [B, T] and
    image_embeds [B, Q, C] on the backend (the image encoded here, once, after its slots are checked)."""
    if pixel_values is None and image_embeds is None:
        raise ValueError("generate needs an image: pass pixel_values (or precomputed image_embeds)")
    if pixel_values is not None and image_embeds is not None:
        raise ValueError("pass either pixel_values or image_embeds, not both")
    cfg, xp = model.config, model.xp
    ids, _, B, T = check_token_ids(cfg, input_ids)
    att = check_attention_mask(attention_mask, B, T)
    if att is None:
        att = default_attention_mask(ids, s)
    img = check_image_slots(cfg, image_embeds_position_mask, B, T)
    if pixel_values is not None:
        image_embeds = model.encode_image(check_pixel_values(cfg, pixel_values, xp, batch=B))[0]  # [B, Q, C]
    else:  # lists accepted, NaN/inf refused
        image_embeds = check_image_embeds(cfg, check_float_input(cfg, "image_embeds", image_embeds, xp), B, xp)
    return ids, att, img, image_embeds


def default_attention_mask(ids: np.ndarray, s: GenerationSettings) -> np.ndarray:
    """The mask of a call that gives none [B, T]: transformers infers it from the pad id when the prompt holds it
    (and pad is not EOS), else every token is attended."""
    pad = s.pad_token_id
    if pad is not None and pad not in s.eos_token_id and (ids == pad).any():
        return (ids != pad).astype(np.int64)
    return np.ones(ids.shape, np.int64)


def prompt_length(input_ids) -> int:
    """The prompt's length, for a checkpoint's ``max_length``; 0 when input_ids is no array (reported later, when
    the inputs are checked)."""
    try:
        return as_array("input_ids", input_ids, "[batch, tokens]").shape[-1]
    except (ValueError, TypeError, IndexError):
        return 0


# ==============================================================================================================
# The prefill, one step, the buffers


def prefill(model, ids, att, img, image_embeds, capacity: int):
    """Run the prompt once into a new cache; return (cache, last-position logits [B, V])."""
    cache = model.new_cache(ids.shape[0], capacity)
    logits = model.decode_step(
        ids, cache, attention_mask=att, image_embeds=image_embeds, image_embeds_position_mask=img
    )
    return cache, logits


def next_logits(model, cache, seq: np.ndarray, att: np.ndarray, cur_len: int):
    """Feed the tokens at column ``cur_len`` of ``seq`` [N, Lmax] (one per row) through the cached model;
    return the next logits [N, V].

    Pad-aware position (docs/numerics.md §7.3, 4.37): 1 + number of non-pad ids in the row so far, this token
    included (pad ids get the zero row), exactly the prefill's rule continued, so left padding changes nothing.
    """
    pad_idx = model.config.text_config.pad_token_id
    pos = position_ids_from_input_ids(seq[:, : cur_len + 1], pad_idx)[:, -1:]  # [N, 1]
    mask = att[:, : cur_len + 1]
    return model.decode_step(
        seq[:, cur_len : cur_len + 1], cache, position_ids=pos, attention_mask=None if mask.all() else mask
    )  # all ones: no mask, same numbers


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
    out[..., : a.shape[-1]] = a
    return out


def out_of_memory(model, s: GenerationSettings, batch: int, prompt_length: int) -> MemoryError:
    """The MemoryError of a call whose buffers do not fit, saying what was asked for and what it needs."""
    tc = model.config.text_config
    rows, length = batch * s.num_beams, initial_length(model, prompt_length, prompt_length + s.max_new_tokens)
    kv = 2 * tc.layers * rows * tc.attention_heads * length * tc.head_dim * 4  # keys and values, float32
    logits = rows * tc.vocab_size * 4
    return MemoryError(
        f"generate ran out of memory: {batch} prompt(s) × {s.num_beams} beam(s) = {rows} rows with room for {length} "
        f"tokens need {kv / 2**30:.1f} GiB for the KV cache and {logits / 2**30:.1f} GiB per step for the "
        f"logits, more than this machine can allocate; use fewer prompts, beams or new tokens"
    )


# ==============================================================================================================
# Choosing tokens


def greedy_next_tokens(scores) -> np.ndarray:
    """argmax per row (the first maximum on ties, like torch). [N, V] -> host [N] int64."""
    return host(scores.argmax(axis=-1)).astype(np.int64)


def sample_next_tokens(scores, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from softmax(scores), by inverting the cumulative distribution with one uniform number
    per row from ``rng``. [N, V] -> host [N] int64. Tokens at −inf (probability 0) are never drawn."""
    xp = get_xp(scores)
    N, V = scores.shape
    probs = softmax(scores, axis=-1)  # [N, V]
    cum = cumsum_f32(probs)
    u = xp.asarray(rng.random(N, dtype=np.float32)) * cum[:, -1]  # [N] in [0, total mass)
    idx = (cum <= u[:, None]).sum(axis=-1)  # first index with cum > u
    # float rounding can put u at the total mass; fall back to the last token that has probability
    last = (V - 1) - (probs[:, ::-1] > 0).argmax(axis=-1)
    return host(xp.minimum(idx, last)).astype(np.int64)


# ==============================================================================================================
# The loop


def greedy_or_sample(
    model, s: GenerationSettings, ids, att, img, image_embeds, rng, output_scores, streamer, callback
) -> GenerateOutput:
    """One token per row per step: processors, then argmax (or a draw). A row that produced EOS is finished:
    from then on it gets the pad id (it is still fed, as in transformers, so every row stays in step). Stops when
    every row is finished or ``max_new_tokens`` are made. ids, att, img: host [B, T], checked."""
    B, T = ids.shape
    max_len = T + s.max_new_tokens
    width = initial_length(model, T, max_len)  # the buffers' length; they double when it is reached
    fill = s.pad_token_id if s.pad_token_id is not None else 0
    seq = np.full((B, width), fill, np.int64)
    seq[:, :T] = ids
    att_all = np.ones((B, width), np.int64)  # generated tokens are always attended (as transformers)
    att_all[:, :T] = att
    procs = build_processors(s, T, skip=(att != 0).argmax(axis=1))  # skip: each row's left padding
    eos = np.asarray(s.eos_token_id, np.int64)
    cache, logits = prefill(model, ids, att, img, image_embeds, width)
    if streamer is not None:
        streamer.put(ids.copy())
    unfinished = np.ones(B, bool)
    scores_out = []
    cur_len = T
    while True:
        scores = apply_processors(procs, seq[:, :cur_len], logits)  # [B, V]
        if output_scores:
            scores_out.append(host(scores))
        tok = sample_next_tokens(scores, rng) if s.do_sample else greedy_next_tokens(scores)  # host [B]
        if len(eos):
            tok = np.where(unfinished, tok, s.pad_token_id)  # finished rows get pad
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
        logits = next_logits(model, cache, seq, att_all, cur_len - 1)
    if streamer is not None:
        streamer.end()
    return GenerateOutput(seq[:, :cur_len].copy(), tuple(scores_out) if output_scores else None)
