"""Decoding with a KV cache: greedy search, multinomial sampling and beam search, the logits processors,
streaming. Read :mod:`.reference` first: :func:`greedy_generate` is the loop, in about fifteen lines, that
:func:`generate` elaborates.

Mirrors transformers 5.23 as ``Kosmos2ForConditionalGeneration.generate`` reaches it (docs/numerics.md §7): the
loops of ``generation/utils.py``, the processors of ``generation/logits_process.py`` and the streamer protocol of
``generation/streamers.py``; docs/generation.md explains the choices. The package, each module depending only on
those before it (and on :mod:`kosmos2_ref.model` and :mod:`kosmos2_ref.checks`; the model never imports it):

* :mod:`.reference` -- :func:`greedy_generate`, the textbook loop;
* :mod:`.settings` -- :class:`GenerationSettings` (argument > checkpoint > transformers default), validation,
  :class:`GenerateOutput`, the warnings;
* :mod:`.processors` -- the logits processors (repetition penalty, no-repeat-ngram, min-new-tokens,
  temperature, top-k, top-p);
* :mod:`.search` -- the inputs checked once, the prefill, the unchecked cached step, greedy search and sampling;
* :mod:`.beam` -- beam search as expand / keep the running beams / keep the finished ones / stop;
* :mod:`.streaming` -- :class:`TextStreamer`;
* here -- :func:`generate`, the entry point (also ``kosmos2_ref.generate``).
"""

from __future__ import annotations

import numpy as np

from . import beam, processors, reference, search, settings, streaming  # noqa: F401  (the modules, for patching)
from .beam import BEAM_NEG, beam_search
from .processors import (
    Processor,
    apply_processors,
    banned_ngram_tokens,
    build_processors,
    cumsum_f32,
    host,
    log_softmax,
    min_new_tokens_processor,
    no_repeat_ngram_processor,
    repetition_penalty_processor,
    temperature_processor,
    top_k_processor,
    top_p_processor,
)
from .reference import greedy_generate
from .search import (
    greedy_next_tokens,
    greedy_or_sample,
    initial_length,
    next_logits,
    out_of_memory,
    prefill,
    prepare_inputs,
    prompt_length,
    sample_next_tokens,
    with_room,
)
from .settings import (
    BEAM_ONLY,
    DEFAULT_MAX_NEW_TOKENS,
    GENERATION_KEYS,
    HF_DEFAULTS,
    SAMPLING_ONLY,
    GenerateOutput,
    GenerationSettings,
    check_call_arguments,
    checkpoint_generation_defaults,
    resolve_settings,
    setting_source,
    warn_ignored_settings,
    warn_past_trained_positions,
)
from .streaming import TextStreamer


def generate(
    model,
    pixel_values=None,
    input_ids=None,
    attention_mask=None,
    image_embeds_position_mask=None,
    image_embeds=None,
    *,
    max_new_tokens=None,
    min_new_tokens=None,
    do_sample=None,
    temperature=None,
    top_k=None,
    top_p=None,
    num_beams=None,
    length_penalty=None,
    early_stopping=None,
    no_repeat_ngram_size=None,
    repetition_penalty=None,
    eos_token_id=None,
    pad_token_id=None,
    seed=None,
    rng=None,
    output_scores=False,
    return_dict_in_generate=False,
    streamer=None,
    callback=None,
):
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
    check_call_arguments(seed, rng, streamer, callback)
    s = resolve_settings(
        model,
        prompt_length(input_ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        no_repeat_ngram_size=no_repeat_ngram_size,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if s.num_beams > 1 and (streamer is not None or callback is not None):
        raise ValueError("streamer and callback need num_beams=1: beam search settles its tokens only at the end")
    explicit = dict(
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    warn_ignored_settings(s, {name for name, value in explicit.items() if value is not None})
    ids, att, img, emb = prepare_inputs(
        model, s, pixel_values, input_ids, attention_mask, image_embeds_position_mask, image_embeds
    )
    rng = np.random.default_rng(seed) if rng is None else rng
    try:
        if s.num_beams > 1:
            out = beam_search(model, s, ids, att, img, emb, rng, output_scores)
        else:
            out = greedy_or_sample(model, s, ids, att, img, emb, rng, output_scores, streamer, callback)
    except MemoryError:
        raise out_of_memory(model, s, *ids.shape) from None
    return out if return_dict_in_generate else out.sequences


__all__ = [  # the package's names (each module's public ones); the modules themselves are attributes too
    "generate",
    "greedy_generate",
    "BEAM_ONLY",
    "DEFAULT_MAX_NEW_TOKENS",
    "GENERATION_KEYS",
    "HF_DEFAULTS",
    "SAMPLING_ONLY",
    "GenerateOutput",
    "GenerationSettings",
    "check_call_arguments",
    "checkpoint_generation_defaults",
    "resolve_settings",
    "setting_source",
    "warn_ignored_settings",
    "warn_past_trained_positions",
    "Processor",
    "apply_processors",
    "banned_ngram_tokens",
    "build_processors",
    "cumsum_f32",
    "host",
    "log_softmax",
    "min_new_tokens_processor",
    "no_repeat_ngram_processor",
    "repetition_penalty_processor",
    "temperature_processor",
    "top_k_processor",
    "top_p_processor",
    "greedy_next_tokens",
    "greedy_or_sample",
    "initial_length",
    "next_logits",
    "out_of_memory",
    "prefill",
    "prepare_inputs",
    "prompt_length",
    "sample_next_tokens",
    "with_room",
    "BEAM_NEG",
    "beam_search",
    "TextStreamer",
]
