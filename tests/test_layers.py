"""The primitives against plain float64 references, over hypothesis-drawn shapes and values: the textbook ones of
kosmos2_ref.layers, and where the model runs a faster form (kosmos2_ref.fast), that one too."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kosmos2_ref import fast, layers
from kosmos2_ref.backend import erf_numpy, erfc_numpy
from kosmos2_ref.layers import NEG_INF_F32, merge_heads, softmax, split_heads

BOTH = pytest.mark.parametrize("ops", [layers, fast], ids=["reference", "fast"])

finite = st.floats(-20, 20, allow_nan=False, width=32)


def arrays(shape):
    return hnp.arrays(np.float32, shape, elements=finite)


shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=9)


@BOTH
@settings(max_examples=60, deadline=None)
@given(st.data())
def test_layer_norm_matches_float64(ops, data):
    shape = data.draw(shapes)
    x = data.draw(arrays(shape))
    w = data.draw(arrays(shape[-1:]))
    b = data.draw(arrays(shape[-1:]))
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    ref = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b
    out = ops.layer_norm(x.copy(), w, b, 1e-5)
    assert out.dtype == np.float32
    # normalised values are O(|w|·√C); float32 rounding of mean/var gives ~1e-6 relative. And x − mean is taken
    # in float32 (as torch does): it can be off by an ulp of |x|, which the division by the standard deviation
    # magnifies when the row is nearly constant (hypothesis found [11.1875, 11.18296 ×3]: 1.3e-4 off float64,
    # the same as torch's layer_norm on it).
    var = ((x64 - mu) ** 2).mean(-1, keepdims=True)
    cancel = (4 * np.finfo(np.float32).eps * np.abs(x64).max(-1, keepdims=True) / np.sqrt(var + 1e-5)).max()
    atol = (2e-5 * (1 + math.sqrt(shape[-1])) + cancel) * (1 + np.abs(w).max())
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=atol)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_softmax_matches_float64(data):
    shape = data.draw(shapes)
    x = data.draw(arrays(shape)) * np.float32(3)
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    ref = e / e.sum(-1, keepdims=True)
    out = softmax(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


@BOTH
@settings(max_examples=50, deadline=None)
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 4),
    T=st.integers(1, 7),
    P=st.integers(0, 5),
    D=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    causal=st.booleans(),
    pad=st.booleans(),
)
def test_attention_with_masks_matches_float64(ops, B, H, T, P, D, seed, causal, pad):
    rng = np.random.default_rng(seed)
    S = T + P
    q = rng.standard_normal((B, H, T, D)).astype(np.float32)
    k = rng.standard_normal((B, H, S, D)).astype(np.float32)
    v = rng.standard_normal((B, H, S, D)).astype(np.float32)
    allowed = np.ones((B, 1, T, S), bool)
    if causal:
        allowed &= np.arange(S)[None, :] <= (P + np.arange(T))[:, None]
    if pad:
        keep = rng.random((B, S)) > 0.3
        keep[:, P:] = True  # every query keeps at least itself
        allowed &= keep[:, None, None, :]
    mask = np.where(allowed, 0.0, NEG_INF_F32).astype(np.float32)
    out, probs = ops.attention(q, k, v, mask, scale=1.0 / math.sqrt(D))
    s = (q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2)) / math.sqrt(D)
    s = np.where(allowed, s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    p_ref = e / e.sum(-1, keepdims=True)
    assert out.dtype == probs.dtype == np.float32
    np.testing.assert_allclose(probs, p_ref, atol=2e-6)
    np.testing.assert_allclose(out, p_ref @ v.astype(np.float64), atol=1e-5)
    assert np.all(probs[np.broadcast_to(~allowed, probs.shape)] == 0.0)


@BOTH
@settings(max_examples=40, deadline=None)
@given(st.data())
def test_linear_matches_float64(ops, data):
    n_in, n_out = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    lead = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=5))
    x = data.draw(arrays(lead + (n_in,)))
    w = data.draw(arrays((n_out, n_in)))
    b = data.draw(arrays((n_out,)))
    ref = x.astype(np.float64) @ w.astype(np.float64).T + b
    np.testing.assert_allclose(ops.linear(x, w, b), ref, rtol=1e-5, atol=1e-5 * (1 + np.abs(ref).max()))


def test_heads_round_trip():
    x = np.arange(2 * 5 * 12, dtype=np.float32).reshape(2, 5, 12)
    h = split_heads(x, 3)
    assert h.shape == (2, 3, 5, 4)
    assert np.array_equal(h[1, 2, 3], x[1, 3, 8:12])
    assert np.array_equal(merge_heads(h), x)


def test_erf_and_erfc_against_math():
    z = np.concatenate([np.linspace(-6, 6, 20001), [0.0, 1e-8, -1e-8, 1e-4, 30.0, -30.0]])
    got = erf_numpy(z.astype(np.float32)).astype(np.float64)
    got_c = erfc_numpy(z.astype(np.float32)).astype(np.float64)
    # the input itself is rounded to float32: compare with erf at the rounded point
    z32 = z.astype(np.float32).astype(np.float64)
    ref = np.array([math.erf(t) for t in z32])
    ref_c = np.array([math.erfc(t) for t in z32])
    err = np.abs(got - ref).max()
    rel_c = (np.abs(got_c - ref_c) / np.maximum(ref_c, 1e-30))[ref_c > 1e-30].max()
    print(f"\n  erf max abs error {err:.2e}, erfc max relative error {rel_c:.2e}")
    assert err < 5e-7  # ~4 float32 ulps at 1.0
    # relative: for z ≈ 6 the float32 rounding of the exponent −z² alone is ~36 × 6e-8 ≈ 2e-6
    assert rel_c < 1e-5


@BOTH
def test_gelu_is_exact_erf_form_not_tanh(ops):
    x = np.linspace(-12, 12, 4801).astype(np.float32)
    ref = np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in x.astype(np.float64)])
    tanh_form = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    got = ops.gelu(x)
    assert got.dtype == np.float32
    err = np.abs(got - ref).max()
    print(f"\n  gelu max abs error {err:.2e} (tanh form: {np.abs(tanh_form - ref).max():.2e})")
    assert err < 2e-6
    assert np.abs(tanh_form - ref).max() > 1e-4  # the check can tell the two forms apart


@BOTH
def test_quick_gelu(ops):
    x = np.linspace(-10, 10, 101).astype(np.float32)
    ref = x.astype(np.float64) / (1 + np.exp(-1.702 * x.astype(np.float64)))
    np.testing.assert_allclose(ops.quick_gelu(x), ref, rtol=1e-6, atol=1e-6)
