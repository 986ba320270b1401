"""The textbook primitives every stage is built from: linear, layer_norm, gelu, quick_gelu, feed_forward, softmax,
attention.

Each is its formula, in a few lines, to be read in one sitting. Functions of arrays and parameters only; they know
no model. The array namespace comes from the input (``get_xp``), so the same code runs on NumPy and CuPy.
Everything computes in float32.

The model runs faster forms of some of these by default (:mod:`kosmos2_ref.fast`, each naming the function here
that it replaces); ``Kosmos2(..., reference=True)`` or ``KOSMOS2_REFERENCE=1`` runs it on these instead
(:mod:`kosmos2_ref.primitives` picks). This module imports neither.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import erfc, get_xp

NEG_INF_F32 = float(np.finfo(np.float32).min)   # transformers' additive "masked" value (docs/numerics.md §6.3)


def as_float32(w):
    """A stored weight -> float32 for compute.

    float32 passes through untouched (no copy); float16 is widened; bfloat16 is held as raw uint16 bits (NumPy has
    no bfloat16, see :mod:`kosmos2_ref.weights`) and widened by shifting the bits into the top half of a float32.
    """
    xp = get_xp(w)
    if w.dtype == xp.float32:
        return w
    if w.dtype == xp.uint16:
        bits = w.astype(xp.uint32)          # one new 4-byte array, shifted in place (not a second one)
        bits <<= 16
        return bits.view(xp.float32)
    return w.astype(xp.float32)


def linear(x, weight, bias=None):
    """y = x Wᵀ + b with W stored [out, in] as in the checkpoint. x [..., in] -> [..., out]."""
    y = x @ as_float32(weight).T            # [..., in] @ [in, out] -> [..., out]
    return y if bias is None else y + bias


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """LayerNorm over the last axis: (x − mean) / √(var + eps) · weight + bias, biased variance. x [..., C]."""
    xp = get_xp(x)
    # Moments in float64 (numerics: with a float32 sum a constant row's mean is an ulp off, which 1/√eps amplifies).
    mean = x.mean(axis=-1, keepdims=True, dtype=xp.float64).astype(xp.float32)          # [..., 1]
    xc = x - mean                                                                        # [..., C]
    var = (xc * xc).mean(axis=-1, keepdims=True, dtype=xp.float64).astype(xp.float32)  # [..., 1]
    return xc / xp.sqrt(var + eps) * weight + bias


def gelu(x):
    """Exact GELU, 0.5·x·(1 + erf(x/√2)), written as 0.5·x·erfc(−x/√2).

    For x ≪ 0, 1 + erf(x/√2) subtracts two nearly equal numbers and loses the tail's relative precision; erfc of
    a positive argument keeps it. (The tanh form is off by ~5e-4: no parity with torch's exact ``gelu``.)
    """
    return 0.5 * x * erfc(-x / math.sqrt(2.0))


def quick_gelu(x):
    """CLIP's quick GELU: x · sigmoid(1.702 x) = x / (1 + exp(−1.702 x))."""
    return x / (1.0 + get_xp(x).exp(-1.702 * x))


ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu}


def feed_forward(x, fc1, fc2, activation: str, inner_norm=None, eps: float = 1e-5):
    """The transformer block's MLP: fc2(act(fc1(x))), with an optional LayerNorm between the activation and fc2
    (the text decoder's sub-LN ``ffn_layernorm``; CLIP's MLP has none).

    fc1, fc2 and inner_norm are parameter dicts ({"weight", "bias"}); activation a key of ACTIVATIONS.
    x [..., C] -> [..., C], through a hidden [..., F].
    """
    h = ACTIVATIONS[activation](linear(x, **fc1))      # [..., F]
    if inner_norm is not None:
        h = layer_norm(h, **inner_norm, eps=eps)
    return linear(h, **fc2)                            # [..., C]


def softmax(x, axis: int = -1):
    """Numerically stable softmax: exp(x − max) / Σ exp(x − max)."""
    e = get_xp(x).exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def split_heads(x, num_heads: int):
    """[B, T, C] -> [B, H, T, D] with D = C / H."""
    B, T, C = x.shape
    return x.reshape(B, T, num_heads, C // num_heads).transpose(0, 2, 1, 3)  # [B, T, C] -> [B, T, H, D] -> [B, H, T, D]


def head_projection(x, weight, bias, num_heads: int):
    """One of attention's projections (q, k or v), split into heads: split_heads(linear(x)).
    x [B, T, C], weight [N, C] -> [B, H, T, N / H]."""
    return split_heads(linear(x, weight, bias), num_heads)  # [B, T, C] -> [B, T, N] -> [B, H, T, D]


def merge_heads(x):
    """[B, H, T, D] -> [B, T, H·D]."""
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)  # [B, H, T, D] -> [B, T, H, D] -> [B, T, H·D]


def attention(q, k, v, mask=None, scale: float | None = None, need_probs: bool = True):
    """Scaled dot-product attention: softmax(q kᵀ · scale + mask) v, with scale 1/√D unless given.

    q [B, H, T, D], k and v [B, H, S, D], mask additive and broadcastable to [B, H, T, S] (0 = keep, a very
    negative number = drop). Returns (output [B, H, T, D], probabilities [B, H, T, S]). ``need_probs`` is there
    for :func:`kosmos2_ref.fast.attention`, which may then skip keeping them; here they are always returned.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = q @ k.swapaxes(-1, -2) * scale     # [B, H, T, D] @ [B, H, D, S] -> [B, H, T, S]
    if mask is not None:
        scores = scores + mask
    probs = softmax(scores)                     # [B, H, T, S]
    return probs @ v, probs                     # [B, H, T, S] @ [B, H, S, D] -> [B, H, T, D]
