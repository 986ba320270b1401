"""Each fast primitive (kosmos2_ref.fast) against the textbook one it replaces (kosmos2_ref.layers), on awkward
shapes and values: odd and unit widths, no rows, 1-9 rows, strided, reversed and column-major inputs, 2-byte
weights with inf/NaN and subnormals (writable and read-only), fully masked and padded causal attention rows,
prompts longer than one attention block. Block sizes are shrunk so the tiny arrays take the full-size paths.

Tolerances: the products and attention sum in another order than the textbook form, so they agree to a few
float32 roundings of the absolute scale (|x|·|W|ᵀ for a product): 1e-5 × that scale. LayerNorm multiplies by a
float64 reciprocal where the textbook divides: 1e-6 × (|w|·max|x̂| + |b|). quick-GELU and the in-place softmax do
the very same operations and must agree bit for bit. GELU is another formula (x · sigmoid of a fitted logit, see
fast.gelu): it is held to the exact function, computed in float64 from math.erfc, within 2e-7 × |x|, and gives
inf and NaN as the textbook does (whose own accuracy tests/test_layers.py checks). Measured errors are printed
(pytest -s).
Outputs must have the textbook's memory layout (row-major for a row-major input, and for every product), but
head_projection's heads: a view of a product, as the textbook's are, in whichever layout the product came.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kosmos2_ref import fast, fused, layers
from kosmos2_ref.decoder import decoder_attention_mask
from kosmos2_ref.layers import NEG_INF_F32
from kosmos2_ref.weights import float32_to_bf16_bits

rng = np.random.default_rng(17)
# inf/NaN inputs are deliberate here (their propagation is compared): NumPy's warnings about them are expected
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows / elements, so tiny arrays take the blocked paths (partial last blocks included)."""
    monkeypatch.setattr(fast, "UPCAST_MIN_SIZE", 0)
    monkeypatch.setattr(fast, "UPCAST_BLOCK_BYTES", 4 * 64 * 3)  # ~3 rows of W per block (K = 64)
    monkeypatch.setattr(fast, "UPCAST_BLOCK_BYTES_MANY_ROWS", 4 * 64 * 5)
    monkeypatch.setattr(fast, "ELEMENTWISE_BLOCK", 7)
    monkeypatch.setattr(fast, "TRANSPOSE_TILE", (2, 3))


def close(name, got, ref, scale, tol):
    """Same shape and dtype, same non-finite entries, finite ones within tol × scale; prints the error."""
    assert got.shape == ref.shape and got.dtype == ref.dtype == np.float32, (got.shape, ref.shape, got.dtype)
    assert np.array_equal(np.isnan(got), np.isnan(ref)), f"{name}: NaN entries differ"
    assert np.array_equal(np.where(np.isinf(got), np.sign(got), 0), np.where(np.isinf(ref), np.sign(ref), 0)), (
        f"{name}: inf entries differ"
    )
    fin = np.isfinite(ref)
    err = float(np.abs(got[fin].astype(np.float64) - ref[fin]).max()) if fin.any() else 0.0
    bound = tol * float(np.max(scale)) if np.size(scale) else 0.0
    print(f"  {name:<58s} max|Δ| {err:.2e}  (tol {bound:.2e})")
    assert err <= bound, f"{name}: max|Δ| {err:.3e} > {bound:.3e}"


def same_layout(got, ref):
    assert got.flags.c_contiguous == ref.flags.c_contiguous and got.flags.f_contiguous == ref.flags.f_contiguous


# --------------------------------------------------------------------------------------------------------------
# linear


def _x(lead, K, layout):
    x = rng.standard_normal(lead + (K,)).astype(np.float32)
    if layout == "strided":  # every other row of a larger array: not contiguous
        x = np.repeat(x, 2, axis=0)[::2] if x.ndim > 1 and x.shape[0] else x
        x = np.concatenate([x, x], axis=-1)[..., ::2]
    elif layout == "column-major":
        x = np.asfortranarray(x)
    return x


