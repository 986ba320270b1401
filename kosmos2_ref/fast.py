"""Faster forms of the primitives in :mod:`kosmos2_ref.layers`, which the model runs by default.

Each public function here has the signature of the textbook function it replaces, returns the same numbers (up
to float32 summation order; for :func:`gelu`, another formula for the same function, as accurate; stated per
function) in the layout the textbook one would (row-major, fresh arrays; :func:`head_projection`'s heads are a
view, as the textbook's are, of a product in another layout), and says why it is faster and by how much.
``Kosmos2(..., reference=True)`` runs the textbook ones instead (:mod:`kosmos2_ref.primitives`);
``tests/test_fast_vs_reference.py`` holds each pair side by side. NumPy has no product that reads 2-byte
weights; where Numba is installed, :func:`linear` hands those with few rows to :mod:`kosmos2_ref.fused`, which
widens each weight as it multiplies it (:func:`linear_fused`).

Measured with ``benchmarks/primitives.py`` (reference time / fast time, medians of 9 runs timed in turns, the
range over three runs) on the development machine: AMD EPYC, 2 vCPUs (AVX2), NumPy 2.4 with OpenBLAS 0.3.31
(Haswell kernels), shared with other work at the time (load average 3-7), so the figures are noisy. The gains are
properties of that BLAS and cache hierarchy; another machine may see others.

Block sizes are not constants tuned on that machine: the element-wise blocks and the transposing write's tiles
follow the L2 size the processor reports (:mod:`kosmos2_ref.machine`), and the 2-byte widening's blocks start from
it and are then measured once, at the first 2-byte product of the process, among sizes around it
(:func:`upcast_block_bytes`; ``KOSMOS2_UPCAST_BLOCKS`` fixes them). Nor is the way round of a product: whether
the weight or x goes first is timed on the first calls of each shape (:func:`product_form`), and so are whether a
ragged number of rows is padded to a multiple of 8 (:func:`_in_padded_rows`) and whether element-wise work is
shared among the threads (:func:`over_parts`). :func:`block_sizes` says what was chosen.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
import weakref

import numpy as np

from . import fused, layers, machine
from .backend import get_xp, has_own_erfc
from .layers import as_float32

NEG_INF_F32 = layers.NEG_INF_F32


# --------------------------------------------------------------------------------------------------------------
# linear

def linear(x, weight, bias=None):
    """Replaces :func:`layers.linear` (``x @ as_float32(W).T + b``), choosing among three faster products.

    * a 2-byte weight (float16/bfloat16 storage) on NumPy: with few rows (decoding) and Numba installed,
      :func:`linear_fused` widens each weight as it multiplies it; otherwise :func:`linear_upcast_blocks` widens
      it a cache-sized block at a time instead of writing a float32 copy of the whole matrix;
    * a few rows on the CPU (2-3 on the development machine, 2-7 on an Intel Xeon; measured once per process,
      :func:`per_row`): :func:`_matvec_per_row`;
    * more rows: :func:`_matmul_weight_first` or the textbook product, whichever was measured faster for the
      shape (:func:`product_form`), with ragged rows padded to a multiple of 8 where that was measured faster
      (:func:`_in_padded_rows`).
    One row takes the textbook product. x [..., K], weight [N, K] -> [..., N] float32, row-major.
    """
    xp = get_xp(x)
    rows = x.size // x.shape[-1] if x.shape[-1] else 0
    if weight.dtype != np.float32 and xp is np and weight.size > UPCAST_MIN_SIZE:
        fused_here = rows <= UPCAST_FEW_ROWS and x.dtype == np.float32 and fused.available()
        y = linear_fused(x, weight) if fused_here else linear_upcast_blocks(x, weight)
    elif _per_row_here(xp, rows):
        y = _matvec_per_row(x, as_float32(weight))
    elif rows > 1:
        return _many_rows_product(x, as_float32(weight), bias)
    else:
        y = x @ as_float32(weight).T        # [..., K] @ [K, N] -> [..., N]
    if bias is not None:
        y += bias                           # in place: y is a fresh array
    return y


# Up to this many rows, one matrix-vector product per row beats one matrix product: None until the first product
# with 2-MATVEC_CANDIDATE_ROWS rows measures it (matvec_max_rows). On the development machine (AMD EPYC, OpenBLAS
# Haswell), [8192, 2048] from memory, per row / one product: once 0.73 (2 rows), 0.91 (3) and 1.3 (4); on a later,
# slower day 0.45-0.50, 0.56-0.61, 0.86-0.90, then 0.94-0.95 (5 rows) and 1.12 (6): the limit moved from 3 to 3-4.
MATVEC_MAX_ROWS: int | None = None
MATVEC_CANDIDATE_ROWS = 8   # the most rows that could take the per-row form (4 before it went block by block)
MATVEC_ROWS_ENV = "KOSMOS2_MATVEC_MAX_ROWS"   # "1": always one product (per-row form off); "3": up to 3 rows
_matvec_how = "not chosen yet"


def per_row(rows: int) -> bool:
    """Whether a product with ``rows`` rows takes one matrix-vector product per row (:func:`_matvec_per_row`)."""
    return 1 < rows <= MATVEC_CANDIDATE_ROWS and rows <= matvec_max_rows()


def _per_row_here(xp, rows: int) -> bool:
    """:func:`per_row`, on the CPU only: a GPU's matrix product reads W once whatever the rows."""
    return xp.__name__ != "cupy" and per_row(rows)


def matvec_max_rows() -> int:
    """Up to how many rows the per-row form is taken: ``KOSMOS2_MATVEC_MAX_ROWS`` when set, else measured once per
    process (:func:`_measure_matvec_rows`, ~0.2-0.5 s at the first product with 2-4 rows: decoding a small
    batch, or beams). The numbers differ between the two forms only by float32 summation order."""
    global MATVEC_MAX_ROWS, _matvec_how
    if MATVEC_MAX_ROWS is not None:
        return MATVEC_MAX_ROWS
    with _measure_lock:
        if MATVEC_MAX_ROWS is None:
            limit = _positive_int_setting(MATVEC_ROWS_ENV, "1: never one product per row; 3: up to 3 rows")
            if limit is not None:
                MATVEC_MAX_ROWS, _matvec_how = limit, f"set by {MATVEC_ROWS_ENV}"
            else:
                MATVEC_MAX_ROWS, _matvec_how = _measure_matvec_rows(), "measured at first use"
    return MATVEC_MAX_ROWS


def _positive_int_setting(name: str, meaning: str) -> int | None:
    """The positive int in environment variable ``name``, None when it is unset or blank; a ValueError naming the
    variable, what it held and what it means otherwise."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name} must be a positive int ({meaning}), got {text!r}")
    return int(text)


def _byte_sizes_setting(name: str, count: int, expected: str) -> list[int] | None:
    """The ``count`` comma-separated sizes in bytes (K, M, G suffixes; each at least 1K) in environment variable
    ``name``, None when it is unset or blank; a ValueError naming the variable, what it held and ``expected``
    otherwise."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    sizes = [machine.parse_size(part) for part in text.split(",")]     # 0 for what is not a size
    if len(sizes) != count or min(sizes) < 1024:
        raise ValueError(f"{name} must be {expected} (K and M suffixes allowed), got {text!r}")
    return sizes


def _measure_matvec_rows(repeats: int = 3, margin: float = 0.9) -> int:
    """The most rows r (up to MATVEC_CANDIDATE_ROWS) for which one matrix-vector product per row beat one matrix
    product by 1 − ``margin`` (10 %) at r and at every count below it, on a float32 [8192, 2048] matrix (64 MB,
    more than most L3s hold, so it streams from memory as the model's weights do): the best of ``repeats``
    timings each, the forms taken in turns. 1 when the per-row form never wins."""
    w = np.empty((8192, 2048), dtype=np.float32)
    w.fill(0.5)                                            # touch every page before timing
    best = {}
    for _ in range(repeats):
        for r in range(2, MATVEC_CANDIDATE_ROWS + 1):
            x = np.ones((r, 2048), dtype=np.float32)
            for form, fn in (("per row", _matvec_per_row), ("one product", _matmul_weight_first)):
                t0 = time.perf_counter()
                fn(x, w)
                key = (r, form)
                best[key] = min(best.get(key, math.inf), time.perf_counter() - t0)
    chosen = 1
    for r in range(2, MATVEC_CANDIDATE_ROWS + 1):
        if best[(r, "per row")] >= margin * best[(r, "one product")]:
            break
        chosen = r
    return chosen


def _matvec_per_row(x, w, block_bytes: int | None = None):
    """x @ w.T for a few rows of x (decoding a small batch, or a few beams), one matrix-vector product per row,
    on a block of w's rows at a time (``MATVEC_BLOCK_BYTES``, an L2 of float32 rows but at least 2 MiB;
    ``block_bytes`` overrides it for this call).

    Replaces :func:`layers.linear` for the few rows :func:`per_row` says. With 2-8 rows OpenBLAS's matrix-product
    kernel streams the weights slowly (on a 2-vCPU Intel Xeon, [8192, 2048] from memory: 2 rows 8.7 ms against
    2.8 for one). A matrix-vector product per row reads them at the full rate, but once per row; on a block that
    stays in the caches, the first row's product reads the block from memory and the others find it in the cache,
    so the weights come from memory once. Measured there (best of 5 passes over 10 such matrices): 2 rows 4.2 ms
    (per row over the whole matrix 4.9, one product 6.2-8.7), 3 rows 4.9 (6.7, 6.9-8.4), 4 rows 5.3 (8.0,
    6.2-8.1), 6 rows 6.2 (11.0, 7.1-9.0); blocks of 512 KiB and 1 MiB were slower than none there, a call on them
    too short for OpenBLAS's two threads (one row: 5.9-6.2 ms against 2.7-2.9). Which form wins, and up to how
    many rows, depends on the processor and its BLAS, so the limit is measured (:func:`matvec_max_rows`). Each
    output is one matrix-vector dot product whatever the block. x [..., K], w [N, K] -> [..., N], row-major.
    """
    xp = get_xp(x)
    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K)                        # [M, K]
    y = xp.empty((x2.shape[0], N), dtype=xp.float32)
    rows = max(1, (block_bytes or MATVEC_BLOCK_BYTES) // (4 * K))   # rows of w per block
    for r in range(0, N, rows):
        block = w[r:r + rows]                    # [n, K]: from memory for row 0's product, from the cache after
        for i in range(x2.shape[0]):
            xp.matmul(block, x2[i], out=y[i, r:r + rows])   # [n, K] @ [K] -> [n]
    return y.reshape(x.shape[:-1] + (N,))  # [M, N] -> [..., N]


def _matmul_weight_first(x, w, bias=None):
    """x @ w.T + b computed as (w @ xᵀ)ᵀ + b: the same product, a different call into BLAS (so the float32
    roundings of the sums may differ in the last bit; both are the product to float32 accuracy).

    With more than one row in x, this OpenBLAS runs the product with the weight as the left operand faster (it
    tiles the long weight dimension better). Measured on the model's shapes: vision q/k/v/out [257, 1024] x
    [1024, 1024] 2.6-4.5x, vision fc1 [257, 1024] x [4096, 1024] 1.0-1.3x, vision fc2 2.1-3.3x, text prefill
    (71 rows) fc1 1.4-1.5x and fc2 2.3-3.9x. That product comes out [N, M] row-major, i.e. [M, N] column-major; it is
    written into a fresh row-major [M, N] array in the pass that adds the bias (:func:`_write_transposed`), so
    callers get the layout :func:`layers.linear` gives. ``out=`` with the transposed view of a row-major buffer
    is no use: NumPy then leaves BLAS, as slow as the textbook product. x [..., K], w [N, K], bias [N]
    -> [..., N], row-major.
    """
    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K)                      # [M, K] (a view when x is contiguous)
    y = product_from_columns(x2.T, w, bias)    # [M, N] row-major
    return y.reshape(x.shape[:-1] + (N,))      # [M, N] -> [..., N]


