"""The image-to-text connector: 257 vision tokens -> 64 image embeddings (docs/numerics.md §5).

Mirrors the image path of ``Kosmos2ForConditionalGeneration.forward`` (post_layernorm over *all* tokens, then
``F.normalize``) and ``Kosmos2ImageToTextProjection`` in ``transformers/models/kosmos2/modeling_kosmos2.py``.

Why 64: a fixed set of learned *latent queries* cross-attends to the image tokens (and to themselves), so the
decoder always receives the same small number of image rows whatever the image resolution.
"""
from __future__ import annotations

from .backend import get_xp
from .layers import as_float32, merge_heads
from .primitives import attention, head_projection, layer_norm, linear


def l2_normalize(x, eps: float = 1e-12):
    """x / max(‖x‖₂, eps) along the last axis (``torch.nn.functional.normalize``)."""
    xp = get_xp(x)
    norm = xp.sqrt((x * x).sum(axis=-1, keepdims=True))     # [..., 1]
    return x / xp.maximum(norm, eps)


def cross_attention(queries, keys_values, p, num_heads: int):
    """Multi-head attention with queries from one sequence and keys/values from another; no mask.

    queries [B, Q, C], keys_values [B, S, C] -> (output [B, Q, C], probabilities [B, H, Q, S]).
    No inner LayerNorm, no residual, no output norm: the connector's ``x_attn`` is a plain attention.
    """
    q = head_projection(queries, **p["q_proj"], num_heads=num_heads)      # [B, H, Q, D]
    k = head_projection(keys_values, **p["k_proj"], num_heads=num_heads)  # [B, H, S, D]
    v = head_projection(keys_values, **p["v_proj"], num_heads=num_heads)  # [B, H, S, D]
    ctx, probs = attention(q, k, v)                                  # [B, H, Q, D]
    return linear(merge_heads(ctx), **p["out_proj"]), probs          # [B, Q, C]


def image_to_text(vision_last_hidden_state, post_layernorm, p, num_heads: int, eps: float = 1e-5):
    """Vision tokens -> image embeddings for the decoder.

    vision_last_hidden_state [B, 1+N, Cv] (the tower's output, before post-LN); ``post_layernorm`` the vision
    tower's own final LN parameters (reused here on every token, not just CLS); p = ``image_to_text_projection``.
    Returns (image_embeds [B, Q, C], projection_attentions [B, H, Q, 1+N+Q]) with Q = latent_query_num.
    """
    xp = get_xp(vision_last_hidden_state)
    e = layer_norm(vision_last_hidden_state, **post_layernorm, eps=eps)    # [B, 1+N, Cv]
    e = l2_normalize(e)                                                    # unit length per token
    f = linear(e, **p["dense"])                                            # [B, 1+N, C]
    B = f.shape[0]
    latent = xp.broadcast_to(as_float32(p["latent_query"]), (B,) + p["latent_query"].shape)   # [B, Q, C]
    kv = xp.concatenate([f, latent], axis=1)                               # [B, 1+N+Q, C]: image, then queries
    return cross_attention(latent, kv, p["x_attn"], num_heads)
