"""The text decoder: embeddings with image rows spliced in, sinusoidal positions, 24 sub-LN decoder blocks,
final LayerNorm and the tied LM head (docs/numerics.md §6).

Mirrors ``Kosmos2TextSinusoidalPositionalEmbedding``, ``KosmosTextAttention``, ``Kosmos2TextFFN``,
``Kosmos2TextBlock``, ``Kosmos2TextTransformer`` and ``Kosmos2TextForCausalLM`` in
``transformers/models/kosmos2/modeling_kosmos2.py``. Parameters are the subtree ``text_model`` of the checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import TextConfig
from .layers import NEG_INF_F32, as_float32, merge_heads
from .primitives import attention, feed_forward, head_projection, layer_norm, linear


@dataclass
class TextOutput:
    last_hidden_state: object                 # [B, T, C] after the final LayerNorm
    logits: object | None = None              # [B, T', V] (T' = T, or the kept last positions)
    hidden_states: tuple | None = None        # (embedding output, blocks 0…L-2 outputs, final-LN output)
    attentions: tuple | None = None           # per block [B, H, T, past+T]
    past_key_values: object | None = None     # the KVCache, when one was used


# --------------------------------------------------------------------------------------------------------------
# Positions

def position_ids_from_input_ids(input_ids: np.ndarray, padding_idx: int, past_length: int = 0) -> np.ndarray:
    """Pad-aware position ids (docs/numerics.md §6.2), on the host: real tokens count 2, 3, 4, … over non-pad
    tokens only, offset by ``past_length``; pad tokens get ``padding_idx`` (= 1), whose sinusoid row is all zeros.

    input_ids [B, T] int -> [B, T] int64.
    """
    m = (input_ids != padding_idx).astype(np.int64)                 # [B, T] 1 for real tokens
    return (np.cumsum(m, axis=1) + past_length) * m + padding_idx


def sinusoidal_positions(position_ids, dim: int, padding_idx: int | None, xp):
    """Rows ``position_ids`` of the fairseq/tensor2tensor sinusoid table, computed directly (no table to outgrow).

    Row p is [sin(p·f_0) … sin(p·f_{h-1}), cos(p·f_0) … cos(p·f_{h-1})] with h = dim/2 and
    f_j = exp(−j·ln(10000)/(h−1)) — sin and cos halves concatenated, not interleaved; row ``padding_idx`` is zero.
    transformers builds this table in float32; we follow its roundings (f_j rounded to float32, the angle p·f_j
    formed in float32, sin/cos of it evaluated exactly and rounded) so the rows agree to ~1e-7, where a pure
    float64 table would differ by up to 1.6e-4 at p ≈ 2000 (docs/numerics.md §6.2).

    position_ids [B, T] host ints -> [B, T, dim] float32 on ``xp``.
    """
    half = dim // 2
    step = np.float32(-math.log(10000.0) / (half - 1))
    freqs = np.exp((np.arange(half, dtype=np.float32) * step).astype(np.float64)).astype(np.float32)   # [h]
    pos = xp.asarray(np.asarray(position_ids, dtype=np.float32))                 # [B, T]
    angle = pos[..., None] * xp.asarray(freqs)                                   # [B, T, h] float32 product
    angle = angle.astype(xp.float64)
    emb = xp.concatenate([xp.sin(angle), xp.cos(angle)], axis=-1).astype(xp.float32)   # [B, T, 2h]
    if dim % 2:
        # an odd C gets a zero last column: [..., C-1] -> [..., C]
        emb = xp.concatenate([emb, xp.zeros(emb.shape[:-1] + (1,), dtype=xp.float32)], axis=-1)
    if padding_idx is not None:
        emb *= xp.asarray(np.asarray(position_ids) != padding_idx, dtype=xp.float32)[..., None]
    return emb


# --------------------------------------------------------------------------------------------------------------
# Masks

def decoder_attention_mask(attention_mask, batch: int, T: int, past: int, xp):
    """The additive mask of docs/numerics.md §6.3: [B or 1, 1, T, past+T] float32, or None when nothing is masked.

    Causal part (only when T > 1): key j is hidden from query i when j > past + i. Padding part (when an
    ``attention_mask`` [B, past+T] of 1/0 is given): keys with 0 are hidden. A hidden key gets float32 min; a key
    hidden by both gets −inf, exactly as transformers' sum of the two parts does, so a pad query row (all keys
    hidden) still softmaxes to the same finite distribution as in transformers instead of NaN.
    Built once per forward on the host and moved to the device.
    """
    S = past + T
    blocked_causal = None
    if T > 1:
        i = np.arange(T)[:, None]  # [T, 1]
        j = np.arange(S)[None, :]
        blocked_causal = (j > past + i)[None, None]                        # [1, 1, T, S]
    blocked_pad = None
    if attention_mask is not None:
        blocked_pad = (np.asarray(attention_mask) == 0)[:, None, None, :]   # [B, 1, 1, S]
        if not blocked_pad.any():
            blocked_pad = None                                             # all ones: nothing to add
    if blocked_causal is None and blocked_pad is None:
        return None
    if blocked_pad is None:
        mask = np.where(blocked_causal, NEG_INF_F32, 0.0).astype(np.float32)
    elif blocked_causal is None:
        mask = np.where(blocked_pad, NEG_INF_F32, 0.0).astype(np.float32)
    else:
        mask = np.where(blocked_causal & blocked_pad, -np.inf,
                        np.where(blocked_causal | blocked_pad, NEG_INF_F32, 0.0)).astype(np.float32)
    return xp.asarray(mask)


# --------------------------------------------------------------------------------------------------------------
# Embedding

def embed(input_ids, p, cfg: TextConfig, xp, image_embeds=None, image_embeds_position_mask=None,
          inputs_embeds=None):
    """Token embeddings with the image rows spliced in, then × √C (docs/numerics.md §6.1). -> [B, T, C] float32.

    The rows where ``image_embeds_position_mask`` is 1 are overwritten, in row-major order, with the 64 image
    embeddings of that sample; the √C scale applies to them too. ``inputs_embeds`` (unscaled) replaces the
    lookup when given.
    """
    if inputs_embeds is None:
        ids = xp.asarray(input_ids)
        x = as_float32(p["embed_tokens"]["weight"][ids])   # [B, T, C]; fancy indexing gives a fresh array
    else:
        x = xp.array(inputs_embeds, dtype=xp.float32)                           # a copy we may write into
    if image_embeds is not None and image_embeds_position_mask is not None:
        rows = xp.asarray(np.asarray(image_embeds_position_mask) != 0)         # [B, T] bool
        x[rows] = image_embeds.reshape(-1, image_embeds.shape[-1])             # [B·Q, C] in row-major order
    if cfg.scale_embedding:
        x *= math.sqrt(cfg.embed_dim)
    return x


# --------------------------------------------------------------------------------------------------------------
# Decoder block

def self_attention(x, p, cfg: TextConfig, mask, cache=None, layer_idx: int = 0, need_probs: bool = True):
    """Causal multi-head self-attention with the sub-LN ``inner_attn_ln`` before ``out_proj``.

    x [B, T, C] -> ([B, T, C], probs [B, H, T, past+T] or None without ``need_probs``). With a cache, this step's
    keys/values are appended to it and attention runs over all stored tokens.
    """
    H = cfg.attention_heads
    q = head_projection(x, **p["q_proj"], num_heads=H)    # [B, H, T, D]
    k = head_projection(x, **p["k_proj"], num_heads=H)    # [B, H, T, D]
    v = head_projection(x, **p["v_proj"], num_heads=H)    # [B, H, T, D]
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)              # [B, H, past+T, D]
    ctx, probs = attention(q, k, v, mask, scale=1.0 / math.sqrt(cfg.head_dim), need_probs=need_probs)
    ctx = merge_heads(ctx)                                # [B, T, C]
    ctx = layer_norm(ctx, **p["inner_attn_ln"], eps=cfg.layer_norm_eps)   # Magneto's sub-LN inside attention
    return linear(ctx, **p["out_proj"]), probs


def ffn(x, p, cfg: TextConfig):
    """fc1 -> GELU -> ffn_layernorm -> fc2 (the second sub-LN sits between the activation and fc2).
    x [B, T, C] -> [B, T, C], through [B, T, F]."""
    return feed_forward(x, p["fc1"], p["fc2"], cfg.activation_function,
                        inner_norm=p["ffn_layernorm"], eps=cfg.layer_norm_eps)


def decoder_layer(x, p, cfg: TextConfig, mask, cache=None, layer_idx: int = 0, need_probs: bool = True):
    """One pre-LN block: x + attn(LN(x)), then x + ffn(LN(x)). x [B, T, C] -> ([B, T, C], attention probs)."""
    a, probs = self_attention(layer_norm(x, **p["self_attn_layer_norm"], eps=cfg.layer_norm_eps),
                              p["self_attn"], cfg, mask, cache, layer_idx, need_probs)
    x = x + a
    x = x + ffn(layer_norm(x, **p["final_layer_norm"], eps=cfg.layer_norm_eps), p["ffn"], cfg)
    return x, probs


def lm_head(h, p, cfg: TextConfig):
    """logits = h Wᵀ with W the token embedding itself when tied (docs/numerics.md §6.5).
    [B, T, C] -> [B, T, V].

    A tied checkpoint that stores a different ``lm_head`` gets it as a separate weight (weights._resolve_tied_head),
    and then, as in transformers, the logits use it."""
    head = p.get("lm_head")                 # present when untied, or tied but stored with different values
    w = head["weight"] if head is not None else p["model"]["embed_tokens"]["weight"]
    return linear(h, w)


# --------------------------------------------------------------------------------------------------------------
# The whole decoder

def text_forward(p, cfg: TextConfig, xp, *, input_ids=None, inputs_embeds=None, attention_mask=None,
                 image_embeds=None, image_embeds_position_mask=None, position_ids=None, cache=None,
                 output_hidden_states: bool = False, output_attentions: bool = False,
                 compute_logits: bool = True, logits_to_keep: int = 0) -> TextOutput:
    """The decoder on already-validated inputs. p = ``text_model``; ids and masks are host arrays.

    ``position_ids`` (raw sinusoid rows, no offset added) default to the pad-aware ids of
    :func:`position_ids_from_input_ids` after the cached tokens. ``logits_to_keep`` = k > 0 computes the head
    only for the last k positions (1 while decoding).
    """
    m = p["model"]
    past = cache.length if cache is not None else 0
    if past > 0:                                      # image rows live in the cache already
        image_embeds = image_embeds_position_mask = None
    x = embed(input_ids, m, cfg, xp, image_embeds, image_embeds_position_mask, inputs_embeds)   # [B, T, C]
    B, T = x.shape[:2]
    if position_ids is None:
        if input_ids is not None:
            position_ids = position_ids_from_input_ids(np.asarray(input_ids), cfg.pad_token_id, past)
        else:
            position_ids = np.broadcast_to(np.arange(2, T + 2) + past, (B, T))  # [B, T]
    x += sinusoidal_positions(position_ids, cfg.embed_dim, cfg.pad_token_id, xp)
    mask = decoder_attention_mask(attention_mask, B, T, past, xp)

    hidden, attns = [], []
    for i, layer in enumerate(m["layers"]):
        if output_hidden_states:
            hidden.append(x)
        x, probs = decoder_layer(x, layer, cfg, mask, cache, i, need_probs=output_attentions)
        if output_attentions:
            attns.append(probs)
    if cache is not None:
        cache.advance(T)
    x = layer_norm(x, **m["layer_norm"], eps=cfg.layer_norm_eps)
    if output_hidden_states:
        hidden.append(x)     # transformers' last hidden state is the final-LN output, not block L-1's

    logits = None
    if compute_logits:
        h = x[:, -logits_to_keep:] if logits_to_keep > 0 else x
        logits = lm_head(h, p, cfg)
    return TextOutput(last_hidden_state=x, logits=logits,
                      hidden_states=tuple(hidden) if output_hidden_states else None,
                      attentions=tuple(attns) if output_attentions else None,
                      past_key_values=cache)


def causal_lm_loss(logits, labels, xp, ignore_index: int = -100):
    """Mean next-token cross-entropy (docs/numerics.md §6.7): position t predicts labels[t+1]; targets equal to
    -100 are skipped.

    logits [B, T, V] float32, labels [B, T] host ints -> a 0-d float32 array. NaN when no target remains, as
    torch's mean over nothing gives.
    """
    labels = np.asarray(labels)
    tgt = labels[:, 1:]                                  # [B, T-1]
    keep = tgt != ignore_index
    lg = logits[:, :-1]                                  # [B, T-1, V]
    mx = lg.max(axis=-1, keepdims=True)
    lse = xp.log(xp.exp(lg - mx).sum(axis=-1)) + mx[..., 0]              # [B, T-1] log Σ exp
    safe = xp.asarray(np.where(keep, tgt, 0))
    picked = xp.take_along_axis(lg, safe[..., None], axis=-1)[..., 0]     # [B, T-1] logit of the target
    nll = (lse - picked) * xp.asarray(keep, dtype=xp.float32)
    count = int(keep.sum())
    if count == 0:
        return xp.asarray(np.float32("nan"))
    return (nll.sum() / float(count)).astype(xp.float32)
