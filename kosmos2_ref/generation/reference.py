"""The decoding loop as a textbook writes it (notebook 04 writes it by hand): read this first.

Prefill the prompt into a KV cache, then repeat: take the likeliest next token of each row, append it, feed just
that token (at its pad-aware position, docs/numerics.md §7.3) through the cached model. A row that wrote EOS is
finished and gets the pad id from then on; the loop ends when every row is finished or ``max_new_tokens`` are
made. :func:`kosmos2_ref.generation.generate` with ``do_sample=False, num_beams=1`` and no processors returns the
same ids token for token (tests/test_generation_reference.py); what it adds is the settings, the logits
processors, sampling, beam search, streaming, and buffers made once instead of a concatenation per token.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from ..decoder import position_ids_from_input_ids


def greedy_generate(model, pixel_values, input_ids, attention_mask, image_embeds_position_mask, max_new_tokens):
    """Greedy decoding, plainly: host ids [B, T] -> prompt + new ids [B, T + new] int64, pad after EOS."""
    tc = model.config.text_config
    ids, att = np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64)     # [B, T]
    cache = model.new_cache(batch=len(ids), capacity=ids.shape[1] + max_new_tokens)
    logits = model(pixel_values=pixel_values, input_ids=ids, attention_mask=att, past_key_values=cache,
                   image_embeds_position_mask=image_embeds_position_mask, logits_to_keep=1).logits[:, -1]   # prefill
    done, max_len = np.zeros(len(ids), bool), ids.shape[1] + max_new_tokens
    while True:
        nxt = np.where(done, tc.pad_token_id, to_numpy(logits.argmax(-1)))            # [B] the likeliest token
        ids, att = np.c_[ids, nxt], np.c_[att, np.ones_like(nxt)]                      # append: [B, T + 1]
        done |= np.isin(nxt, tc.eos_token_id)                                          # finished rows: pad
        if done.all() or ids.shape[1] == max_len:
            return ids
        pos = position_ids_from_input_ids(ids, tc.pad_token_id)[:, -1:]                # [B, 1] pad-aware
        logits = model.decode_step(nxt[:, None], cache, attention_mask=att, position_ids=pos)   # one token in
