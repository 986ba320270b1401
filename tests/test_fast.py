"""The fast primitives' own machinery (kosmos2_ref.fast): the few-row and block-wise products, the 2-byte
widening, the registry of finite float16 matrices, attention in query blocks, element-wise work shared among
threads. Each against float64 or against the whole (unblocked or one-thread) form; tests/test_fast_vs_reference.py
holds each fast primitive beside its textbook one."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from kosmos2_ref import fast, fused, machine
from kosmos2_ref.fast import attention, linear
from kosmos2_ref.layers import as_float32


@pytest.mark.parametrize("lead", [(2,), (3,), (1, 2), (3, 1), (4,)])
def test_linear_for_a_few_rows_matches_float64(lead):
    """2-3 rows take one matrix-vector product per row (4 rows the matrix product): all equal float64."""
    rng = np.random.default_rng(len(lead))
    x = rng.standard_normal(lead + (33,)).astype(np.float32)
    w = rng.standard_normal((47, 33)).astype(np.float32)
    b = rng.standard_normal(47).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T + b
    got = linear(x, w, b)
    assert got.shape == lead + (47,) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
@pytest.mark.parametrize("rows", [1, 3, 20])
@pytest.mark.parametrize("n_in", [24, 23])
def test_linear_with_two_byte_weights_widens_block_by_block(storage, rows, n_in, monkeypatch):
    """The block-wise product over a 2-byte matrix equals float64 on the widened matrix, for few rows and many
    rows, with a row count that leaves a partial last block, and for an odd input width (no pairs to split)."""
    monkeypatch.setenv(fused.FUSED_ENV, "off")  # the blocked widening (with Numba, few rows take fused)
    from kosmos2_ref.weights import float32_to_bf16_bits

    monkeypatch.setattr(fast, "UPCAST_MIN_SIZE", 0)
    monkeypatch.setattr(fast, "UPCAST_BLOCK_BYTES", 4 * n_in * 5)  # 5 rows of W per block
    monkeypatch.setattr(fast, "UPCAST_BLOCK_BYTES_MANY_ROWS", 4 * n_in * 8)  # 8 rows per block
    rng = np.random.default_rng(rows)
    w32 = rng.standard_normal((37, n_in)).astype(np.float32)
    w = float32_to_bf16_bits(w32) if storage == "bfloat16" else w32.astype(np.float16)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    b = rng.standard_normal(37).astype(np.float32)
    wide = as_float32(w)
    assert not np.array_equal(wide, w32)  # the rounding is real
    ref = x.astype(np.float64) @ wide.astype(np.float64).T + b
    got = linear(x, w, b)
    assert got.shape == (rows, 37) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(linear(x[None], w, b)[0], got, rtol=0, atol=1e-6 * np.abs(ref).max())


@pytest.fixture
def needs_numba():
    """The fused kernels: Numba is a dev dependency (the extra kosmos2-ref[numba])."""
    assert fused.available(), "Numba is missing (or KOSMOS2_FUSED=off is set): pip install -e '.[dev]'"


@pytest.mark.usefixtures("needs_numba")
@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (1, 8)])
@pytest.mark.parametrize("n_in", [24, 23])
def test_linear_with_two_byte_weights_and_few_rows_takes_the_fused_product(storage, lead, n_in, monkeypatch):
    """Up to UPCAST_FEW_ROWS rows over a 2-byte matrix go through the fused kernel (each weight widened as it is
    multiplied) and equal float64 on the widened matrix, odd input widths included; bias added."""
    from kosmos2_ref.weights import float32_to_bf16_bits

    monkeypatch.delenv(fused.FUSED_ENV, raising=False)
    monkeypatch.setattr(fast, "UPCAST_MIN_SIZE", 0)
    calls, kernel = [], fused.matvec_2byte
    monkeypatch.setattr(fused, "matvec_2byte", lambda *a: calls.append(a[3:]) or kernel(*a))
    rng = np.random.default_rng(n_in + len(lead))
    w32 = rng.standard_normal((37, n_in)).astype(np.float32)
    w = float32_to_bf16_bits(w32) if storage == "bfloat16" else w32.astype(np.float16)
    x = rng.standard_normal(lead + (n_in,)).astype(np.float32)
    b = rng.standard_normal(37).astype(np.float32)
    ref = x.astype(np.float64) @ as_float32(w).astype(np.float64).T + b
    got = linear(x, w, b)
    assert calls, "the fused kernel was not called"
    assert got.shape == lead + (37,) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.usefixtures("needs_numba")
def test_fused_product_widens_every_two_byte_pattern_exactly():
    """Every one of the 65536 bit patterns, picked out by a one-hot x: the fused product returns each weight
    widened, bit for bit as NumPy widens it (float16 subnormals, infinities and NaN included; bfloat16 as the
    bits' top half)."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(2048, 32)  # [N, K]
    for storage, w in (("bfloat16", patterns), ("float16", patterns.view(np.float16))):
        want = as_float32(w)  # [N, K]
        got = np.empty((32, 2048), dtype=np.float32)  # [K one-hot rows, N]
        for k in range(32):
            x = np.zeros((1, 32), dtype=np.float32)
            x[0, k] = 1.0
            row = np.empty((1, 2048), dtype=np.float32)
            fused.matvec_2byte(x, w, row, 0, 2048)
            got[k] = row[0]
        # 0 × inf is NaN in the other columns' terms: compare only rows whose weights are all finite, then the
        # non-finite ones by what a float32 product gives for them
        finite_rows = np.isfinite(want).all(axis=1)
        # as values: −0 comes out +0, as from any sum that starts at +0 (the other terms are ±0)
        np.testing.assert_array_equal(got.T[finite_rows], want[finite_rows], err_msg=storage)
        assert (got.T[finite_rows] != 0).sum() == (want[finite_rows] != 0).sum() > 60000
        with np.errstate(invalid="ignore"):  # inf × 0
            expected = np.stack([(want[~finite_rows] * x_row).sum(axis=1) for x_row in np.eye(32, dtype=np.float32)])
        np.testing.assert_array_equal(np.isnan(got[:, ~finite_rows]), np.isnan(expected), err_msg=storage)


@pytest.mark.usefixtures("needs_numba")
def test_fused_product_shared_among_threads_gives_the_same_bits(split_everything, monkeypatch):
    """The rows of w shared among three threads: the same bits as one thread, and every thread took a part."""
    monkeypatch.setattr(fast, "UPCAST_MIN_SIZE", 0)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((101, 64)).astype(np.float16)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    parts, kernel = [], fused.matvec_2byte
    monkeypatch.setattr(fused, "matvec_2byte", lambda *a: parts.append(a[3:]) or kernel(*a))
    got = linear(x, w)
    assert sorted(parts) == [(0, 33), (33, 67), (67, 101)]
    alone = _one_thread(monkeypatch, linear, x, w)
    assert np.array_equal(got.view(np.uint32), alone.view(np.uint32)), "the split changed the numbers"


def test_kernels_that_fail_their_check_give_way_to_the_blocked_widening(monkeypatch):
    """A kernel that compiles but computes a wrong product (or fails to compile) is not used: a RuntimeWarning
    says why, fused.how() too, and the products widen in blocks with the right numbers."""

    def wrong(x, w, y, start, stop):
        y[:, start:stop] = 0.0

    monkeypatch.delenv(fused.FUSED_ENV, raising=False)
    monkeypatch.setattr(fused, "_kernels", None)  # not built yet in this process
    monkeypatch.setattr(fused, "_build", lambda: dict.fromkeys(["bfloat16", "float16", "layer_norm_rows"], wrong))
    monkeypatch.setattr(fast, "UPCAST_MIN_SIZE", 0)
    monkeypatch.setattr(fast, "UPCAST_BLOCK_BYTES", 1024)
    w = np.random.default_rng(6).standard_normal((40, 16)).astype(np.float16)
    x = np.ones((1, 16), dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="the bfloat16 kernel computed .* NumPy's forms are used instead"):
        assert not fused.available()
    assert "Numba's kernels failed: RuntimeError" in fused.how()
    np.testing.assert_allclose(linear(x, w), x @ w.astype(np.float32).T, rtol=1e-6)


@pytest.mark.usefixtures("needs_numba")
def test_fused_products_from_many_threads_at_once_give_one_thread_s_bits(monkeypatch):
    """Shared weights, eight threads each running the fused products over and over: every result equals the
    product computed alone, bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    from kosmos2_ref.weights import float32_to_bf16_bits

    monkeypatch.delenv(fused.FUSED_ENV, raising=False)
    rng = np.random.default_rng(8)
    w = float32_to_bf16_bits(rng.standard_normal((512, 256)).astype(np.float32))  # above UPCAST_MIN_SIZE
    xs = [rng.standard_normal((1 + i % 3, 256)).astype(np.float32) for i in range(8)]
    alone = [linear(x, w) for x in xs]

    def repeated(i):
        return all(np.array_equal(linear(xs[i], w).view(np.uint32), alone[i].view(np.uint32)) for _ in range(20))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(repeated, range(8)))


def test_fused_setting_chooses_the_form_and_rejects_other_values(monkeypatch):
    """KOSMOS2_FUSED=off widens in blocks even with Numba; more than UPCAST_FEW_ROWS rows always do; a value
    other than off/on is a ValueError that names the variable; "on" without Numba an ImportError saying how to
    install it."""
    monkeypatch.setattr(fast, "UPCAST_MIN_SIZE", 0)
    monkeypatch.setattr(fast, "UPCAST_BLOCK_BYTES", 1024)  # chosen: no first-use measurement among the calls
    monkeypatch.setattr(fast, "UPCAST_BLOCK_BYTES_MANY_ROWS", 1024)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((40, 16)).astype(np.float16)
    blocks, upcast = [], fast.linear_upcast_blocks
    monkeypatch.setattr(fast, "linear_upcast_blocks", lambda *a, **k: blocks.append(1) or upcast(*a, **k))
    monkeypatch.setenv(fused.FUSED_ENV, "off")
    linear(rng.standard_normal((1, 16)).astype(np.float32), w)
    assert blocks == [1] and not fused.available() and "KOSMOS2_FUSED=off" in fused.how()
    monkeypatch.delenv(fused.FUSED_ENV)
    linear(rng.standard_normal((fast.UPCAST_FEW_ROWS + 1, 16)).astype(np.float32), w)
    assert blocks == [1, 1]
    monkeypatch.setenv(fused.FUSED_ENV, "sometimes")
    with pytest.raises(ValueError, match="KOSMOS2_FUSED must be 'off'.*'on'.*got 'sometimes'"):
        linear(rng.standard_normal((1, 16)).astype(np.float32), w)
    monkeypatch.setattr(fused, "_kernels", {})  # as after a failed `import numba`
    monkeypatch.setattr(fused, "_missing", "no Numba: No module named 'numba'")
    monkeypatch.setenv(fused.FUSED_ENV, "on")
    with pytest.raises(
        ImportError, match=r"KOSMOS2_FUSED=on, but .*unavailable \(no Numba: .*pip install 'kosmos2-ref\[numba\]'"
    ):
        fused.available()
    monkeypatch.delenv(fused.FUSED_ENV)
    assert not fused.available() and "no Numba" in fused.how()
    linear(rng.standard_normal((1, 16)).astype(np.float32), w)
    assert blocks == [1, 1, 1]


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_widen_pairs_is_exact_for_every_two_byte_pattern(storage):
    """All 65536 bit patterns, in three different pairings of neighbours: the even and odd
    columns come out bit-identical to NumPy's own widening (for bfloat16: the bits shifted into a float32)."""
    from kosmos2_ref.fast import widen_pairs

    pattern = np.arange(1 << 16, dtype=np.uint16)
    rows = np.stack([pattern, np.roll(pattern, 1), pattern[::-1]])  # [3, 65536]
    src = rows if storage == "bfloat16" else rows.view(np.float16)
    ref = as_float32(src)  # [3, 65536] float32
    even = np.empty((3, 1 << 15), np.float32)
    odd = np.empty_like(even)
    widen_pairs(src, even, odd)
    if storage == "float16":
        # rows holding an inf/NaN take the exact slow cast; check the bit trick on rows without any, too
        assert not np.isfinite(ref).all()
        finite = rows & 0x7C00 != 0x7C00
        clean = np.where(finite, rows, 0).view(np.float16)
        e2, o2 = np.empty_like(even), np.empty_like(odd)
        widen_pairs(clean, e2, o2)
        assert np.array_equal(e2.view(np.uint32), as_float32(clean)[:, 0::2].view(np.uint32))
        assert np.array_equal(o2.view(np.uint32), as_float32(clean)[:, 1::2].view(np.uint32))
        assert (np.abs(as_float32(clean)) < 2.0**-14).sum() > 2000  # subnormals were in it
    np.testing.assert_array_equal(even.view(np.uint32), ref[:, 0::2].view(np.uint32))
    np.testing.assert_array_equal(odd.view(np.uint32), ref[:, 1::2].view(np.uint32))


def test_widen_pairs_float16_inf_and_nan_are_kept():
    """A float16 block with an inf or NaN is still widened exactly (the fast form would make them finite)."""
    from kosmos2_ref.fast import widen_pairs

    src = np.array([[1.5, -np.inf, 2.0, np.nan], [np.inf, -0.0, 6e-8, 65504.0]], dtype=np.float16)
    even, odd = np.empty((2, 2), np.float32), np.empty((2, 2), np.float32)
    widen_pairs(src, even, odd)
    np.testing.assert_array_equal(even, src[:, 0::2].astype(np.float32))
    np.testing.assert_array_equal(odd, src[:, 1::2].astype(np.float32))
    assert np.isneginf(odd[0, 0]) and np.isnan(odd[0, 1]) and np.isposinf(even[1, 0])
    assert np.signbit(odd[1, 0])


def test_widen_pairs_scaled_float16_is_exact_times_two_to_the_minus_112():
    """``scaled=True``: every finite float16 pattern comes out as exactly 2^-112 × its value (subnormals and ±0
    included), so x × 2^112 times it is the same product; the checked form reports blocks with an inf/NaN."""
    from kosmos2_ref.fast import widen_pairs

    pattern = np.arange(1 << 16, dtype=np.uint16)
    pattern = pattern[pattern & 0x7C00 != 0x7C00]  # every finite float16
    rows = np.stack([pattern, np.roll(pattern, 1), pattern[::-1]]).view(np.float16)  # [3, 63488]
    even = np.empty((3, rows.shape[1] // 2), np.float32)
    odd = np.empty_like(even)
    assert widen_pairs(rows, even, odd, scaled=True) is True
    for half, ref in ((even, rows[:, 0::2]), (odd, rows[:, 1::2])):
        exact = ref.astype(np.float32)
        assert np.array_equal((half * np.float32(2.0**112)).view(np.uint32), exact.view(np.uint32))
        assert np.array_equal(
            half.view(np.uint32), (exact.astype(np.float64) * 2.0**-112).astype(np.float32).view(np.uint32)
        )
    assert widen_pairs(rows, even, odd) is True
    bad = np.array([[1.0, np.inf]], dtype=np.float16)
    assert widen_pairs(bad, np.empty((1, 1), np.float32), np.empty((1, 1), np.float32)) is False


def test_float16_products_skip_the_check_once_a_read_only_matrix_is_known_finite(monkeypatch):
    """The first product over a read-only float16 matrix widens it the checked way and remembers it as finite; later
    ones take the 2^-112-scaled widening with x × 2^112, and give bit-identical results. Writable matrices, ones
    with an inf, and x too large to scale (|x| ≥ 2^16) keep the checked way; the entry goes with the matrix."""
    monkeypatch.setenv(fused.FUSED_ENV, "off")  # the blocked widening (with Numba, few rows take fused)
    import gc

    monkeypatch.setattr(fast, "UPCAST_MIN_SIZE", 0)
    monkeypatch.setattr(fast, "UPCAST_BLOCK_BYTES", 4 * 24 * 5)  # 5 rows of W per block
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((37, 24)) * 0.05).astype(np.float16)
    w[0, :4] = [6e-8, -6e-8, 0.0, -0.0]  # subnormals and zeros scale too
    w.flags.writeable = False
    x = rng.standard_normal((1, 24)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    assert not fast._known_finite(w)
    first = linear(x, w)
    assert fast._known_finite(w)
    second = linear(x, w)  # the scaled path
    np.testing.assert_array_equal(second.view(np.uint32), first.view(np.uint32))
    np.testing.assert_allclose(second, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

    big = x * np.float32(2.0**17)  # × 2^112 would overflow: checked way
    np.testing.assert_allclose(linear(big, w), ref * 2.0**17, rtol=1e-5, atol=1e-5 * np.abs(ref).max() * 2**17)

    writable = w.copy()
    linear(x, writable)
    assert not fast._known_finite(writable)
    with_inf = w.copy()
    with_inf[3, 5] = np.inf
    with_inf.flags.writeable = False
    for _ in range(2):
        y = linear(np.abs(x), with_inf)
        assert np.isposinf(y[0, 3]) and np.isfinite(np.delete(y, 3)).all()
    assert not fast._known_finite(with_inf)

    entries = len(fast._float16_all_finite)
    del w
    gc.collect()
    assert len(fast._float16_all_finite) == entries - 1


def test_keys_needed_by_a_block_of_queries():
    """Only trailing keys hidden from every query of the block are left out, and none when a query sees nothing."""
    from kosmos2_ref.decoder import decoder_attention_mask
    from kosmos2_ref.fast import _keys_needed

    causal = decoder_attention_mask(None, 1, 6, 2, np)  # [1, 1, 6, 8], 2 cached keys
    assert [_keys_needed(causal[..., t : t + 2, :], 8) for t in (0, 2, 4)] == [4, 6, 8]
    left = decoder_attention_mask(np.array([[0, 0, 0, 1, 1, 1]]), 1, 6, 0, np)  # 3 pad queries see nothing
    assert _keys_needed(left[..., 0:2, :], 6) == 6  # pad rows spread over hidden keys
    assert _keys_needed(left[..., 3:5, :], 6) == 5
    bias = np.zeros((1, 1, 2, 5), np.float32)
    bias[..., 3:] = -1e30  # very negative, but not "hidden"
    assert _keys_needed(bias, 5) == 5
    assert _keys_needed(None, 7) == 7 and _keys_needed(np.zeros((1, 1, 2, 1), np.float32), 7) == 7


@pytest.mark.parametrize("pad", ["none", "left", "right"])
@pytest.mark.parametrize("past", [0, 3])
def test_attention_in_query_blocks_equals_the_whole(pad, past, monkeypatch):
    """need_probs=False with one head and 4 queries per block (and keys left out per block) gives the output of
    the whole form."""
    from kosmos2_ref.decoder import decoder_attention_mask

    B, H, T, D = 3, 2, 23, 8
    S = past + T
    rng = np.random.default_rng(past)
    q = rng.standard_normal((B, H, T, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, H, S, D)).astype(np.float32) for _ in range(2))
    att = np.ones((B, S), np.int64)
    if pad == "left":
        att[0, :6], att[1, :2] = 0, 0
    elif pad == "right":
        att[0, -5:], att[2, -1:] = 0, 0
    mask = decoder_attention_mask(None if pad == "none" else att, B, T, past, np)
    whole, _ = attention(q, k, v, mask, need_probs=True)
    monkeypatch.setattr(fast, "ATTENTION_BLOCK_BYTES", 4 * B * S * 4)
    assert fast.attention_blocks(B, H, T, S, fast.attention_block_bytes(), causal=True) == (1, 4)
    blocked, probs = attention(q, k, v, mask, need_probs=False)
    assert probs is None
    err = np.abs(blocked - whole).max()
    assert err <= 1e-6, err


def test_attention_blocks():
    """Everything when it fits; groups of whole heads when one head fits and the mask is not causal; else one
    head, its rows in as few blocks as the budget allows, all of one size but the last."""
    B, H, T, S = 2, 16, 257, 257
    head = 4 * B * T * S
    assert fast.attention_blocks(B, H, T, S, H * head) == (H, T)
    assert fast.attention_blocks(B, H, T, S, 3 * head + 1) == (3, T)
    assert fast.attention_blocks(B, H, T, S, 3 * head, causal=True) == (1, T)  # one head fits: all its rows
    row = 4 * B * S
    assert fast.attention_blocks(B, H, T, S, 100 * row) == (1, 86)  # 257 rows: 3 blocks of <= 100
    assert fast.attention_blocks(B, H, T, S, 100 * row, causal=True) == (1, 86)
    assert fast.attention_blocks(B, H, T, S, 1) == (1, 1)  # below one row: a row a block
    assert fast.attention_blocks(1, 32, 1024, 1024, 1 << 20, causal=True) == (1, 256)  # the 1024-token prefill


def test_attention_block_from_the_environment(monkeypatch):
    monkeypatch.delenv(fast.ATTENTION_BLOCK_ENV, raising=False)
    assert fast.attention_block_bytes() == fast.ATTENTION_BLOCK_BYTES
    monkeypatch.setenv(fast.ATTENTION_BLOCK_ENV, " 2M ")
    assert fast.attention_block_bytes() == 2 << 20
    monkeypatch.setenv(fast.ATTENTION_BLOCK_ENV, "96K")
    assert fast.attention_block_bytes() == 96 << 10


@pytest.mark.parametrize("setting", ["0", "512", "lots", "-1M"])
def test_attention_block_bad_setting(monkeypatch, setting):
    monkeypatch.setenv(fast.ATTENTION_BLOCK_ENV, setting)
    q = np.zeros((1, 1, 2, 4), np.float32)
    with pytest.raises(
        ValueError, match=fast.ATTENTION_BLOCK_ENV + r" must be a size in bytes of at least 1K.*" + repr(setting)
    ):
        attention(q, q, q, need_probs=False)


# ------------------------------------------------------------------ element-wise work shared among threads
@pytest.fixture
def split_everything(monkeypatch):
    """Every array large enough to split, over three threads (more parts than this machine has cores)."""
    monkeypatch.setattr(fast, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setenv(fast.ELEMENTWISE_THREADS_ENV, "3")


def _one_thread(monkeypatch, fn, *args):
    monkeypatch.setenv(fast.ELEMENTWISE_THREADS_ENV, "1")
    try:
        return fn(*args)
    finally:
        monkeypatch.setenv(fast.ELEMENTWISE_THREADS_ENV, "3")


def _helper_threads() -> int:
    return sum(t.name.startswith("kosmos2-elementwise") for t in threading.enumerate())


def test_split_element_wise_work_gives_the_same_bits(split_everything, monkeypatch):
    rng = np.random.default_rng(5)
    monkeypatch.setattr(fast, "ELEMENTWISE_BLOCK", 64)  # gelu's blocks: 7 rows of 50 make several blocks per part
    x = rng.standard_normal((7, 50)).astype(np.float32) * 3
    w, b = rng.standard_normal(50).astype(np.float32), rng.standard_normal(50).astype(np.float32)
    for name, fn, args in [
        ("layer_norm", fast.layer_norm, (x, w, b)),
        ("quick_gelu", fast.quick_gelu, (x,)),
        ("gelu", fast.gelu, (x,)),
    ]:
        got, alone = fn(*args), _one_thread(monkeypatch, fn, *args)
        assert got.shape == alone.shape and got.flags.c_contiguous, name
        assert np.array_equal(got, alone), f"{name}: the split changed the numbers"
    assert _helper_threads() >= 2, "the work was not handed to the pool"


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_split_widening_gives_the_same_bits_and_finds_an_inf_in_the_last_part(split_everything, monkeypatch, storage):
    """A few-row product over a 2-byte matrix with its blocks shared among three threads equals the one-thread
    product bit for bit; a float16 inf in the last part's blocks still comes out as inf, and keeps the matrix off
    the finite registry."""
    from kosmos2_ref.weights import float32_to_bf16_bits

    monkeypatch.setenv(fused.FUSED_ENV, "off")  # the blocked widening (with Numba, few rows take fused)

    monkeypatch.setattr(fast, "UPCAST_MIN_SIZE", 0)
    monkeypatch.setattr(fast, "UPCAST_BLOCK_BYTES", 4 * 24 * 4)  # 4 rows of W per block: 10 blocks, 3 parts
    rng = np.random.default_rng(11)
    w32 = rng.standard_normal((37, 24)).astype(np.float32)
    w = float32_to_bf16_bits(w32) if storage == "bfloat16" else w32.astype(np.float16)
    x = rng.standard_normal((2, 24)).astype(np.float32)
    widened_by, widen = set(), fast.widen_pairs
    monkeypatch.setattr(fast, "widen_pairs", lambda *a, **k: widened_by.add(threading.get_ident()) or widen(*a, **k))
    got = linear(x, w)
    assert len(widened_by) >= 2, "the blocks were not shared among the threads"
    alone = _one_thread(monkeypatch, linear, x, w)
    assert np.array_equal(got.view(np.uint32), alone.view(np.uint32)), "the split changed the numbers"
    ref = x.astype(np.float64) @ as_float32(w).astype(np.float64).T
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    if storage == "float16":
        w[35, 7] = np.inf  # in the last block, which the last part widens
        w.flags.writeable = False
        y = linear(np.abs(x), w)
        assert np.isposinf(y[:, 35]).all() and np.isfinite(np.delete(y, 35, axis=1)).all()
        assert not fast._known_finite(w)


def test_split_parts_cover_the_range_once_and_raise_a_parts_error(split_everything):
    seen = []
    fast.over_parts(lambda a, b: seen.append((a, b)), 10, 10)
    assert sorted(seen) == [(0, 3), (3, 6), (6, 10)]

    def failing(a, b):
        if a > 0:
            raise RuntimeError(f"part {a}-{b} failed")

    with pytest.raises(RuntimeError, match="part 3-6 failed|part 6-10 failed"):
        fast.over_parts(failing, 10, 10)


@pytest.fixture
def splits_unchosen(monkeypatch):
    """Nothing measured yet, the setting unset, every array large enough to split, and two cores to split over."""
    monkeypatch.delenv(fast.ELEMENTWISE_THREADS_ENV, raising=False)
    monkeypatch.setattr(fast, "_splits", {})
    monkeypatch.setattr(fast, "_split_trials", {})
    monkeypatch.setattr(fast, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(machine, "compute_threads", lambda: 2)


@pytest.mark.parametrize("fused_setting,kind", [("", "fused layer_norm"), ("off", "layer_norm")])
def test_each_kind_of_work_times_both_ways_then_keeps_one(splits_unchosen, monkeypatch, fused_setting, kind):
    """LayerNorm in Numba's kernel (where installed, the default) and in NumPy's form (KOSMOS2_FUSED=off)."""
    monkeypatch.setenv(fused.FUSED_ENV, fused_setting)
    assert fused_setting or fused.available(), "Numba is missing: pip install -e '.[dev]'"
    rng = np.random.default_rng(6)
    x = rng.standard_normal((7, 50)).astype(np.float32) * 3
    w, b = rng.standard_normal(50).astype(np.float32), rng.standard_normal(50).astype(np.float32)
    alone = _one_thread(monkeypatch, fast.layer_norm, x, w, b)
    monkeypatch.delenv(fast.ELEMENTWISE_THREADS_ENV)
    key = (kind, 512, 2)  # 350 elements round up to 512, over two threads
    for call in range(2 * fast.SPLIT_TRIALS + 2):
        assert np.array_equal(fast.layer_norm(x, w, b), alone), f"call {call}: the way changed the numbers"
        assert (key in fast._splits) == (call >= 2 * fast.SPLIT_TRIALS - 1)
    assert [len(t) for t in fast._split_trials[key].values()] == [fast.SPLIT_TRIALS] * 2  # no timing once kept
    assert fast.elementwise_splits() == {f"{kind} 512 x2": fast._splits[key]}
    assert fast.block_sizes()["elementwise_splits"] == fast.elementwise_splits()


@pytest.mark.parametrize("slower", [fast.ONE_THREAD, fast.SPLIT])
def test_the_faster_way_is_kept(splits_unchosen, slower):
    """The rule itself, on work of which one way is made 20 ms slower: the whole range in one call, or the parts."""
    calls = []

    def work(a, b):
        calls.append((a, b))
        whole = (a, b) == (0, 10)
        if whole == (slower == fast.ONE_THREAD):
            time.sleep(0.02)

    for _ in range(2 * fast.SPLIT_TRIALS + 2):
        fast.over_parts(work, 10, 10, "sleepy")
    faster = fast.SPLIT if slower == fast.ONE_THREAD else fast.ONE_THREAD
    assert fast._splits[("sleepy", 16, 2)] == faster
    last = calls[-2:] if faster == fast.SPLIT else calls[-1:]
    assert sorted(last) == ([(0, 5), (5, 10)] if faster == fast.SPLIT else [(0, 10)])


def test_a_set_thread_count_splits_every_kind_unmeasured(splits_unchosen, monkeypatch):
    monkeypatch.setenv(fast.ELEMENTWISE_THREADS_ENV, "3")
    seen = []
    fast.over_parts(lambda a, b: seen.append((a, b)), 10, 10, "layer_norm")
    assert sorted(seen) == [(0, 3), (3, 6), (6, 10)] and fast._split_trials == {}
    assert fast.elementwise_splits() == {"every kind": "3 threads"}
    monkeypatch.setenv(fast.ELEMENTWISE_THREADS_ENV, "1")
    assert fast.elementwise_splits() == {"every kind": "1 thread"}


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_elementwise_threads_setting_must_be_a_positive_int(monkeypatch, value):
    monkeypatch.setenv(fast.ELEMENTWISE_THREADS_ENV, value)
    with pytest.raises(ValueError, match=rf"KOSMOS2_ELEMENTWISE_THREADS must be a positive int .*got '{value}'"):
        fast.elementwise_threads()


def test_compute_threads_follow_the_thread_limits(monkeypatch):
    for name in machine.THREAD_LIMIT_ENVS:
        monkeypatch.delenv(name, raising=False)
    cores = machine.compute_threads()
    assert 1 <= cores <= (os.cpu_count() or 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert machine.compute_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # empty or nonsense says nothing
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "lots")
    assert machine.compute_threads() == cores


# --------------------------------------------------------------------------------------------------------------
# GELU as x · sigmoid(L(x)): the fitted polynomial (its accuracy: tests/test_fast_vs_reference.py)


def _fit_gelu_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "fit_gelu.py"
    spec = importlib.util.spec_from_file_location("fit_gelu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gelu_polynomial_is_what_the_fit_gives():
    """scripts/fit_gelu.py, rerun here, gives fast.GELU_LOGIT (to 1e-6 relative: LAPACK's least squares may round
    differently elsewhere), a weighted error below 3e-8 × |x| and a P that keeps growing past the fitted range."""
    script = _fit_gelu_script()
    c, err = script.fit()
    print(f"\n  fit: largest weighted error {err:.2e} x |x|")
    np.testing.assert_allclose(c, fast.GELU_LOGIT, rtol=1e-6, atol=0)
    assert err < 3e-8
    assert script.grows_beyond(fast.GELU_LOGIT)