def product_from_columns(xt, w, bias=None):
    """(w @ xt)ᵀ + b: the rows' product when the caller holds them transposed, xt [K, M] (M rows of K, one per
    column). The weight-first product of :func:`_matmul_weight_first`, whose tail this is; xt [K, M], w [N, K],
    bias [N] -> [M, N] float32, row-major, fresh."""
    xp = get_xp(xt)
    N, M = w.shape[0], xt.shape[1]
    if xp is np and N * M <= PRODUCT_SCRATCH_MAX:
        yt = np.matmul(w, xt, out=_reused("product", (N, M)))  # [N, K] @ [K, M] -> [N, M], reused memory
    else:
        yt = w @ xt
    y = xp.empty((M, N), dtype=xp.float32)
    _write_transposed(yt, bias, y)             # [M, N] row-major
    return y


def product_to_columns(x2, w, bias=None):
    """w @ x2ᵀ + b[:, None]: the product of x2 [M, K]'s rows, left transposed, [N, M] (one column per row) —
    on NumPy in this thread's reused hidden buffer (up to PRODUCT_SCRATCH_MAX elements), valid until its next call.
    For :func:`feed_forward`, whose element-wise work needs no particular layout. w [N, K], bias [N]."""
    N, M = w.shape[0], x2.shape[0]
    if get_xp(x2) is np and N * M <= PRODUCT_SCRATCH_MAX:
        ht = np.matmul(w, x2.T, out=_reused("hidden", (N, M)))  # [N, K] @ [K, M] -> [N, M]
    else:
        ht = w @ x2.T
    if bias is not None:
        ht += bias[:, None]                    # [N, M] + [N, 1]
    return ht


PRODUCT_SCRATCH_MAX = 8 << 20   # elements: the transposed product goes through a reused buffer up to 32 MB


# --------------------------------------------------------------------------------------------------------------
# Which way round: weight first or x first, measured per shape
#
# On the development machine's OpenBLAS kernel (Haswell, AMD EPYC Zen 3) the weight-first product beat x @ W.T by
# 2.6-4.5x on the vision tower's [257, 1024] x [1024, 1024] projections. With the SkylakeX kernel OpenBLAS picks on
# AVX-512 processors it is the other way round for 257 rows: x first 2.92 against 3.16 ms on an AMD EPYC Zen 4,
# and on an Intel Xeon (medians of 15, best of 3 rounds) 2.95 against 3.13 ms, for fc1's [1024] -> [4096] 11.7
# against 13.2 ms; with 71 rows and 8192 inputs weight first still won there (18.0 against 19.2 ms). So the form
# is not a constant: on NumPy the first calls of each shape take the two forms in turns, timed, and the shape then
# keeps the faster (x first only when 5 % faster: the measured default stays otherwise). A shape is its rows
# rounded up to a power of two (a prompt's length varies), its inputs and its outputs. The two forms differ only by
# float32 summation order. ``KOSMOS2_PRODUCT_FORM`` fixes the form for every shape instead.

PRODUCT_FORM_ENV = "KOSMOS2_PRODUCT_FORM"   # "weight-first" (the form before the choice) or "x-first"
WEIGHT_FIRST, X_FIRST = "weight-first", "x-first"
FORM_TRIALS = 3              # timed calls of each form per shape before the shape keeps one
FORM_MARGIN = 0.95           # x first must take less than this fraction of weight first's time to be kept
_forms: dict[tuple, str] = {}                            # (what, rows rounded up, K, N) -> the form kept
_form_trials: dict[tuple, dict[str, list[float]]] = {}   # the same keys -> each form's timings so far


def _form_setting() -> str | None:
    text = os.environ.get(PRODUCT_FORM_ENV, "").strip()
    if text and text not in (WEIGHT_FIRST, X_FIRST):
        raise ValueError(f"{PRODUCT_FORM_ENV} must be {WEIGHT_FIRST!r} or {X_FIRST!r} (unset: measured per "
                         f"shape), got {text!r}")
    return text or None


def _form_key(what: str, rows: int, K: int, N: int) -> tuple:
    return what, 1 << max(0, rows - 1).bit_length(), K, N     # rows rounded up to a power of two


def product_form(what: str, rows: int, K: int, N: int) -> str | None:
    """The form kept for ``what`` ("linear", "heads" or "mlp") with ``rows`` rows, K inputs and N outputs: ``X_FIRST``,
    ``WEIGHT_FIRST``, or None while its first calls are still being timed."""
    return _kept_form(_form_key(what, rows, K, N))


def _kept_form(key: tuple) -> str | None:
    return _form_setting() or _forms.get(key)


def _in_measured_form(key: tuple, weight_first, x_first):
    """Runs ``weight_first()`` or ``x_first()`` (the same result, two ways), the kept form for ``key``; until
    one is kept, the form with fewer timings so far, timed."""
    form = _kept_form(key)
    if form is not None:
        return (x_first if form == X_FIRST else weight_first)()
    ways = {WEIGHT_FIRST: weight_first, X_FIRST: x_first}
    return _timed_until_kept(key, ways, _forms, _form_trials, FORM_TRIALS, FORM_MARGIN)


def _timed_until_kept(key: tuple, ways: dict, kept: dict, trials: dict, count: int, margin: float):
    """Runs one of ``ways`` ({name: fn}, two ways to the same result, the default first) for ``key`` and returns
    its result: the way in ``kept[key]`` once there is one; until then one way, timed into ``trials[key]``.
    The ways take turns in the order default, other, other, default, ... (ABBA), so that where a model calls
    the same kind of work at two places in turn (a block's two LayerNorms) neither way is timed at only one of
    them. After ``count`` timings of each, ``kept[key]`` becomes the other way if its best took less than
    ``margin`` × the default's best, the default otherwise."""
    default, other = ways
    with _choice_lock:
        name = kept.get(key)
        if name is not None:
            times = None
        else:
            times = trials.setdefault(key, {default: [], other: []})
            name = (default, other, other, default)[sum(map(len, times.values())) % 4]
            if len(times[name]) >= count:                         # other threads took this turn meanwhile
                name = other if name == default else default
    if times is None:
        return ways[name]()
    t0 = time.perf_counter()
    result = ways[name]()
    seconds = time.perf_counter() - t0
    with _choice_lock:
        times[name].append(seconds)
        if key not in kept and min(len(t) for t in times.values()) >= count:
            kept[key] = other if min(times[other]) < margin * min(times[default]) else default
    return result


