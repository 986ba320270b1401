"""The primitives every stage is built from: linear, layer_norm, gelu, quick_gelu, softmax, attention.

Functions of arrays and parameters only; they know no model. The array namespace comes from the input
(``get_xp``), so the same code runs on NumPy and CuPy. Everything computes in float32.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import erfc, get_xp

NEG_INF_F32 = float(np.finfo(np.float32).min)   # the additive "masked" value transformers uses (spec §5.3)


def as_float32(w):
    """A stored weight -> float32 for compute.

    float32 passes through untouched (no copy); float16 is widened; bfloat16 is held as raw uint16 bits (NumPy has
    no bfloat16, see :mod:`kosmos2_ref.weights`) and widened by shifting the bits into the top half of a float32.
    """
    xp = get_xp(w)
    if w.dtype == xp.float32:
        return w
    if w.dtype == xp.uint16:
        return (w.astype(xp.uint32) << 16).view(xp.float32)
    return w.astype(xp.float32)


def linear(x, weight, bias=None):
    """y = x Wᵀ + b with W stored [out, in] as in the checkpoint.

    ``weight.T`` is a free view: BLAS reads the transposed layout directly, so no copy is made for float32.
    """
    y = x @ as_float32(weight).T            # [..., in] @ [in, out] -> [..., out]
    if bias is not None:
        y += bias                           # in place: y is a fresh array
    return y


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) · weight + bias, biased variance, in float32."""
    xp = get_xp(x)
    # The moments accumulate in float64 (only the [..., 1] results are float64; no large temporaries): with a
    # float32 sum, a constant row gets a mean off by an ulp, which 1/sqrt(eps) then amplifies ~300-fold.
    mean = x.mean(axis=-1, keepdims=True, dtype=xp.float64).astype(xp.float32)   # [..., 1]
    xc = x - mean                                                                  # [..., C]
    var = (xc * xc).mean(axis=-1, keepdims=True, dtype=xp.float64)                # [..., 1]
    xc *= (1.0 / xp.sqrt(var + eps)).astype(xp.float32)
    xc *= weight
    xc += bias
    return xc


def gelu(x):
    """Exact GELU, 0.5·x·(1 + erf(x/√2)) = 0.5·x·erfc(-x/√2).

    Written with erfc so the left tail (where 1 + erf cancels) keeps its relative precision. The tanh form
    is off by ~5e-4 and would break parity with transformers' ``nn.functional.gelu``.
    """
    return (0.5 * x) * erfc(x * (-1.0 / math.sqrt(2.0)))


def quick_gelu(x):
    """CLIP's quick GELU: x · sigmoid(1.702 x)."""
    xp = get_xp(x)
    return x / (1.0 + xp.exp(-1.702 * x))


ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu}


def softmax(x, axis: int = -1):
    """Numerically stable softmax: exp(x - max) / Σ exp(x - max), in place on a fresh temporary."""
    xp = get_xp(x)
    e = x - x.max(axis=axis, keepdims=True)
    xp.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def split_heads(x, num_heads: int):
    """[B, T, C] -> [B, H, T, D] with D = C / H."""
    B, T, C = x.shape
    return x.reshape(B, T, num_heads, C // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[B, H, T, D] -> [B, T, H·D]."""
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def attention(q, k, v, mask=None, scale: float | None = None):
    """Scaled dot-product attention.

    q [B, H, T, D], k and v [B, H, S, D], mask additive and broadcastable to [B, H, T, S] (0 = keep, a very
    negative number = drop). Returns (output [B, H, T, D], probabilities [B, H, T, S]).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = q @ k.swapaxes(-1, -2)     # [B, H, T, D] @ [B, H, D, S] -> [B, H, T, S]
    scores *= scale
    if mask is not None:
        scores += mask
    probs = softmax(scores, axis=-1)    # [B, H, T, S]
    return probs @ v, probs             # [B, H, T, S] @ [B, H, S, D] -> [B, H, T, D]