def _weight(N, K, storage, writable=True, special=False):
    w32 = (rng.standard_normal((N, K)) * 0.5).astype(np.float32)
    if special:
        w32[0, 0] = 3e-6 if storage != "bfloat16" else 1e-40  # a subnormal of the storage type
        w32[min(1, N - 1), -1] = -0.0
    if storage == "float32":
        w = w32
    elif storage == "float16":
        w = w32.astype(np.float16)
        if special and N > 2:
            w[2, 0] = np.inf  # x ≥ 0 below, so the row is +inf either way
            w[min(3, N - 1), -1] = np.nan
    else:
        w = float32_to_bf16_bits(w32)
    w.flags.writeable = writable
    return w


ROWS = [(0,), (1,), (2,), (3,), (4,), (9,), (2, 3), (1, 1)]


# 2-byte weights with few rows take the fused product (Numba, a dev dependency) unless KOSMOS2_FUSED=off, which
# widens them in blocks: both forms are compared
STORAGES = [("float32", ""), ("float16", ""), ("float16", "off"), ("bfloat16", ""), ("bfloat16", "off")]


@pytest.mark.parametrize("storage,fused_setting", STORAGES)
@pytest.mark.parametrize("K", [1, 33, 64])
@pytest.mark.parametrize("layout", ["row-major", "strided", "column-major"])
def test_linear(storage, fused_setting, K, layout, small_blocks, monkeypatch):
    monkeypatch.setenv(fused.FUSED_ENV, fused_setting)
    assert fused_setting or storage == "float32" or fused.available(), "Numba is missing: pip install -e '.[dev]'"
    print()
    for lead in ROWS:
        for writable in (True, False):
            for bias in (None, rng.standard_normal(11).astype(np.float32)):
                x = np.abs(_x(lead, K, layout))  # ≥ 0: an inf weight gives +inf, never inf − inf
                w = _weight(11, K, storage, writable, special=True)
                for _ in range(2):  # the second time a read-only float16 is known finite
                    got, ref = fast.linear(x, w, bias), layers.linear(x, w, bias)
                    scale = x.reshape(-1, K) @ np.abs(np.nan_to_num(layers.as_float32(w), posinf=0.0)).T
                    scale = (scale + (0 if bias is None else np.abs(bias))) if scale.size else scale
                    close(
                        f"linear {storage} K={K} rows {lead} {layout} {'rw' if writable else 'ro'}"
                        f"{'' if bias is None else ' +b'}",
                        got,
                        ref,
                        scale,
                        1e-5,
                    )
                    assert got.flags.c_contiguous