def _many_rows_product(x, w, bias=None):
    """x @ w.T + b for a float32 w [N, K] and x [..., K] with several rows: :func:`_matmul_weight_first` or the
    textbook product, as :func:`product_form` keeps for the shape, with the rows padded where that was measured
    faster (:func:`_in_padded_rows`; on CuPy always weight first, unmeasured and unpadded)."""
    if get_xp(x) is not np:
        return _matmul_weight_first(x, w, bias)
    K, N = x.shape[-1], w.shape[0]

    def product(x):             # x [..., K] -> [..., N] in the form kept (or being measured) for its shape
        key = _form_key("linear", x.size // K, K, N)
        return _in_measured_form(key, lambda: _matmul_weight_first(x, w, bias),
                                 lambda: _matmul_x_first(x, w, bias))

    return _in_padded_rows("linear", x, N, product)


# --------------------------------------------------------------------------------------------------------------
# Rows padded to a multiple of 8, where measured faster
#
# OpenBLAS's SkylakeX kernel multiplies 71 rows (the benchmark's prompt) more slowly than 72: on the Intel Xeon,
# streamed from memory, medians of 6 rounds in turns, [71, 2048] x [2048, 8192] took 14.4 ms in its faster form
# and 12.7 ms with one row of zeros added (0.88); [71, 8192] x [8192, 2048] 14.3 -> 12.6 ms (0.88); [71, 2048] x
# [2048, 2048] 3.50 -> 3.18 ms (0.91). The kernel works through the rows in groups, and a ragged last group costs
# it more than a whole one. 257 rows (the vision tower) gained only 1-2 % from 264. So, as with the product's
# form, it is measured: once the form of a shape is kept, the first calls with each number of rows that is not a
# multiple of ROWS_MULTIPLE take the product as it is and with zero rows appended up to the next multiple in
# turns, timed, and keep padding only when it is 5 % faster. The real rows' results are the same products, up
# to float32 summation order (a row may fall in another group of the kernel). ``KOSMOS2_PAD_ROWS`` = "on" or
# "off" fixes the choice for every shape.

ROWS_MULTIPLE = 8            # rows are padded up to a multiple of this
PAD_ROWS_ENV = "KOSMOS2_PAD_ROWS"
AS_IS, PADDED = "as is", "padded"
PAD_TRIALS = 3               # timed calls of each way per number of rows before one is kept
PAD_MARGIN = 0.95            # padded must take less than this fraction of the time as it is to be kept
_paddings: dict[tuple, str] = {}                           # (what, rows, K, N) -> the way kept
_padding_trials: dict[tuple, dict[str, list[float]]] = {}  # the same keys -> each way's timings so far


def _pad_setting() -> str | None:
    text = os.environ.get(PAD_ROWS_ENV, "").strip()
    if text and text not in ("on", "off"):
        raise ValueError(f"{PAD_ROWS_ENV} must be 'on' or 'off' (unset: measured per shape), got {text!r}")
    return {"on": PADDED, "off": AS_IS}.get(text)


def _in_padded_rows(what: str, x, N: int, product, inner: int | None = None):
    """``product(x)`` (x [..., K] -> [..., N], row-major), or the first rows of ``product`` of x with zero rows
    appended up to a multiple of ROWS_MULTIPLE, as kept for ``what`` with x's rows, K and N (measured once the
    product's form for the shape is kept; see above). ``inner``: the width the form is keyed by, when not N (the
    MLP's hidden width). NumPy only."""
    K = x.shape[-1]
    M = x.size // K
    P = -(-M // ROWS_MULTIPLE) * ROWS_MULTIPLE
    if P == M or M < ROWS_MULTIPLE:
        return product(x)

    def padded():
        xp = np.zeros((P, K), dtype=x.dtype)           # [P, K]: x's rows, then P − M rows of zeros
        xp[:M] = x.reshape(M, K)                        # [..., K] -> [M, K]
        return product(xp)[:M].reshape(x.shape[:-1] + (N,))   # [P, N] -> its first M rows, a view -> [..., N]

    ways = {AS_IS: lambda: product(x), PADDED: padded}
    key = (what, M, K, N if inner is None else inner)
    way = _pad_setting() or _paddings.get(key)
    if way is not None:
        return ways[way]()
    if _kept_form(_form_key(what, *key[1:])) is None:   # the form first: one choice measured at a time
        return product(x)
    return _timed_until_kept(key, ways, _paddings, _padding_trials, PAD_TRIALS, PAD_MARGIN)


def row_paddings() -> dict:
    """The way each measured shape with a ragged number of rows kept so far (:func:`_in_padded_rows`), e.g.
    ``{"linear 71x2048->8192": "padded"}``; with ``KOSMOS2_PAD_ROWS`` set, ``{"every shape": <the way>}``."""
    setting = _pad_setting()
    if setting:
        return {"every shape": setting}
    with _choice_lock:
        kept = dict(_paddings)
    return {f"{what} {rows}x{K}->{N}": way for (what, rows, K, N), way in sorted(kept.items())}


def _matmul_x_first(x, w, bias=None):
    """The textbook product, x @ w.T + b, the bias added in place. x [..., K], w [N, K] -> [..., N], row-major."""
    y = x @ w.T                                # [..., K] @ [K, N] -> [..., N], fresh
    if bias is not None:
        y += bias
    return y


# --------------------------------------------------------------------------------------------------------------
# Attention's projections, split into heads where the product leaves them

# False: NumPy's heads too come from linear and split_heads, as on every other namespace (the tests that hold
# NumPy's results bit for bit against the strict stand-in namespace's set it: see head_projection).
HEADS_AS_VIEWS = True


def head_projection(x, weight, bias, num_heads: int):
    """Replaces :func:`layers.head_projection` (split_heads(linear(x)), q, k or v): the heads read straight out of
    the weight-first product, where that form is kept for the shape.

    The weight-first product comes out [N, M] (:func:`_matmul_weight_first`), and :func:`linear` writes it into
    a fresh row-major [M, N] array only for split_heads to view it as [B, H, T, D] again. But [N, M] is already
    [H, D, B, T]: viewed as [B, H, T, D], each head is a transposed [T, D] matrix, which the attention's products
    take as they are (BLAS reads a transposed operand as it reads a plain one). So here the product stays [N, M],
    the bias is added in place and the heads are a view: no transposed write. The same product and bias add as
    the weight-first :func:`linear` (bit for bit); the attention after it reads the heads transposed, which
    OpenBLAS's Haswell kernel sums as it sums row-major heads (the same numbers) and its AVX-512 (SkylakeX)
    kernels in another order (~1e-6 relative apart; HEADS_AS_VIEWS = False takes the split). Measured on
    CLIP's [1, 257, 1024] q, k and v with the attention after them (AMD EPYC Zen 3, OpenBLAS Haswell, in turns,
    medians of 40): 27.8 -> 25.7 ms; whole full-size steps with the form fixed to weight first, image encoding
    0.97x and first token 0.96x (benchmarks/NOTES.md). There x first is as fast as these heads, though.

    Which form wins is measured per shape, as for :func:`linear` (key "heads"): weight first, the heads a view;
    or x first (rows padded where measured faster, :func:`_in_padded_rows`) and split_heads. One row, the few
    rows :func:`linear` takes one per row, 2-byte weights and other namespaces (CuPy): :func:`linear` and the
    split. x [B, T, C], weight [N, C] -> [B, H, T, N / H], a view.
    """
    xp = get_xp(x)
    B, T, K = x.shape
    M, N = B * T, weight.shape[0]
    if not HEADS_AS_VIEWS or xp is not np or weight.dtype != np.float32 or M <= 1 or _per_row_here(xp, M):
        return layers.split_heads(linear(x, weight, bias), num_heads)          # [B, T, N] -> [B, H, T, D]

    def x_first():
        y = _in_padded_rows("heads", x, N, lambda x: _matmul_x_first(x, weight, bias))   # [B, T, N]
        return layers.split_heads(y, num_heads)                                   # [B, T, N] -> [B, H, T, D]

    return _in_measured_form(_form_key("heads", M, K, N),
                             lambda: _heads_from_columns(x, weight, bias, num_heads), x_first)


def _heads_from_columns(x, weight, bias, num_heads: int):
    """The weight-first product of x [B, T, K] with weight [N, K], plus bias, as heads [B, H, T, D]: a view of the
    product's fresh [N, B·T] array."""
    B, T, K = x.shape
    N = weight.shape[0]
    ht = np.matmul(weight, x.reshape(B * T, K).T)       # [N, K] @ [K, B·T] -> [N, B·T], fresh
    if bias is not None:
        ht += bias[:, None]                             # [N, B·T] + [N, 1]
    return ht.reshape(num_heads, N // num_heads, B, T).transpose(2, 0, 3, 1)   # -> [H, D, B, T] -> [B, H, T, D]


def _reused(name: str, shape):
    """A float32 array of ``shape`` in this thread's buffer ``name``, grown when too small and otherwise reused,
    valid until the next call for the same name. For arrays that are read once and dropped (the transposed
    product, the MLP's hidden activation, a block of attention scores, the widened weights): on this VM fresh
    memory costs ~1.7 s per GB of new pages (benchmarks/NOTES.md). One buffer per thread, so models used from
    several threads do not share them."""
    size = math.prod(shape)
    buf = getattr(_local, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype=np.float32)
        setattr(_local, name, buf)
    return buf[:size].reshape(shape)    # [size] -> shape


def derived_blocks(caches: machine.CacheSizes) -> dict:
    """The block sizes that follow from the caches, powers of two within sane bounds: the element-wise block and
    the transposing tile each half an L2 of float32; the per-row product's blocks an L2 (at least 2 MiB, so that a
    call lasts long enough for OpenBLAS's threads); the widening's starting points 2 L2s for few rows (a block's
    even and odd columns, one L2 each) and 8 L2s for many. Few rows started at 4 L2s before: 2 MiB on the first
    development machine's 512 KiB L2, measured best there, but on a 1 MiB-L2 AMD EPYC (Zen 4) its 4 MiB made
    bfloat16 decoding fall into spells of 1.2-1.8 s per token against 0.38-0.45 s with 2 MiB (fresh processes
    in turns, benchmarks/NOTES.md), spells that a short measurement at first use did not catch. The attention
    block is an L2 of scores, at least 1 MiB (:func:`attention_blocks`)."""

    def pow2(v: float, lo: int, hi: int) -> int:
        return int(min(hi, max(lo, 1 << max(0, int(v).bit_length() - 1))))

    half_l2 = caches.l2 // 2
    return {
        "elementwise": pow2(half_l2 / 4, 1 << 14, 1 << 18),  # float32 elements
        "transpose_tile": (128, pow2(half_l2 / (4 * 128), 128, 2048)),  # [rows of y, columns of y]
        "upcast_few_rows": pow2(2 * caches.l2, 1 << 19, 32 << 20),  # float32 bytes per block
        "upcast_many_rows": pow2(8 * caches.l2, 1 << 20, 64 << 20),
        "matvec_block": pow2(caches.l2, 2 << 20, 16 << 20),       # float32 bytes of w's rows, at least 2 MiB
        "attention_block": pow2(caches.l2, 1 << 20, 8 << 20),     # float32 bytes of scores per block
    }


_DERIVED = derived_blocks(machine.cache_sizes())
TRANSPOSE_TILE = _DERIVED["transpose_tile"]     # [rows of y, columns of y] per tile of the transposing write
MATVEC_BLOCK_BYTES = _DERIVED["matvec_block"]   # float32 bytes of w's rows per block of _matvec_per_row


def _write_transposed(yt, bias, y):
    """y = yt.T + bias (bias None: y = yt.T), for yt [N, M] and y [M, N] row-major.

    On NumPy a tile at a time: one pass over a [257, 4096] product reads yt 1 kB apart per element and touches
    ~1000 pages per output row, which makes the whole-array write 3-4x slower than the in-place bias add it
    replaces; on 128 x 512 tiles it costs about as much (measured: 1.2 ms against 1.0 ms for the in-place add,
    3.7-7.7 ms whole, beside a 30-40 ms product).
    """
    xp = get_xp(y)
    N, M = yt.shape
    tm, tn = TRANSPOSE_TILE if xp is np else (M, N)
    for n0 in range(0, N, tn):
        b = None if bias is None else bias[n0:n0 + tn]
        for m0 in range(0, M, tm):
            src, dst = yt[n0:n0 + tn, m0:m0 + tm].T, y[m0:m0 + tm, n0:n0 + tn]
            if b is None:
                dst[...] = src
            else:
                xp.add(src, b, out=dst)


# --------------------------------------------------------------------------------------------------------------
# 2-byte weights: widen block by block, never the whole matrix
#
# ``x @ as_float32(W).T`` on a 2-byte W first writes a float32 copy of all of W (for the LM head 65037 x 2048,
# 533 MB) to memory and then reads it back: three times the bytes of the float32 product, plus a large allocation
# per call. Instead the rows of W are widened a block at a time into small scratch buffers that stay in the CPU
# cache, and each block's product is taken from there while it is hot. DRAM then sees only the 2-byte weights.
#
# The widening itself is the cost (NumPy cannot fuse it into the product), so it is done on pairs of weights:
# two neighbouring 2-byte numbers are one 32-bit word, and two bit operations on that word give both of them as
# float32 (:func:`widen_pairs`): the even columns of the block and its odd columns, as two matrices. The product
# is split the same way: x·w = x[0::2]·w[0::2] + x[1::2]·w[1::2].
#
# With few rows (decoding) the product is bound by one core reading the 2-byte weights from memory (~9 GB/s on a
# 2-vCPU AMD EPYC, Zen 3, against ~23 GB/s for the two cores' BLAS product in float32). So there the blocks are
# shared among the threads (:func:`over_row_blocks`): each widens and multiplies the blocks of a contiguous part of
# w's rows, into its own scratch buffers and its own columns of y, and NumPy releases the GIL inside each call.
# Whether that pays is measured per size where it runs, as for the element-wise passes: two threads over one
# matrix used again and again lost on the Xeon and on Zen 4 (benchmarks/NOTES.md). On Zen 3 (OpenBLAS Haswell),
# eight distinct [8192, 2048] bfloat16 matrices with one row, best of 7 in turns: one thread 45.2 ms (1 MiB
# blocks) / 43.4 (2 MiB), split 34.8 / 31.9; whole bfloat16 decoded tokens split / one thread 0.92-0.94 (0.85
# with 2 MiB blocks), float16 0.95. Many rows are bound by the arithmetic, which OpenBLAS's threads share already.

UPCAST_MIN_SIZE = 1 << 16                 # smaller matrices are simply widened whole
UPCAST_FEW_ROWS = 8                       # x with at most this many rows counts as "few" (decoding)
# float32 bytes per widened block when x has few rows / many rows (GEMM likes wider blocks): None until the first
# 2-byte product of the process chooses them (upcast_block_bytes). On the development machine (512 KiB L2, two
# BLAS threads) bfloat16 ran at 4.5 G weights/s with 1 MiB blocks, 4.9-5.1 with 2 MiB, 3.5 with 4 MiB.
UPCAST_BLOCK_BYTES: int | None = None
UPCAST_BLOCK_BYTES_MANY_ROWS: int | None = None
UPCAST_BLOCKS_ENV = "KOSMOS2_UPCAST_BLOCKS"   # "FEW,MANY" in bytes (K/M suffixes allowed), e.g. "2M,8M"
_choice_lock = threading.Lock()      # guards the choices kept so far and their trials (held only briefly)
_measure_lock = threading.Lock()     # held while a once-per-process size is measured (the products it times
                                     # take _choice_lock themselves: one lock for both would deadlock)
_upcast_how = "not chosen yet"

_F16_TO_F32_SCALE = np.float32(2.0 ** 112)   # 2^(127 - 15): float16's exponent bias -> float32's
_F16_FIELDS = np.int32(-0x70002000)          # 0x8FFFE000: the sign bit and float16's 15 exponent/mantissa bits
_local = threading.local()


def widen_pairs(src, even, odd, *, scaled: bool = False) -> bool:
    """2-byte weight rows ``src`` [n, K] (K even) -> float32 ``even`` = src[:, 0::2] and ``odd`` = src[:, 1::2].

    Replaces :func:`layers.as_float32` inside :func:`linear_upcast_blocks`: two bit operations per pair of weights
    instead of a cast per weight. Exact for every value. Little-endian: the word holding columns 2j and 2j+1 has
    column 2j in its low 16 bits and column 2j+1 in its high 16 bits. Each goes to the top half of a 32-bit word
    in one operation: ``word << 16`` for column 2j, ``word & 0xFFFF0000`` (or an arithmetic shift right, below)
    for 2j+1.

    * bfloat16 (held as uint16 bits) *is* the top half of a float32, so that is already the answer.
    * float16 in the top half is sign | 5 exponent bits | 10 mantissa bits. An arithmetic shift right by 3 puts
      the exponent and mantissa where float32 keeps its own (and copies the sign into bits 31..28); keeping only
      the sign and those 15 bits (``& 0x8FFFE000``) leaves sign | exponent e (bias 15, read as bias 127) |
      mantissa, i.e. 2^-112 × the float16 value, exactly, subnormals (e = 0) and ±0 included. Multiplying by
      2^112 gives the value itself. Only inf/NaN (e = 31) come out wrong, as finite numbers of magnitude ≥ 65536
      — larger than any finite float16 — so they are detected and that block is cast the slow, exact way instead.
    * ``scaled=True`` (float16 only) stops before the multiplication and the inf/NaN check: ``even``/``odd`` hold
      2^-112 × the weights, and the caller multiplies x by 2^112 instead (:func:`linear_upcast_blocks`), which
      gives the very same products. Only for a matrix known to hold no inf/NaN.

    Returns False when a float16 block held an inf or NaN (it was then cast exactly), True otherwise.
    """
    words = src.view(np.uint32)                      # [n, K/2]: one word per pair of weights
    np.left_shift(words, 16, out=even.view(np.uint32))          # column 2j -> top half, zeros below
    if src.dtype != np.float16:
        np.bitwise_and(words, 0xFFFF0000, out=odd.view(np.uint32))   # column 2j+1 is already the top half
        return True
    e, o = even.view(np.int32), odd.view(np.int32)
    e >>= 3                                          # arithmetic: sign copied into bits 31..28
    np.right_shift(words.view(np.int32), 3, out=o)   # the same for column 2j+1 (2j's bits fall into bits 12..0)
    e &= _F16_FIELDS
    o &= _F16_FIELDS
    if scaled:
        return True
    for half in (even, odd):
        half *= _F16_TO_F32_SCALE
        if half.max() >= 65536.0 or half.min() <= -65536.0:   # an inf or NaN was among them
            np.copyto(even, src[:, 0::2])
            np.copyto(odd, src[:, 1::2])
            return False
    return True


# Read-only float16 matrices (as loaded: weights.load_flat hands out read-only arrays) seen to hold no inf/NaN, so
# that later products may skip the check (see linear_upcast_blocks). A writable matrix is never remembered: its
# values could change. id(matrix) -> a weak reference to it; the entry is removed when the matrix is freed.
_float16_all_finite: dict[int, object] = {}


def _known_finite(w) -> bool:
    ref = _float16_all_finite.get(id(w))
    return ref is not None and ref() is w


def _remember_finite(w) -> None:
    key = id(w)
    _float16_all_finite[key] = weakref.ref(w, lambda _ref: _float16_all_finite.pop(key, None))


def _scratch(rows: int, cols: int):
    """Two reusable float32 buffers of shape [rows, cols] for a block's even and odd columns (:func:`_reused`)."""
    pair = _reused("widened", (2, rows, cols))
    return pair[0], pair[1]     # [rows, cols] each


def linear_upcast_blocks(x, w, block_bytes: int | None = None):
    """x @ float32(w).T for a 2-byte ``w`` [N, K], widened block by block (see the comment above).

    Replaces :func:`layers.linear` on a 2-byte weight (``x @ as_float32(w).T``). Measured on a [8192, 2048]
    matrix: one row, bfloat16 3.5-4.7x and float16 3.0-5.2x (a read-only matrix known finite, the scaled
    widening); 71 rows, bfloat16 1.2x (each block's product weight first, as in :func:`_matmul_weight_first`;
    with the x-first product the blocks took before, 0.3-0.4x). x [..., K] float32 -> [..., N] float32,
    row-major; equal to ``x @ as_float32(w).T`` up to BLAS summation order. ``block_bytes`` overrides the
    process's choice (:func:`upcast_block_bytes`) for this call. With few rows the blocks are shared among the
    threads where that was measured faster (see the comment above; the same numbers either way).
    """
    N, K = w.shape
    x2 = x.reshape(-1, K)                              # [M, K]
    M = x2.shape[0]
    if K % 2 or sys.byteorder != "little":             # no pairs to split: widen each block whole
        return (x2 @ as_float32(w).T).reshape(x.shape[:-1] + (N,))
    x_even = np.ascontiguousarray(x2[:, 0::2])         # [M, K/2]
    x_odd = np.ascontiguousarray(x2[:, 1::2])
    # float16: once a matrix has been widened the checked way and held no inf/NaN, later calls widen it to
    # 2^-112 × its values and take x × 2^112 instead — the same products, two fewer passes over each weight and
    # no check. Measured here: widening and product on [8192, 2048] 1.7 -> 3.1 G weights/s against the previous
    # form; a full-size float16 decoded token 0.75 -> 0.46 s against the checked form. Not when x × 2^112 could
    # overflow (|x| ≥ 2^16) or x holds a NaN.
    scaled = w.dtype == np.float16 and _known_finite(w) and bool(np.abs(x2).max(initial=0.0) < 2.0 ** 16)
    if scaled:
        x_even *= _F16_TO_F32_SCALE
        x_odd *= _F16_TO_F32_SCALE
    few_rows = M <= UPCAST_FEW_ROWS
    y = np.empty((M, N), dtype=np.float32)

    def block_product(r: int, n: int) -> bool:         # rows r … r+n−1 of w, in this thread's scratch buffers
        w_even, w_odd = _scratch(n, K // 2)
        finite = widen_pairs(w[r:r + n], w_even, w_odd, scaled=scaled)   # [n, K/2] each, float32, in cache
        if few_rows:
            out = y[:, r:r + n]
            np.matmul(x_even, w_even.T, out=out)       # [M, K/2] @ [K/2, n]
            out += x_odd @ w_odd.T
        else:                                          # many rows: weight first, as in _matmul_weight_first
            yt = w_even @ x_even.T                     # [n, K/2] @ [K/2, M] -> [n, M]
            yt += w_odd @ x_odd.T
            _write_transposed(yt, None, y[:, r:r + n])
        return finite

    block = max(1, (block_bytes or upcast_block_bytes(few_rows)) // (4 * K))
    all_finite = over_row_blocks(block_product, N, block, shared=few_rows, elements=N * K)
    if w.dtype == np.float16 and not scaled and all_finite and not w.flags.writeable:
        _remember_finite(w)
    return y.reshape(x.shape[:-1] + (N,))  # [M, N] -> [..., N]


def linear_fused(x, w):
    """x @ float32(w).T for a 2-byte ``w`` [N, K] and a few rows of x, each weight widened in a register as it is
    multiplied (:mod:`kosmos2_ref.fused`, compiled by Numba): a weight is read once, 2 bytes, where
    :func:`linear_upcast_blocks` also writes and reads it back widened (4 + 4 bytes).

    Replaces :func:`layers.linear` on a 2-byte weight for up to UPCAST_FEW_ROWS rows, where Numba is installed
    and ``KOSMOS2_FUSED`` is not "off". Measured on ten distinct [8192, 2048] bfloat16 matrices streamed from
    memory (AMD EPYC Zen 4, 2 vCPUs, medians of 5 in turns; benchmarks/NOTES.md), ms per matrix, fused /
    widened in blocks / float32 weights through :func:`linear`: 1 row 1.53 / 4.02 / 2.42, 2 rows 2.12 / 4.09 /
    3.14, 8 rows 5.77 / 13.0 / 8.62. So a bfloat16 matrix-vector product now reads memory faster than a float32
    one. The rows of w are shared among the threads where that was measured faster (:func:`over_parts`, kind
    "fused 2-byte product"; with one row a core's reading is the limit, with more the arithmetic). x [..., K]
    float32 -> [..., N] float32, row-major; equal to ``x @ as_float32(w).T`` up to float32 summation order.
    """
    N, K = w.shape
    x2 = np.ascontiguousarray(x.reshape(-1, K))        # [M, K]
    w = np.ascontiguousarray(w)                        # a loaded weight already is (no copy)
    y = np.empty((x2.shape[0], N), dtype=np.float32)   # [M, N]: each part writes its own columns
    over_parts(lambda first, stop: fused.matvec_2byte(x2, w, y, first, stop), N, w.size, "fused 2-byte product")
    return y.reshape(x.shape[:-1] + (N,))              # [M, N] -> [..., N]


def over_row_blocks(each, N: int, block: int, shared: bool, elements: int) -> bool:
    """``each(r, n)`` for the blocks of rows r … r+n−1 of a matrix of N rows, ``block`` rows a block (the last one
    fewer), in order; with ``shared`` the blocks are shared among the threads where that was measured faster
    (:func:`over_parts`, kind "2-byte widening", ``elements`` the matrix's). True when every call returned True."""
    starts = range(0, N, block)                        # the first row of each block
    results = []                                       # one per part: did every block of it return True

    def blocks(first: int, stop: int) -> None:         # blocks first … stop − 1
        results.append(all([each(r, min(block, N - r)) for r in starts[first:stop]]))   # every block runs

    if shared:
        over_parts(blocks, len(starts), elements, "2-byte widening")
    else:
        blocks(0, len(starts))
    return all(results)


def upcast_block_bytes(few_rows: bool) -> int:
    """The widening's float32 bytes per block for x with few rows (decoding) or many (a prompt), chosen once per
    process: from ``KOSMOS2_UPCAST_BLOCKS`` when set, else measured (:func:`_measure_block`) among sizes around
    the cache-derived one (:func:`derived_blocks`, :func:`upcast_block_candidates`). Measuring takes ~0.4-1.2 s
    (the Xeon, whose memory feeds one core slowly, takes longest), once, at the first 2-byte
    product; every later product reuses the choice (the numbers do not depend on it: blocks split the output
    columns, never a dot product)."""
    global UPCAST_BLOCK_BYTES, UPCAST_BLOCK_BYTES_MANY_ROWS, _upcast_how
    chosen = UPCAST_BLOCK_BYTES if few_rows else UPCAST_BLOCK_BYTES_MANY_ROWS
    if chosen is not None:
        return chosen
    with _measure_lock:
        if UPCAST_BLOCK_BYTES is None or UPCAST_BLOCK_BYTES_MANY_ROWS is None:
            few, many, _upcast_how = _choose_upcast_blocks()
            if UPCAST_BLOCK_BYTES is None:
                UPCAST_BLOCK_BYTES = few
            if UPCAST_BLOCK_BYTES_MANY_ROWS is None:
                UPCAST_BLOCK_BYTES_MANY_ROWS = many
    return UPCAST_BLOCK_BYTES if few_rows else UPCAST_BLOCK_BYTES_MANY_ROWS


def _choose_upcast_blocks() -> tuple[int, int, str]:
    sizes = _byte_sizes_setting(UPCAST_BLOCKS_ENV, 2, "two block sizes in bytes, FEW,MANY, each at least 1K, "
                                                      "e.g. '2M,8M'")
    if sizes is not None:
        return sizes[0], sizes[1], f"set by {UPCAST_BLOCKS_ENV}"
    few = _measure_block(_DERIVED["upcast_few_rows"], rows=1)
    many = _measure_block(_DERIVED["upcast_many_rows"], rows=32)
    return few, many, "measured at first use"


# The smallest few-row block _measure_block tries. On a 2-vCPU Intel Xeon (AVX-512, AMX; 2 MiB L2; OpenBLAS
# SkylakeX) the fastest few-row block was 512 KiB, a quarter of an L2, where the AMD EPYCs' best was 2 L2s
# ([8192, 2048] bfloat16, one row, streamed: 256 KiB 8.8 ms, 512 KiB 8.1-8.7, 1 MiB 9.2-10.2, 2 MiB 11.7-13.5,
# 4 MiB 12.0-12.1): one core widens the whole block, from memory at ~8 GB/s there, so the sizes that keep its
# output nearest that core win. No rule from the cache sizes fits both, so few rows try every power of two from
# here up to twice the derived size.
UPCAST_SMALLEST_FEW_ROWS_BLOCK = 256 << 10


def upcast_block_candidates(start: int, few_rows: bool) -> list[int]:
    """The block sizes :func:`_measure_block` times, ``start`` (the cache-derived size) first: for few rows every
    power of two from ``UPCAST_SMALLEST_FEW_ROWS_BLOCK`` to 2 × ``start``; for many rows ½, 1 and 2 × ``start``."""
    if not few_rows:
        return [start, start // 2, start * 2]
    smaller, size = [], start // 2
    while size >= UPCAST_SMALLEST_FEW_ROWS_BLOCK:
        smaller.append(size)
        size //= 2
    return [start, *smaller, start * 2]


def _measure_block(start: int, rows: int, repeats: int = 3, margin: float = 0.9) -> int:
    """The fastest of :func:`upcast_block_candidates` for bfloat16 [4096, 2048] matrices times x [rows, 2048].
    For few rows (decoding, bound by memory) the matrices stream from memory as a model's weights do: one pass
    over distinct matrices of twice the L3 in all (2-8 of them, 16 MiB each; one matrix used again and again
    would sit in the L3). For many rows (bound by the arithmetic) one matrix. The best of ``repeats`` passes
    each, taken in turns so that a busy moment hits all sizes alike; a size other than ``start`` must beat it by
    1 − ``margin`` (10 %) to be chosen, so noise keeps the cache-derived one."""
    rng = np.random.default_rng(0)
    tile = rng.standard_normal((64, 2048), dtype=np.float32).view(np.uint32) >> 16   # bfloat16 bits of N(0, 1)
    few_rows = rows <= UPCAST_FEW_ROWS
    streamed = min(8, max(2, -(-2 * machine.cache_sizes().l3 // (16 << 20))))   # matrices of 16 MiB, 2 L3s
    bits = tile.astype(np.uint16)                                                   # [64, 2048]
    ws = [np.tile(bits, (64, 1)) for _ in range(streamed if few_rows else 1)]    # [4096, 2048] each
    x = rng.standard_normal((rows, 2048), dtype=np.float32)
    candidates = upcast_block_candidates(start, few_rows)
    best = dict.fromkeys(candidates, math.inf)
    linear_upcast_blocks(x, ws[0], block_bytes=max(candidates))  # warm the scratch buffers
    for _ in range(repeats):
        for size in candidates:
            t0 = time.perf_counter()
            for w in ws:
                linear_upcast_blocks(x, w, block_bytes=size)
            best[size] = min(best[size], time.perf_counter() - t0)
    fastest = min(candidates, key=best.get)
    return fastest if best[fastest] < margin * best[start] else start


def block_sizes() -> dict:
    """The block sizes in use and where they came from (the benchmark prints this with the processor)."""
    caches = machine.cache_sizes()
    return {
        "caches": {"l1d": caches.l1d, "l2": caches.l2, "l3": caches.l3, "source": caches.source},
        "elementwise": ELEMENTWISE_BLOCK,
        "transpose_tile": list(TRANSPOSE_TILE),
        "upcast_few_rows": UPCAST_BLOCK_BYTES,
        "upcast_many_rows": UPCAST_BLOCK_BYTES_MANY_ROWS,
        "upcast_how": _upcast_how,
        "two_byte_few_rows": fused.how(),
        "matvec_block": MATVEC_BLOCK_BYTES,
        "matvec_max_rows": MATVEC_MAX_ROWS,
        "matvec_how": _matvec_how,
        "product_forms": product_forms(),
        "elementwise_splits": elementwise_splits(),
        "row_paddings": row_paddings(),
    }


def product_forms() -> dict:
    """The form each measured shape kept so far (:func:`product_form`), e.g. ``{"linear 512x1024->1024":
    "x-first"}``; with ``KOSMOS2_PRODUCT_FORM`` set, ``{"every shape": <its value>}``."""
    setting = _form_setting()
    if setting:
        return {"every shape": setting}
    with _choice_lock:
        kept = dict(_forms)
    return {f"{what} {rows}x{K}->{N}": form for (what, rows, K, N), form in sorted(kept.items())}


# --------------------------------------------------------------------------------------------------------------
# Element-wise work on every core

# The matrix products run on every core (the BLAS's threads), while NumPy's element-wise passes (exp, erfc, sums,
# divisions) run on one. NumPy releases the GIL inside them, so a pool of threads can each take a contiguous part
# of a large array: the same operations on the same elements, so the same numbers. Measured A/B in one process
# (benchmarks/primitives.py --threads-ab, AMD EPYC 2 vCPUs, two runs, medians of 15 and 31): quick_gelu on
# [1, 257, 4096] 1.32-1.76x, gelu on [1, 71, 8192] 1.15-1.26x and on [1, 1024, 8192] 1.36-1.44x; LayerNorm on
# [1, 257, 1024] 0.92-1.19x and [1, 71, 8192] 1.04-1.37x, but 0.75-0.88x on [1, 71, 2048] (hence the threshold).
# Attention's scale-mask-softmax shared out by heads measured 0.90-0.94x, so attention stays on one thread.
# Whole steps (benchmarks/elementwise_ab.py, full size, two runs): image encoding 0.96-1.03x, first token
# 1.02-1.03x, within that VM's run-to-run noise: the activations are a few per cent of a step there.
ELEMENTWISE_THREADS_ENV = "KOSMOS2_ELEMENTWISE_THREADS"   # "1": one thread (the form before this split), "4": four
PARALLEL_MIN_ELEMENTS = 1 << 18     # smaller arrays stay on one thread: a hand-off costs ~10-50 µs


def elementwise_threads() -> int:
    """Threads for the element-wise passes: ``KOSMOS2_ELEMENTWISE_THREADS`` when set (a positive int), else
    :func:`machine.compute_threads` (the cores the process may use, or fewer where OMP_NUM_THREADS and the like
    say so). Read at each call, so it can be switched within a process."""
    threads = _threads_setting()
    return machine.compute_threads() if threads is None else threads


def _threads_setting() -> int | None:
    return _positive_int_setting(ELEMENTWISE_THREADS_ENV, "1 turns the split off")


_pool_lock = threading.Lock()
_pool_state = {"pid": None, "size": 0, "pool": None}


def _pool(workers: int):
    """The process's pool of ``workers`` helper threads, made at first use (again after a fork, whose child has
    none of its parent's threads, or when the thread count changed)."""
    from concurrent.futures import ThreadPoolExecutor

    with _pool_lock:
        state = _pool_state
        if state["pid"] != os.getpid() or state["size"] != workers:
            if state["pool"] is not None and state["pid"] == os.getpid():
                state["pool"].shutdown(wait=False)
            state.update(pid=os.getpid(), size=workers,
                         pool=ThreadPoolExecutor(workers, thread_name_prefix="kosmos2-elementwise"))
        return state["pool"]


# Split or not: measured per kind of work and size, where it runs
#
# The split gained on the 2-vCPU EPYC (above) but loses on the 2-vCPU Intel Xeon: there OpenBLAS's worker keeps
# spinning on the second core for 100-200 ms after each product (benchmarks/NOTES.md), so a part handed to a
# second thread between two of the model's products waits for that core. In a prefill there, the vision tower's
# LayerNorm [1, 257, 1024] took 1.19-1.37 ms split against 1.00 ms on one thread, and whole steps ran 1.4-1.9 %
# slower split. So the split is not a constant either: with KOSMOS2_ELEMENTWISE_THREADS unset, the first calls of
# each kind of work and size (its elements rounded up to a power of two) take both ways in turns, timed where they
# run, and the kind keeps the faster (the split only when 5 % faster). Both ways give the same numbers.
SPLIT_TRIALS = 3             # timed calls of each way per kind and size before one is kept
SPLIT_MARGIN = 0.95          # the split must take less than this fraction of one thread's time to be kept
ONE_THREAD, SPLIT = "one thread", "split"
_splits: dict[tuple, str] = {}                            # (kind, elements rounded up, threads) -> the way kept
_split_trials: dict[tuple, dict[str, list[float]]] = {}   # the same keys -> each way's timings so far


def over_parts(fn, n: int, elements: int, what: str | None = None) -> None:
    """``fn(start, stop)`` over ``range(n)``, either in one call or cut into one contiguous part per thread, this
    thread taking the first. One call when ``elements`` (what the work touches) is below PARALLEL_MIN_ELEMENTS or
    one thread is configured. Otherwise cut, when ``KOSMOS2_ELEMENTWISE_THREADS`` is set or ``what`` is None; and
    when ``what`` names the kind of work (e.g. "layer_norm") with the setting unset, as measured for that kind and
    size (:func:`elementwise_splits`). ``fn`` must write disjoint parts of its output for disjoint ranges."""
    setting = _threads_setting()
    threads = min(machine.compute_threads() if setting is None else setting, n)
    if threads <= 1 or elements < PARALLEL_MIN_ELEMENTS:
        fn(0, n)
        return
    if setting is not None or what is None:
        _in_parts(fn, n, threads)
        return
    key = (what, 1 << max(0, elements - 1).bit_length(), threads)
    ways = {ONE_THREAD: lambda: fn(0, n), SPLIT: lambda: _in_parts(fn, n, threads)}
    _timed_until_kept(key, ways, _splits, _split_trials, SPLIT_TRIALS, SPLIT_MARGIN)


def _in_parts(fn, n: int, threads: int) -> None:
    """``fn`` over ``range(n)`` in ``threads`` contiguous parts, the first on this thread, the rest on the pool."""
    bounds = [n * i // threads for i in range(threads + 1)]
    pool = _pool(threads - 1)
    futures = [pool.submit(fn, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
    try:
        fn(bounds[0], bounds[1])
    finally:
        for future in futures:
            future.result()     # waits for every part, and raises the first part's error


def elementwise_splits() -> dict:
    """The way each measured kind of element-wise work kept so far (:func:`over_parts`), e.g. ``{"layer_norm
    512K x2": "one thread"}`` (elements rounded up, threads); with ``KOSMOS2_ELEMENTWISE_THREADS`` set,
    ``{"every kind": "<n> threads"}``."""
    setting = _threads_setting()
    if setting is not None:
        return {"every kind": f"{setting} thread{'s' if setting > 1 else ''}"}
    with _choice_lock:
        kept = dict(_splits)
    return {f"{what} {_count(size)} x{threads}": way for (what, size, threads), way in sorted(kept.items())}


def _count(n: int) -> str:
    """512 -> "512", 262144 -> "256K", 2097152 -> "2M" (a power of two, as the split's sizes are)."""
    for shift, unit in ((20, "M"), (10, "K")):
        if n >= 1 << shift:
            return f"{n >> shift}{unit}"
    return str(n)


# --------------------------------------------------------------------------------------------------------------
# layer_norm

def layer_norm(x, weight, bias, eps: float = 1e-5):
    """Replaces :func:`layers.layer_norm`: the same float64 mean, the rest in place on the output buffer
    (x − mean is the only full-size array), and sums divided by n rather than ``.mean()`` (the same float64
    numbers, without ``.mean()``'s Python-level wrapper, a visible cost at 97 LayerNorms per decoded token).
    The variance is a float32 dot product of each centred row with itself (:func:`_row_dots`), where the textbook
    squares into a temporary and sums in float64: no temporary (fresh pages for every call unless freed memory is
    kept), and on one thread a LayerNorm of [1, 257, 1024] took 0.19-0.32 of the time before (AMD EPYC Zen 3;
    benchmarks/NOTES.md). The float64 mean is what keeps a constant row exactly 0 once centred; the
    variance only goes under the square root, where float32's ~1e-7 relative error moves the last bit at most.
    Multiplies by 1/√(var + eps) formed in float64, where the textbook divides by √ in float32: the last bit may
    differ. Rows are shared among the threads where that was measured faster (:func:`over_parts`). Measured
    1.3-1.4x on [1, 1, 2048] (decoding), 1.15-1.6x on [1, 71, 8192] and [1, 257, 1024] (one thread).

    Where Numba is installed, each part of a row-major float32 x's rows is instead one compiled call
    (:func:`fused.layer_norm_rows`): three trips through each row (the float64 mean, the float64 variance, the
    output) where NumPy's form makes six calls, each with its own overhead and its own trip; more exact (its
    variance summed in float64), otherwise the same steps. Measured on the 2-vCPU AMD EPYC Zen 4 (medians of
    200, one thread): [1, 1, 2048] 25.2 -> 2.8 µs, [1, 71, 2048] 399 -> 75 µs, [1, 257, 1024] 456 -> 106 µs,
    [1, 71, 8192] 1640 -> 362 µs; max error against float64 1.0-1.2e-6 against 1.2-1.6e-6 (kind "fused
    layer_norm" for the split). x [..., C] -> [..., C].
    """
    xp = get_xp(x)
    compiled = xp is np and x.dtype == np.float32 and fused.available()    # Numba's one-call LayerNorm
    if xp is not np or not x.flags.c_contiguous or (x.size < PARALLEL_MIN_ELEMENTS and not compiled):
        return _layer_norm_rows(x, weight, bias, eps, xp.empty_like(x, dtype=xp.float32))  # x's memory order
    rows = x.reshape(-1, x.shape[-1])   # [R, C], a view
    out = np.empty(rows.shape, np.float32)
    w, b = np.ascontiguousarray(weight), np.ascontiguousarray(bias)

    def part(first: int, stop: int) -> None:      # rows first … stop − 1 into the same rows of out
        if compiled:
            fused.layer_norm_rows(rows, w, b, eps, out, first, stop)
        else:
            _layer_norm_rows(rows[first:stop], w, b, eps, out[first:stop])

    over_parts(part, len(rows), rows.size, "fused layer_norm" if compiled else "layer_norm")
    return out.reshape(x.shape)         # [R, C] -> [..., C]


def _layer_norm_rows(x, weight, bias, eps: float, out):
    """LayerNorm of x [..., C] written into ``out`` (float32, x's shape) and returned."""
    xp = get_xp(x)
    n = x.shape[-1]
    mean = (x.sum(axis=-1, keepdims=True, dtype=xp.float64) / n).astype(xp.float32)   # [..., 1]
    xc = xp.subtract(x, mean, out=out)                                                  # [..., C]
    var = _row_dots(xc)[..., None] / xp.float32(n)                                      # [..., 1], float32
    xc *= (1.0 / xp.sqrt(var.astype(xp.float64) + eps)).astype(xp.float32)
    xc *= weight
    xc += bias
    return xc


def _row_dots(x):
    """Σ_c x[..., c]² in float32, x [..., C] -> [...]: the namespace's ``vecdot`` (NumPy 2.0 and later), else an
    einsum."""
    xp = get_xp(x)
    if hasattr(xp, "vecdot"):
        return xp.vecdot(x, x)
    return xp.einsum("...c,...c->...", x, x)


# --------------------------------------------------------------------------------------------------------------
# Element-wise activations, a cache-sized block at a time

ELEMENTWISE_BLOCK = _DERIVED["elementwise"]   # elements per block of a long chain of element-wise passes: half an L2


# GELU as x · sigmoid(L(x)), L(x) = log(Φ(x) / Φ(−x)) = x · P(x²): P's coefficients, u⁰ first, fitted by
# scripts/fit_gelu.py (a minimax fit on 0 < x ≤ 5.5 of the error that matters, x · s(1 − s) · ΔL; beyond it P
# keeps growing, so the sigmoid is 0 or 1 there to float32 resolution)
GELU_LOGIT = (1.595769882963298, 0.0726661689295864, -6.518967538846265e-05, -0.00011061251813122242,
              7.929515530170876e-06, -2.645290207177415e-07, 3.5124126875005795e-09)
_GELU_NEG_LOGIT = tuple(np.float32(-c) for c in GELU_LOGIT)    # −P's coefficients: the chain ends at −L


def gelu(x):
    """Replaces :func:`layers.gelu`: the exact (erf) GELU, computed as x / (1 + exp(−L(x))) with L(x) = x · P(x²)
    the logit of the normal CDF (:data:`GELU_LOGIT`); on NumPy ELEMENTWISE_BLOCK elements at a time
    (:func:`_in_cache_sized_blocks`).

    18 passes over each block where the erfc form takes ~40 (erfc's Chebyshev chain and its sign blend). Not the
    same numbers as the textbook: against float64 erfc on 440 003 points in [−20, 20]
    (tests/test_fast_vs_reference.py) the error is at most 1.4e-7 × |x| (the textbook's 2.6e-7 × |x|, torch's
    float32 ``gelu`` 3.5e-7 × |x|); relative to GELU itself 1.6e-5 at most for x ≥ −3, but only absolute far
    left, where GELU is below 1e-6 × |x| (the textbook keeps relative precision there, torch does not: 1 + erf
    cancels). Measured on [71, 8192] (Intel Xeon, one thread): 3.6-4.1 -> 1.1-1.7 ms; two threads 2.2-2.4 ->
    1.0-1.2 ms; on [1024, 8192] 34 -> 17 ms. Where the namespace has an erfc kernel of its own (CuPy: one pass),
    the textbook form with it. x [...] -> [...], in x's memory order.
    """
    xp = get_xp(x)
    if has_own_erfc(x):
        return layers.gelu(x)
    if xp is not np:
        return _gelu_logistic_into(x, None)
    return _in_cache_sized_blocks(_gelu_logistic_into, x)


def _gelu_logistic_into(x, out):
    """x / (1 + exp(−x · P(x²))) written into ``out`` (float32, x's shape; may be x itself; fresh when None) and
    returned. On NumPy the chain runs in two reused buffers, elsewhere in fresh ones."""
    xp = get_xp(x)
    reused = xp is np
    u = xp.multiply(x, x, out=_reused("gelu_u", x.shape) if reused else None)                   # x²
    chain = xp.multiply(u, _GELU_NEG_LOGIT[-1], out=_reused("gelu_chain", x.shape) if reused else None)
    for c in _GELU_NEG_LOGIT[-2:0:-1]:                            # Horner's rule, from the top coefficient down
        chain += c
        chain *= u
    chain += _GELU_NEG_LOGIT[0]                                   # −P(x²)
    chain *= x                                                    # −L(x)
    with np.errstate(over="ignore"):                              # far left: exp(−L) = inf, x / inf = −0
        xp.exp(chain, out=chain)
    chain += 1.0
    return xp.divide(x, chain, out=out)


def quick_gelu(x):
    """Replaces :func:`layers.quick_gelu`: the same operations (so the same numbers) in one buffer, where the
    textbook expression makes three temporaries the size of x (on this VM fresh memory is costly, see
    :func:`_reused`), and on NumPy the elements shared among the threads where that was measured faster
    (:func:`over_parts`).
    x [...] -> [...]."""
    xp = get_xp(x)
    if xp is not np or x.size < PARALLEL_MIN_ELEMENTS or not x.flags.c_contiguous:
        return _quick_gelu_into(x, xp.empty_like(x, dtype=xp.float32))   # in x's memory order
    src = x.reshape(-1)                 # [...] -> [n], a view
    out = np.empty(src.shape, np.float32)
    over_parts(lambda a, b: _quick_gelu_into(src[a:b], out[a:b]), src.size, src.size, "quick_gelu")
    return out.reshape(x.shape)         # [n] -> [...]


def _quick_gelu_into(x, out):
    """x / (1 + exp(-1.702 x)) written into ``out`` (float32, x's shape) and returned. ``out`` may be x itself (on
    NumPy: the chain then goes through a reused buffer)."""
    xp = get_xp(x)
    in_place = xp is np and np.may_share_memory(x, out)
    d = xp.multiply(x, -1.702, out=_reused("quick_gelu", x.shape) if in_place else out)
    xp.exp(d, out=d)
    d += 1.0
    return xp.divide(x, d, out=out)


ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu}
_ACTIVATIONS_INTO = {"gelu": _gelu_logistic_into, "quick_gelu": _quick_gelu_into}   # fn(x, out), out may be x


def _in_cache_sized_blocks(fn_into, x, out=None):
    """An element-wise function applied ELEMENTWISE_BLOCK elements at a time (NumPy only): ``fn_into(block,
    out_block)`` writes the function of each block of x into the same block of ``out`` (fresh when None).

    Over a block of half the L2 every pass stays in the CPU cache, and the temporaries are block-sized and
    reused (:func:`_reused`); where measured faster, the blocks are shared among the threads (:func:`over_parts`),
    each core working in its own L2. The result has x's memory order (row-major for a row-major x). ``out=x``
    applies the function in place, for an ``fn_into`` that allows it.
    """
    if out is None:
        out = np.empty_like(x, dtype=np.float32)    # the same memory order as x (row- or column-major)
    src = x.ravel(order="K")                # x's elements in memory order (a view when x is contiguous)
    dst = out.ravel(order="K")              # a view: out is contiguous in that same order

    def blocks(first: int, stop: int) -> None:      # blocks first … stop − 1; the threads share them out
        for i in range(first * ELEMENTWISE_BLOCK, min(src.size, stop * ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK):
            fn_into(src[i:i + ELEMENTWISE_BLOCK], dst[i:i + ELEMENTWISE_BLOCK])

    kind = "blocks of " + fn_into.__name__.strip("_").removesuffix("_into")     # e.g. "blocks of quick_gelu"
    over_parts(blocks, -(-src.size // ELEMENTWISE_BLOCK), src.size, kind)
    return out


# --------------------------------------------------------------------------------------------------------------
# The MLP, its hidden activation kept transposed

def feed_forward(x, fc1, fc2, activation: str, inner_norm=None, eps: float = 1e-5):
    """Replaces :func:`layers.feed_forward` (fc2(act(fc1(x))), LayerNorm between when ``inner_norm``): with more
    than one row (and more than :func:`linear` takes one per row), the hidden activation stays transposed from
    fc1 to fc2.

    fc1's weight-first product comes out [F, M] (:func:`_matmul_weight_first`); :func:`linear` would write it
    into a fresh row-major [M, F] array, only for fc2 to read it transposed again. The activation and the inner
    LayerNorm need no particular layout, so here fc1's product stays in a reused buffer, [F, M], the activation
    and LayerNorm run on it in place (:func:`_layer_norm_columns`: its features run down the columns), and fc2
    reads it as it is (:func:`product_from_columns`). No [M, F] array is written or allocated. The same products
    and the same activation (bit for bit), the LayerNorm's float64 sums in another order. Measured on the
    development machine (AMD EPYC, 2 vCPUs, OpenBLAS Haswell): CLIP's [1, 257, 1024] MLP 43-46 -> 40-42 ms,
    the decoder's 71-token [1, 71, 2048] FFN 81-88 -> 78 ms; whole steps at full size, with the attention
    change beside it (benchmarks/code_ab.py, 4 rounds of 3): image encoding 2.70 -> 2.29 s (0.85x), time to
    first token 5.69 -> 5.29 s (0.93x). That is the weight-first form of the whole MLP: where OpenBLAS's kernel
    takes x first faster (:func:`product_form`; on AVX-512's SkylakeX kernel, for the vision tower's 257 rows),
    the first calls of each shape time it against the textbook composition of the fast primitives, whose products
    choose their own form, and the faster is kept. Otherwise (one row, the few rows :func:`linear` takes one per
    row, 2-byte weights on NumPy): that composition. On other namespaces (CuPy) the transposed form, without the
    reused buffer and the blocks. x [..., C] -> [..., C], row-major.
    """
    xp = get_xp(x)
    C = x.shape[-1]
    rows = x.size // C if C else 0
    w1, w2 = fc1["weight"], fc2["weight"]
    two_byte = w1.dtype != np.float32 or w2.dtype != np.float32    # NumPy widens those block by block in linear

    def in_rows(x):         # the textbook composition of the fast primitives, the hidden activation [..., F]
        h = ACTIVATIONS[activation](linear(x, **fc1))          # [..., F]
        if inner_norm is not None:
            h = layer_norm(h, **inner_norm, eps=eps)
        return linear(h, **fc2)                                 # [..., C]

    if rows <= 1 or _per_row_here(xp, rows) or (two_byte and xp is np):
        return in_rows(x)
    if xp is not np:
        return _feed_forward_in_columns(x, fc1, fc2, activation, inner_norm, eps)

    def mlp(x):             # in the form kept (or being measured) for its shape
        key = _form_key("mlp", x.size // C, C, w1.shape[0])
        return _in_measured_form(key, lambda: _feed_forward_in_columns(x, fc1, fc2, activation, inner_norm, eps),
                                 lambda: in_rows(x))

    return _in_padded_rows("mlp", x, w2.shape[0], mlp, inner=w1.shape[0])


def _feed_forward_in_columns(x, fc1, fc2, activation: str, inner_norm, eps: float):
    """:func:`feed_forward` with the hidden activation transposed, [F, M], from fc1's product to fc2's: the
    weight-first form of the whole MLP. x [..., C] -> [..., C], row-major."""
    xp = get_xp(x)
    C = x.shape[-1]
    w1, w2 = fc1["weight"], fc2["weight"]
    ht = product_to_columns(x.reshape(-1, C), as_float32(w1), fc1.get("bias"))   # [M, C] -> [F, M]
    if xp is np:
        _in_cache_sized_blocks(_ACTIVATIONS_INTO[activation], ht, out=ht)
    else:                                                       # the same operations on the whole array
        ht = ACTIVATIONS[activation](ht)
    if inner_norm is not None:
        _layer_norm_columns(ht, inner_norm["weight"], inner_norm["bias"], eps)
    y = product_from_columns(ht, as_float32(w2), fc2.get("bias"))           # [F, M] -> [M, C]
    return y.reshape(x.shape[:-1] + (w2.shape[0],))                         # [M, C] -> [..., C]


def _layer_norm_columns(h, weight, bias, eps: float):
    """LayerNorm of each column of h [F, M] (M rows of F features, transposed), in place, weight, bias [F]. Both
    moments in float64: unlike :func:`layer_norm`'s float32 variance (a dot product along each row), a float32
    einsum down the columns adds its 8192 terms one after another and was 2.4e-5 off (~1.5 ulp of the output).
    Where Numba is installed, a row-major float32 h goes to :func:`fused.layer_norm_columns`, the same float64
    moments in one compiled call: [8192, 71] 1.25 -> 0.185 ms (AMD EPYC Zen 4, medians of 60)."""
    xp = get_xp(h)
    if xp is np and h.dtype == np.float32 and h.flags.c_contiguous and fused.available():
        fused.layer_norm_columns(h, np.ascontiguousarray(weight), np.ascontiguousarray(bias), eps)
        return h
    n = h.shape[0]
    mean = (h.sum(axis=0, dtype=xp.float64) / n).astype(xp.float32)      # [M]
    h -= mean                                                             # [F, M] - [M]
    var = xp.einsum("fm,fm->m", h, h, dtype=xp.float64) / n               # [M], no [F, M] temporary
    h *= (1.0 / xp.sqrt(var + eps)).astype(xp.float32)
    h *= weight[:, None]                                                  # [F, M] * [F, 1]
    h += bias[:, None]                                                    # [F, M] + [F, 1]
    return h


# --------------------------------------------------------------------------------------------------------------
# Attention

def softmax_in_place(e, axis: int = -1):
    """:func:`layers.softmax` of ``e`` written over ``e`` itself (a fresh array of the caller's): no temporaries
    the size of e. The same numbers as the textbook form."""
    xp = get_xp(e)
    e -= e.max(axis=axis, keepdims=True)
    xp.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


# float32 bytes of scores formed at once when the probabilities are not returned: an L2 of them, at least 1 MiB
# and at most 8 (derived_blocks). A block of scores is written by one product, then read by the max, the exp, the
# sum and the product with v: held in the L2, those four passes do not go out to L3 or memory. Measured on an AMD
# EPYC (Zen 3, 512 KiB L2 per core, OpenBLAS Haswell; per layer, the old and the new code in turns, four runs):
# the causal 1024-token prefill's [1, 32, 1024, 64] in 1 MiB blocks (one head, 256 query rows at a time) took
# 0.94-1.02 of the time of the 8 MiB blocks taken before (all heads, 64 rows); 512 KiB 0.97-0.99, 2 MiB
# 1.04-1.09, 4 MiB (a whole head a block, no keys left out) 1.38-1.39; at 256 tokens 0.90-0.95. The vision
# tower's [1, 16, 257, 64] (4.2 MB of scores) in groups of 3 whole heads and the 71-token prompt 0.99-1.00: in
# blocks of query rows within a head the vision tower was slower (1.16-1.76, an earlier version of this change),
# hence whole heads first and rows only where one head does not fit. Memory: 1 MiB of scores at once, not 8.
# ``KOSMOS2_ATTENTION_BLOCK`` (bytes, K/M suffixes) sets the size instead.
ATTENTION_BLOCK_BYTES = _DERIVED["attention_block"]
ATTENTION_BLOCK_ENV = "KOSMOS2_ATTENTION_BLOCK"


def attention_block_bytes() -> int:
    """The float32 bytes of scores per attention block: ``KOSMOS2_ATTENTION_BLOCK`` when set, else
    ATTENTION_BLOCK_BYTES."""
    sizes = _byte_sizes_setting(ATTENTION_BLOCK_ENV, 1, "a size in bytes of at least 1K, e.g. '1M'")
    return ATTENTION_BLOCK_BYTES if sizes is None else sizes[0]


def attention_blocks(B: int, H: int, T: int, S: int, budget: int, causal: bool = False) -> tuple[int, int]:
    """(heads, rows) per block of attention for T queries of H heads against S keys, batch B, so that a block's
    float32 scores [B, heads, rows, S] stay within ``budget`` bytes where they can: everything when it fits;
    else groups of whole heads, when one head fits and the mask is not causal (every query then sees every key,
    and blocks of rows would only cut the products smaller); else one head at a time, its rows in as few blocks
    as the budget allows, all of one size but the last (in a causal prompt each block leaves out the keys after
    its last query, :func:`_keys_needed`)."""
    head = 4 * B * T * S                      # bytes of one head's scores
    if head * H <= budget:
        return H, T
    if not causal and head <= budget:
        return budget // head, T
    most = max(1, budget // (4 * B * S))      # the most rows of one head within the budget
    blocks = -(-T // most)
    return 1, -(-T // blocks)


def attention(q, k, v, mask=None, scale: float | None = None, need_probs: bool = True):
    """Replaces :func:`layers.attention` (same arguments and results): in-place scores and softmax, and with
    ``need_probs=False`` (probabilities returned as None) the heads and queries in blocks whose scores fit
    :func:`attention_block_bytes` (:func:`attention_blocks`).

    A 1024-token prompt would otherwise build 128 MB of scores per layer, and touching that much fresh memory
    costs more than the arithmetic. On NumPy a block of query rows also leaves out the trailing keys none of its
    queries can see (:func:`_keys_needed`), up to half of them in a causal prompt. Each query row's softmax is
    the same either way; the measured blocks are beside ATTENTION_BLOCK_BYTES.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if need_probs:
        return _attention_block(q, k, v, mask, scale, True)
    B, H, T, D = q.shape
    S = k.shape[-2]
    causal = mask is not None and mask.shape[-2] > 1     # a mask per query row (else one row for all)
    heads, rows = attention_blocks(B, H, T, S, attention_block_bytes(), causal)
    if heads >= H and rows >= T:
        return _attention_block(q, k, v, mask, scale, False)
    xp = get_xp(q)
    out = xp.empty((B, H, T, D), dtype=xp.float32)
    for t in range(0, T, rows):
        m = mask if mask is None or mask.shape[-2] == 1 else mask[..., t:t + rows, :]
        stop = _keys_needed(m, S) if xp is np and rows < T else S   # NumPy only: the check reads the mask on the host
        m = None if m is None else m[..., :stop]
        for h in range(0, H, heads):
            mh = m if m is None or m.shape[1] == 1 else m[:, h:h + heads]
            _attention_block(q[:, h:h + heads, t:t + rows], k[:, h:h + heads, :stop], v[:, h:h + heads, :stop],
                             mh, scale, False, out=out[:, h:h + heads, t:t + rows])
    return out, None


def _keys_needed(mask, S: int) -> int:
    """How many leading keys a block of queries needs: one past the last key that any query of the block sees.

    In a causal prefill the block of queries t … t+n−1 sees only keys up to past + t + n − 1: the keys after it
    are hidden from every query of the block, their probabilities are exactly 0, and leaving them out changes no
    result while skipping up to half the work of a long prompt. "Hidden" means a mask value ≤ float32 min (what
    masks here hold for a dropped key); "seen" means a value above half of it, so that a hidden key's exp is 0
    beside any seen one. Only when every query of the block sees some key: a query that sees none (a pad row)
    spreads its probability over hidden keys, all of which then count.
    """
    if mask is None or mask.shape[-1] != S:
        return S
    seen = mask > NEG_INF_F32 / 2                         # [B or 1, 1, rows or 1, S]
    if not seen.any(axis=-1).all():
        return S
    cols = np.flatnonzero(seen.any(axis=tuple(range(seen.ndim - 1))))
    return int(cols[-1]) + 1


def _attention_block(q, k, v, mask, scale: float, need_probs: bool = True, out=None):
    """softmax(q kᵀ · scale + mask) v for one block of queries -> (output, probabilities or None); without
    probabilities the output goes into ``out`` when given (a [B, heads, rows, D] view of the caller's array).

    With probabilities: the scores are a fresh array, scaled, masked and turned into probabilities in place.
    Without them, three passes over the [T, S] scores fewer, each replaced by one over a [T, D] array (D = 64
    against S = 257 keys in the vision tower): the scale multiplies q before the product (for a power of two,
    as 1/√64 is, the very same scores); on NumPy the scores go into a reused buffer; and the
    softmax's division waits until after the product with v: (e v) / Σe instead of (e / Σe) v, each output
    row divided once, the same numbers up to float32 rounding (7.8e-7 of the largest output on CLIP's
    [1, 16, 257, 64]). Measured there, in turns with the form with probabilities (AMD EPYC, 2 vCPUs, two runs of
    40): 9.65 -> 9.21 and 9.28 -> 8.88 ms, 4 %. Splitting its max-exp-sum among the threads by heads gained
    another 7 % there (12.0 -> 11.2 ms), too little on that VM to add a hand-off per block.
    """
    if need_probs:
        scores = q @ k.swapaxes(-1, -2)     # [B, H, T, D] @ [B, H, D, S] -> [B, H, T, S], a fresh array
        scores *= scale
        if mask is not None:
            scores += mask
        probs = softmax_in_place(scores)    # [B, H, T, S]
        return probs @ v, probs             # [B, H, T, S] @ [B, H, S, D] -> [B, H, T, D]
    xp = get_xp(q)
    B, H, T, _ = q.shape
    if xp is np:
        scores = np.matmul(q * scale, k.swapaxes(-1, -2),                # [B, H, T, D] @ [B, H, D, S]
                           out=_reused("scores", (B, H, T, k.shape[-2])))  # -> [B, H, T, S], reused memory
    else:
        scores = (q * scale) @ k.swapaxes(-1, -2)    # [B, H, T, D] @ [B, H, D, S] -> [B, H, T, S]
    if mask is not None:
        scores += mask
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)              # e = exp(s - max s), [B, H, T, S]
    total = scores.sum(axis=-1, keepdims=True)      # Σe [B, H, T, 1]
    if out is None:
        out = scores @ v                    # [B, H, T, S] @ [B, H, S, D] -> [B, H, T, D]
    elif xp is np:
        np.matmul(scores, v, out=out)       # [B, H, T, S] @ [B, H, S, D] -> [B, H, T, D], into the caller's view
    else:
        out[...] = scores @ v               # [B, H, T, S] @ [B, H, S, D] -> [B, H, T, D]
    out /= total
    return out, None
