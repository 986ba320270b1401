"""The vision tower: a CLIP ViT-L/14 encoder (docs/numerics.md §4).

Mirrors ``Kosmos2VisionEmbeddings``, ``Kosmos2VisionEncoderLayer`` and ``Kosmos2VisionTransformer`` in
``transformers/models/kosmos2/modeling_kosmos2.py``. Parameters are the subtree ``vision_model.model`` of the
checkpoint: ``embeddings``, ``pre_layrnorm`` (sic), ``encoder.layers[i]``, ``post_layernorm``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .backend import get_xp
from .config import VisionConfig
from .layers import as_float32, merge_heads
from .primitives import attention, feed_forward, head_projection, layer_norm, linear


@dataclass
class VisionOutput:
    """What the vision tower returns (transformers' ``BaseModelOutputWithPooling`` names)."""

    last_hidden_state: object                 # [B, 1+N, C], the last block's output, no post-LN
    pooler_output: object                     # [B, C] = post_layernorm(last_hidden_state[:, 0])
    hidden_states: tuple | None = None        # (pre_layrnorm output, block 0 … block L-1 outputs)
    attentions: tuple | None = None           # per block [B, H, 1+N, 1+N]


# --------------------------------------------------------------------------------------------------------------
# Embeddings

def patch_embed(pixel_values, weight):
    """The stride-14 convolution with no bias, written as a reshape and one matmul.

    A 14×14 kernel applied with stride 14 sees each patch exactly once, so the convolution is a matrix product
    of the flattened patches (channel, row, col order, as the kernel is laid out) with the kernel as a matrix.
    pixel_values [B, 3, H, W], weight [C, 3, P, P] -> [B, gh·gw, C], patches in row-major order.
    """
    B, Cin, H, W = pixel_values.shape
    C, _, P, _ = weight.shape
    gh, gw = H // P, W // P
    x = pixel_values[:, :, :gh * P, :gw * P]                     # a stride-P conv drops any remainder
    x = x.reshape(B, Cin, gh, P, gw, P)                          # [B, 3, gh, P, gw, P]
    x = x.transpose(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, Cin * P * P)   # [B, N, 3·P·P]
    kernel = as_float32(weight).reshape(C, Cin * P * P)          # [C, 3·P·P]: the conv kernel as a matrix
    return x @ kernel.T                                          # [B, N, C]


def cubic_weights_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The [n_out, n_in] matrix of PyTorch's 1-D bicubic resize (align_corners=False, A=-0.75, no antialias).

    Source coordinate (i + 0.5)·(n_in/n_out) − 0.5, not clamped; four taps at floor−1 … floor+2, each index
    clamped to [0, n_in−1] (border replication); Keys' cubic convolution weights with A = −0.75.
    Built in float64 on the host; it is tiny.
    """
    A = -0.75
    scale = n_in / n_out
    M = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        f = math.floor(src)
        t = src - f

        def near(d):   # |d| <= 1
            return ((A + 2) * d - (A + 3)) * d * d + 1

        def far(d):    # 1 < |d| < 2
            return ((A * d - 5 * A) * d + 8 * A) * d - 4 * A

        for tap, w in ((f - 1, far(t + 1)), (f, near(t)), (f + 1, near(1 - t)), (f + 2, far(2 - t))):
            M[i, min(max(tap, 0), n_in - 1)] += w
    return M


def position_embeddings(pos_weight, height: int, width: int, patch_size: int):
    """The [1+N, C] position vectors for an image of height × width (docs/numerics.md §4.3).

    The table is trained for a square grid of g×g patches. For another grid (``interpolate_pos_encoding``) the
    g×g patch vectors are resized with PyTorch-style bicubic interpolation to (H//P)×(W//P); the CLS vector
    (row 0) is kept. As in transformers, a grid with the same patch count and H == W uses the table unchanged.
    """
    xp = get_xp(pos_weight)
    pos = as_float32(pos_weight)                       # [1+g², C]
    n_pos = pos.shape[0] - 1
    gh, gw = height // patch_size, width // patch_size
    if gh * gw == n_pos and height == width:
        return pos
    g = int(round(math.sqrt(n_pos)))
    C = pos.shape[1]
    grid = pos[1:].reshape(g, g, C)                    # [g, g, C] rows × cols
    Mh = xp.asarray(cubic_weights_matrix(g, gh), dtype=xp.float32)   # [gh, g]
    Mw = xp.asarray(cubic_weights_matrix(g, gw), dtype=xp.float32)   # [gw, g]
    grid = (Mh @ grid.reshape(g, g * C)).reshape(gh, g, C)            # resize rows:    [gh, g, C]
    grid = (Mw @ grid.transpose(1, 0, 2).reshape(g, gh * C))          # resize columns: [gw, gh·C]
    grid = grid.reshape(gw, gh, C).transpose(1, 0, 2).reshape(gh * gw, C)   # [gh·gw, C] row-major
    return xp.concatenate([pos[:1], grid], axis=0)     # [1 + gh·gw, C]


def embeddings(pixel_values, p, cfg: VisionConfig, interpolate_pos_encoding: bool = False):
    """Patches -> tokens: patch embedding, CLS token prepended, absolute positions added.

    pixel_values [B, 3, H, W] -> [B, 1 + N, C]. Without ``interpolate_pos_encoding`` only the configured
    image size is accepted (as transformers 5.x does).
    """
    xp = get_xp(pixel_values)
    B, _, H, W = pixel_values.shape
    if not interpolate_pos_encoding and (H != cfg.image_size or W != cfg.image_size):
        raise ValueError(f"pixel_values has image size {H}x{W}, but the model expects "
                         f"{cfg.image_size}x{cfg.image_size}; pass interpolate_pos_encoding=True for other sizes")
    x = patch_embed(pixel_values, p["patch_embedding"]["weight"])         # [B, N, C]
    cls = xp.broadcast_to(as_float32(p["class_embedding"]), (B, 1, x.shape[-1]))   # [B, 1, C]
    x = xp.concatenate([cls, x], axis=1)                                  # [B, 1+N, C]
    if interpolate_pos_encoding:
        x += position_embeddings(p["position_embedding"]["weight"], H, W, cfg.patch_size)
    else:
        x += as_float32(p["position_embedding"]["weight"])                 # [1+N, C] broadcast over B
    return x


# --------------------------------------------------------------------------------------------------------------
# Encoder

def self_attention(x, p, num_heads: int, need_probs: bool = True):
    """Bidirectional multi-head self-attention, no mask. x [B, S, C] -> ([B, S, C], probs [B, H, S, S], or None
    from the fast primitives without ``need_probs``)."""
    q = head_projection(x, **p["q_proj"], num_heads=num_heads)  # [B, H, S, D]
    k = head_projection(x, **p["k_proj"], num_heads=num_heads)  # [B, H, S, D]
    v = head_projection(x, **p["v_proj"], num_heads=num_heads)  # [B, H, S, D]
    ctx, probs = attention(q, k, v, need_probs=need_probs)  # [B, H, S, D]
    return linear(merge_heads(ctx), **p["out_proj"]), probs  # [B, H, S, D] -> [B, S, C]


def encoder_layer(x, p, cfg: VisionConfig, need_probs: bool = True):
    """One pre-LN CLIP block: x + attn(LN1(x)), then x + fc2(act(fc1(LN2(x)))). x [B, S, C] -> [B, S, C]."""
    h = layer_norm(x, **p["layer_norm1"], eps=cfg.layer_norm_eps)
    a, probs = self_attention(h, p["self_attn"], cfg.num_attention_heads, need_probs)
    x = x + a
    h = layer_norm(x, **p["layer_norm2"], eps=cfg.layer_norm_eps)
    x = x + feed_forward(h, p["mlp"]["fc1"], p["mlp"]["fc2"], cfg.hidden_act)   # fc1 [B, S, 4C], fc2 [B, S, C]
    return x, probs


def vision_forward(pixel_values, p, cfg: VisionConfig, *, output_hidden_states: bool = False,
                   output_attentions: bool = False, interpolate_pos_encoding: bool = False) -> VisionOutput:
    """The whole tower. pixel_values [B, 3, H, W] float32 -> :class:`VisionOutput` (p = ``vision_model.model``)."""
    x = embeddings(pixel_values, p["embeddings"], cfg, interpolate_pos_encoding)   # [B, 1+N, C]
    x = layer_norm(x, **p["pre_layrnorm"], eps=cfg.layer_norm_eps)
    hidden, attns = [], []
    for layer in p["encoder"]["layers"]:
        if output_hidden_states:
            hidden.append(x)
        x, probs = encoder_layer(x, layer, cfg, need_probs=output_attentions)
        if output_attentions:
            attns.append(probs)
    if output_hidden_states:
        hidden.append(x)
    pooled = layer_norm(x[:, 0], **p["post_layernorm"], eps=cfg.layer_norm_eps)    # [B, C]
    return VisionOutput(last_hidden_state=x, pooler_output=pooled,
                        hidden_states=tuple(hidden) if output_hidden_states else None,
                        attentions=tuple(attns) if output_attentions else None)