def test_linear_weight_first_keeps_rows_and_layout():
    """The product of many rows (weight first in BLAS) comes back row-major, with and without bias."""
    x = rng.standard_normal((2, 37, 50)).astype(np.float32)
    w = rng.standard_normal((70, 50)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    for bias in (None, b):
        got = fast._matmul_weight_first(x, w, bias)
        ref = layers.linear(x, w, bias)
        assert got.flags.c_contiguous and got.shape == (2, 37, 70)
        close("weight-first [2,37,50] x [70,50]", got, ref, np.abs(x).reshape(-1, 50) @ np.abs(w).T + np.abs(b), 1e-5)


# --------------------------------------------------------------------------------------------------------------
# head_projection: q, k or v split into heads, a view of the weight-first product where that form is kept


@pytest.mark.parametrize("form", [fast.WEIGHT_FIRST, fast.X_FIRST])
@pytest.mark.parametrize("lead", [(1, 1), (1, 5), (2, 9), (3, 4), (1, 0)], ids=str)
@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_head_projection(monkeypatch, form, lead, storage, bias, small_blocks):
    """Against the textbook split_heads(linear(x)) (product tolerance), and bit for bit against the fast
    :func:`linear` split the same way: the same product and bias add, only the layout of the heads differs."""
    monkeypatch.setenv(fast.PRODUCT_FORM_ENV, form)
    C, N, H = 10, 12, 3
    x = rng.standard_normal(lead + (C,)).astype(np.float32)
    w32 = (rng.standard_normal((N, C)) / np.sqrt(C)).astype(np.float32)
    w = float32_to_bf16_bits(w32) if storage == "bfloat16" else w32
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    got = fast.head_projection(x, w, b, H)
    ref = layers.head_projection(x, w, b, H)
    scale = np.abs(x) @ np.abs(layers.as_float32(w)).T + (np.abs(b) if bias else 0.0)
    close(f"head_projection {form} {lead} {storage} {'+b' if bias else ''}", got, ref, scale, 1e-5)
    assert np.array_equal(got, layers.split_heads(fast.linear(x, w, b), H))
    rows = x.size // C
    if form == fast.WEIGHT_FIRST and storage == "float32" and rows > fast.MATVEC_CANDIDATE_ROWS:
        assert got.strides[-2] == 4  # a view of the [N, M] product: the rows run along memory
    elif rows > 1:
        assert got.strides[-1] == 4  # a view of the [M, N] product: each head's D columns do


def test_head_projection_feeds_attention_as_the_split_product_does():
    """The heads as a view of the [N, M] product (each head a transposed [T, D] matrix) give the attention
    the split row-major product gives, with and without probabilities: the products read either layout."""
    B, T, C, H = 2, 13, 24, 4
    x = rng.standard_normal((B, T, C)).astype(np.float32)
    ws = [(rng.standard_normal((C, C)) / np.sqrt(C)).astype(np.float32) for _ in range(3)]
    bs = [rng.standard_normal(C).astype(np.float32) for _ in range(3)]
    heads = [fast._heads_from_columns(x, w, b, H) for w, b in zip(ws, bs)]
    rows = [np.ascontiguousarray(layers.split_heads(fast._matmul_weight_first(x, w, b), H)) for w, b in zip(ws, bs)]
    assert not heads[0].flags.c_contiguous and heads[0].shape == (B, H, T, C // H)
    for need_probs in (True, False):
        got, ref = fast.attention(*heads, need_probs=need_probs)[0], fast.attention(*rows, need_probs=need_probs)[0]
        close(f"attention after head_projection, probs {need_probs}", got, ref, np.abs(ref).max(), 1e-6)


# --------------------------------------------------------------------------------------------------------------
# layer_norm


@pytest.mark.parametrize(
    "case",
    [
        "C=1",
        "constant rows",
        "offset 1e4",
        "zero rows",
        "strided",
        "reversed",
        "column-major",
        "[1,1,2048]",
        "long rows",
    ],
)
@pytest.mark.parametrize("fused_setting", ["", "off"])  # Numba's kernel for row-major float32 x, or NumPy's form
def test_layer_norm(case, fused_setting, monkeypatch):
    monkeypatch.setenv(fused.FUSED_ENV, fused_setting)
    assert fused_setting or fused.available(), "Numba is missing: pip install -e '.[dev]'"
    shapes = {"C=1": (3, 1), "zero rows": (0, 5), "[1,1,2048]": (1, 1, 2048), "long rows": (40, 8192)}
    x = rng.standard_normal(shapes.get(case, (9, 33))).astype(np.float32)
    if case == "constant rows":
        x[:] = np.float32(11.1875)
    elif case == "offset 1e4":
        x = x * np.float32(1e-2) + np.float32(1e4)
    elif case == "long rows":  # 327,680 elements: shared among the threads; float32 variance summed over 8192
        x = x * np.float32(30) + np.float32(100)
    elif case == "strided":
        x = np.concatenate([x, x], axis=-1)[:, ::2]
    elif case == "reversed":
        x = x[::-1, ::-1]
    elif case == "column-major":
        x = np.asfortranarray(x)
    C = x.shape[-1]
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    got, ref = fast.layer_norm(x, w, b, 1e-5), layers.layer_norm(x, w, b, 1e-5)
    xhat = np.abs(ref - b) / np.maximum(np.abs(w), 1e-30)
    scale = np.abs(w) * (xhat.max() if xhat.size else 0.0) + np.abs(b)
    close(f"layer_norm {case} {x.shape}", got, ref, scale, 1e-6)
    same_layout(got, ref)


@pytest.mark.parametrize("fused_setting", ["", "off"])
@pytest.mark.parametrize("case", ["[8192,71]", "constant columns", "offset 1e4", "one column"])
def test_layer_norm_down_the_columns(case, fused_setting, monkeypatch):
    """The MLP's inner LayerNorm on its transposed hidden activation h [F, M] (fast._layer_norm_columns), in
    Numba's kernel or NumPy's form: the textbook LayerNorm of hᵀ, transposed."""
    monkeypatch.setenv(fused.FUSED_ENV, fused_setting)
    assert fused_setting or fused.available(), "Numba is missing: pip install -e '.[dev]'"
    F, M = (8192, 71) if case == "[8192,71]" else (300, 1 if case == "one column" else 5)
    h = rng.standard_normal((F, M)).astype(np.float32) * 3
    if case == "constant columns":
        h[:] = np.float32(-2.625)
    elif case == "offset 1e4":
        h = h * np.float32(1e-2) + np.float32(1e4)
    w, b = rng.standard_normal(F).astype(np.float32), rng.standard_normal(F).astype(np.float32)
    ref = layers.layer_norm(np.ascontiguousarray(h.T), w, b, 1e-5).T
    got = fast._layer_norm_columns(h, w, b, 1e-5)
    assert got is h, "in place"
    xhat = np.abs(ref - b[:, None]) / np.maximum(np.abs(w[:, None]), 1e-30)
    close(f"layer_norm down the columns {case} {h.shape}", got, ref, np.abs(w) * xhat.max() + np.abs(b), 1e-6)


# --------------------------------------------------------------------------------------------------------------
# Element-wise activations and softmax: the same operations, so bit for bit


ACTIVATION_CASES = ["small", "blocks", "strided", "reversed", "column-major", "tails"]


def _activation_input(case: str):
    x = (rng.standard_normal((5, 9)) * 4).astype(np.float32)
    if case == "small":
        x = x[:1, :2]
    elif case == "strided":
        x = x[::2, ::3]
    elif case == "reversed":
        x = x[::-1]
    elif case == "column-major":
        x = np.asfortranarray(x)
    elif case == "tails":
        x = np.array([[-40.0, -12.0, -5.0, -1e-30, 0.0, 1e-30, 5.0, 12.0, 40.0, np.inf, -np.inf, np.nan]], np.float32)
    return x


@pytest.mark.parametrize("case", ACTIVATION_CASES)
def test_quick_gelu_bit_for_bit(case, small_blocks):
    x = _activation_input(case)
    got, ref = fast.quick_gelu(x), layers.quick_gelu(x)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert np.array_equal(got, ref, equal_nan=True), f"quick_gelu {case}: {np.abs(got - ref).max()}"
    same_layout(got, ref)


def exact_gelu(x):
    """GELU in float64 from math.erfc (relative error ~1e-16) at float32 inputs; non-finite inputs give NaN."""
    flat = [
        0.5 * v * math.erfc(-v / math.sqrt(2.0)) if math.isfinite(v) else math.nan for v in x.astype(np.float64).ravel()
    ]
    return np.array(flat).reshape(x.shape)


@pytest.mark.parametrize("case", ACTIVATION_CASES)
def test_gelu_within_float32_of_the_exact_function(case, small_blocks):
    x = _activation_input(case)
    got, ref = fast.gelu(x), layers.gelu(x)
    assert got.dtype == ref.dtype == np.float32 and got.shape == ref.shape
    same_layout(got, ref)
    finite = np.isfinite(x)
    assert np.array_equal(got[~finite], ref[~finite], equal_nan=True), "inf and NaN as the textbook gives them"
    err = np.abs(got[finite] - exact_gelu(x)[finite]) / np.maximum(np.abs(x[finite]), 1e-30)
    print(f"\n  gelu {case}: max error {err.max(initial=0.0):.2e} x |x|")
    assert (err <= 2e-7).all()


def test_gelu_on_a_dense_grid_against_float64_erfc():
    """fast.gelu over [−20, 20] and 20 decades either side of 0, against 0.5·x·erfc(−x/√2) in float64: within
    2e-7 × |x| everywhere, and within 2e-5 of GELU itself for x ≥ −3."""
    x = np.concatenate([np.linspace(-20, 20, 200001), np.geomspace(1e-20, 20, 20001), -np.geomspace(1e-20, 20, 20001)])
    x = x.astype(np.float32)
    exact = exact_gelu(x)
    err = np.abs(fast.gelu(x).astype(np.float64) - exact)
    per_x = (err / np.maximum(np.abs(x), 1e-38)).max()
    right = x >= -3
    relative = (err[right] / np.maximum(np.abs(exact[right]), 1e-38)).max()
    print(f"\n  gelu: max error {per_x:.2e} x |x|; relative for x >= -3 {relative:.2e}")
    assert per_x <= 2e-7 and relative <= 2e-5
    assert fast.gelu(np.float32([0.0]))[0] == 0.0 and fast.gelu(np.float32([np.inf]))[0] == np.inf


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_in_place_bit_for_bit(axis):
    x = (rng.standard_normal((4, 7)) * 30).astype(np.float32)
    x[1, 2:] = -np.inf  # some keys dropped
    x[2, :] = NEG_INF_F32  # a row of masked-but-finite values
    x[3, :] = -np.inf  # nothing seen: NaN on both sides
    ref = layers.softmax(x, axis=axis)
    got = fast.softmax_in_place(x.copy(), axis=axis)
    assert np.array_equal(got, ref, equal_nan=True)


# --------------------------------------------------------------------------------------------------------------
# feed_forward: the MLP with its hidden activation kept transposed


def _mlp(C, F, storage="float32", bias=True, norm=False):
    def weight(n, k):
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        return float32_to_bf16_bits(w) if storage == "bfloat16" else w.astype(storage)

    fc1 = {"weight": weight(F, C), "bias": rng.standard_normal(F).astype(np.float32) if bias else None}
    fc2 = {"weight": weight(C, F), "bias": rng.standard_normal(C).astype(np.float32) if bias else None}
    inner = {"weight": rng.standard_normal(F).astype(np.float32), "bias": rng.standard_normal(F).astype(np.float32)}
    return fc1, fc2, inner if norm else None


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("norm", [False, True], ids=["no inner norm", "inner LayerNorm"])
@pytest.mark.parametrize("lead", [(1, 1), (1, 3), (1, 4), (2, 9), (0, 5)], ids=str)
@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_feed_forward(activation, norm, lead, storage, small_blocks):
    """Against the textbook MLP (product tolerance on fc2's |h|·|W2|ᵀ scale); and bit for bit against the fast
    primitives composed one after the other when there is no inner LayerNorm (the same products, bias adds and
    activation, only the hidden layout differs)."""
    C, F = 6, 22
    fc1, fc2, inner = _mlp(C, F, storage, bias=lead != (1, 4), norm=norm)
    x = rng.standard_normal(lead + (C,)).astype(np.float32)
    got = fast.feed_forward(x, fc1, fc2, activation, inner, 1e-5)
    ref = layers.feed_forward(x, fc1, fc2, activation, inner, 1e-5)
    h = layers.ACTIVATIONS[activation](layers.linear(x, **fc1))
    if inner is not None:
        h = layers.layer_norm(h, **inner)
    b2 = fc2["bias"] if fc2["bias"] is not None else 0.0
    scale = np.abs(h) @ np.abs(layers.as_float32(fc2["weight"])).T + np.abs(b2)
    close(f"feed_forward {activation} {'norm' if norm else ''} {lead} {storage}", got, ref, scale, 1e-5)
    assert got.flags.c_contiguous
    if inner is None:
        composed = fast.linear(fast.ACTIVATIONS[activation](fast.linear(x, **fc1)), **fc2)
        assert np.array_equal(got, composed)


def test_feed_forward_results_are_fresh():
    """The hidden activation lives in a reused buffer; what feed_forward returns does not."""
    fc1, fc2, inner = _mlp(8, 16, norm=True)
    x1, x2 = (rng.standard_normal((1, 7, 8)).astype(np.float32) for _ in range(2))
    y1 = fast.feed_forward(x1, fc1, fc2, "gelu", inner)
    kept = y1.copy()
    y2 = fast.feed_forward(x2, fc1, fc2, "gelu", inner)
    assert np.array_equal(y1, kept) and not np.shares_memory(y1, y2)
    np.testing.assert_array_equal(fast.feed_forward(x1, fc1, fc2, "gelu", inner), kept)


# --------------------------------------------------------------------------------------------------------------
# attention


def _qkv(B, H, T, S, D, contiguous=True):
    q, k, v = (rng.standard_normal((B, H, n, D)).astype(np.float32) for n in (T, S, S))
    if not contiguous:  # as split_heads hands them over: transposed views of [B, T, H, D]
        q, k, v = (np.ascontiguousarray(a.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for a in (q, k, v))
    return q, k, v


MASKS = ["none", "causal", "causal+left pad", "causal+right pad", "cached+left pad", "all hidden", "bias [1,1,1,S]"]


def _mask(kind, B, T, past):
    S = past + T
    att = np.ones((B, S), np.int64)
    if kind == "none":
        return None
    if kind == "causal":
        return decoder_attention_mask(None, B, T, past, np)
    if kind in ("causal+left pad", "cached+left pad"):
        att[0, :4] = 0
        att[-1, :1] = 0
        return decoder_attention_mask(att, B, T, past, np)
    if kind == "causal+right pad":
        att[0, -3:] = 0
        return decoder_attention_mask(att, B, T, past, np)
    if kind == "all hidden":  # every key hidden from query 0 (finite min and −inf mixed)
        m = decoder_attention_mask(None, B, T, past, np).copy()
        m[..., 0, :] = NEG_INF_F32
        m[..., 0, -1] = -np.inf
        return m
    m = np.zeros((1, 1, 1, S), np.float32)  # a plain additive bias, very negative but not "hidden"
    m[..., -2:] = -1e30
    return m


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("need_probs", [True, False])
@pytest.mark.parametrize("blocks", ["heads", "rows"])
def test_attention(kind, need_probs, blocks, monkeypatch):
    """T = 13 queries of 3 heads; without probabilities in blocks smaller than the whole: "heads", a budget of
    two heads' scores (groups of 2 heads and 1 where the mask is not causal, one head a block where it is);
    "rows", 4 rows' (one head, rows in blocks of 4, 4, 4, 1)."""
    B, H, T, D = 3, 3, 13, 5
    past = 6 if kind == "cached+left pad" else 0
    S = past + T
    budget = 2 * 4 * B * T * S if blocks == "heads" else 4 * B * S * 4
    monkeypatch.setattr(fast, "ATTENTION_BLOCK_BYTES", budget)
    q, k, v = _qkv(B, H, T, S, D, contiguous=kind != "none")
    mask = _mask(kind, B, T, past)
    out, probs = fast.attention(q, k, v, mask, None, need_probs)
    ref, ref_probs = layers.attention(q, k, v, mask, None, need_probs)
    scale = np.abs(v).max()
    close(f"attention out, {kind}, need_probs={need_probs}", out, ref, scale, 1e-5)
    assert out.flags.c_contiguous
    if need_probs:
        close(f"attention probs, {kind}", probs, ref_probs, 1.0, 1e-6)
    else:
        assert probs is None


@pytest.mark.parametrize("T,S,D", [(1, 1, 1), (1, 9, 3), (2, 2, 64)])
def test_attention_tiny_shapes(T, S, D):
    q, k, v = _qkv(1, 3, T, S, D)
    for need_probs in (True, False):
        out, _ = fast.attention(q, k, v, None, 0.3, need_probs)
        ref, _ = layers.attention(q, k, v, None, 0.3, need_probs)
        close(f"attention T={T} S={S} D={D}", out, ref, np.abs(v).max(), 1e-5)
