"""Loops compiled by Numba where it is installed (optional): a widen-and-multiply for 2-byte weights in one
pass, and LayerNorm in one call.

**2-byte products.** NumPy multiplies float32 by float32 only, so :func:`kosmos2_ref.fast.linear_upcast_blocks`
widens float16 and bfloat16 weights a cache-sized block at a time into float32 scratch and hands each block to the
BLAS. Decoding a token reads each weight from memory (2 bytes), writes it widened (4) and reads it back (4): a
bfloat16 token took 1.8-2.7 x a float32 one on the processors measured (benchmarks/NOTES.md), where it has half
the bytes to read. :func:`matvec_2byte` widens each weight in a register as it multiplies it, so a weight is read
once, 2 bytes, and nothing is written but the outputs.

* bfloat16 (held as uint16 bits, :mod:`kosmos2_ref.storage`) is the top half of a float32: ``bits << 16``,
  reinterpreted.
* float16 is converted by the processor's own instruction (F16C's ``vcvtph2ps`` on x86): exact for every value,
  inf, NaN and subnormals included.

Each output is a dot product of one weight row with one row of x, summed in float32 in the order the compiler
vectorises it (several partial sums, then added): the numbers differ from the BLAS's by summation order only, as
the BLAS's differ from one another. Only for a few rows of x (decoding): each weight row is widened once per row
of x, so the arithmetic grows with the rows, where the BLAS's blocked product does not.

**LayerNorm.** NumPy takes a LayerNorm in six or seven passes, each a call with its own overhead and its own trip
through the array: the sum, the centring, the variance, the scaling, the weight, the bias. :func:`layer_norm_rows`
(rows of features, as the model holds them) and :func:`layer_norm_columns` (the MLP's transposed hidden
activation, features down the columns) go through each row three times in one call: the mean and the variance
summed in float64 (more exact than :func:`kosmos2_ref.fast.layer_norm`'s float32 variance), then the output.

Installed with ``pip install "kosmos2-ref[numba]"``. The first call of each kernel compiles it (about a second;
Numba caches it on disk for later processes). ``KOSMOS2_FUSED=off`` keeps NumPy's forms even with Numba
installed, the forms before these kernels. :mod:`kosmos2_ref.fast` chooses; this module only computes.
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np

FUSED_ENV = "KOSMOS2_FUSED"  # "off": NumPy's forms (fast.linear_upcast_blocks, ...) even where Numba is installed
_lock = threading.Lock()
_kernels: dict | None = None  # None until first use; then {} when Numba is missing, else name -> kernel
_missing = ""  # why the kernels are unavailable (Numba's import error), once looked up


def setting() -> str | None:
    """``KOSMOS2_FUSED`` when set ("off" or "on"), None when unset or blank; a ValueError otherwise."""
    text = os.environ.get(FUSED_ENV, "").strip().lower()
    if not text:
        return None
    if text not in ("off", "on"):
        raise ValueError(
            f"{FUSED_ENV} must be 'off' (NumPy's forms) or 'on' (the compiled kernels, which need Numba), got {text!r}"
        )
    return text


def available() -> bool:
    """Whether the compiled kernels are used: Numba importable and ``KOSMOS2_FUSED`` not "off". With the setting
    "on" and no kernels, an ImportError that says why and how to install Numba."""
    wanted = setting()
    if wanted == "off":
        return False
    found = bool(_compiled())
    if wanted == "on" and not found:
        raise ImportError(
            f"{FUSED_ENV}=on, but the compiled kernels are unavailable ({_missing}): they need Numba, "
            "pip install 'kosmos2-ref[numba]'"
        )
    return found


def how() -> str:
    """One line for the benchmark's report: which form the 2-byte products take, and why."""
    wanted = setting()
    if wanted == "off":
        return f"widened in blocks ({FUSED_ENV}=off)"
    return "fused (Numba)" if _compiled() else f"widened in blocks ({_missing})"


def matvec_2byte(x, w, y, start: int, stop: int) -> None:
    """y[:, start:stop] = x @ float32(w[start:stop]).T in one pass over those rows of w.

    x [M, K] float32, C-contiguous; w [N, K] float16, or uint16 holding bfloat16 bits, C-contiguous; y [M, N]
    float32, C-contiguous, written in its columns start … stop − 1 only (so threads may share y by columns).
    The GIL is released while it runs.
    """
    kernels = _compiled()
    name = "float16" if w.dtype == np.float16 else "bfloat16"
    kernels[name](x, w.view(np.uint16), y, start, stop)  # float16 goes in as its bits


def layer_norm_rows(x, weight, bias, eps: float, out, start: int, stop: int) -> None:
    """LayerNorm of rows start … stop − 1 of x [R, C] (float32, C-contiguous) into the same rows of ``out``
    [R, C]; weight, bias [C] float32. Per row: mean = Σx / C and var = Σ(x − mean)² / C summed in float64 (the
    mean rounded to float32 before centring, as :func:`kosmos2_ref.fast.layer_norm` does, so a constant row
    centres to exactly 0), then ((x − mean) · s) · weight + bias in float32, s = 1/√(var + eps) formed in
    float64. The GIL is released while it runs."""
    _compiled()["layer_norm_rows"](x, weight, bias, float(eps), out, start, stop)


def layer_norm_columns(h, weight, bias, eps: float) -> None:
    """LayerNorm of each column of h [F, M] (float32, C-contiguous: M rows of F features, transposed), in
    place; weight, bias [F] float32. The same arithmetic as :func:`layer_norm_rows`, down the columns."""
    _compiled()["layer_norm_columns"](h, weight, bias, float(eps))


def _compiled() -> dict:
    """The kernels, built and checked at the first call; {} (and ``_missing`` saying why) when Numba is missing
    or its kernels failed to compile or to compute a known answer, so that NumPy's forms take over."""
    global _kernels, _missing
    if _kernels is None:
        with _lock:
            if _kernels is None:
                try:
                    _kernels = _checked(_build())
                except ImportError as error:
                    _missing, _kernels = f"no Numba: {error}", {}
                except Exception as error:  # noqa: BLE001 - a compiler's failure of any kind: fall back, say why
                    _missing, _kernels = f"Numba's kernels failed: {type(error).__name__}: {error}", {}
                    warnings.warn(
                        f"kosmos2_ref.fused: {_missing}; NumPy's forms are used instead",
                        RuntimeWarning,
                        stacklevel=2,
                    )
    return _kernels


def _checked(kernels: dict) -> dict:
    """Each kernel compiled (or loaded from Numba's cache) and run on a small case whose answer is known: for the
    products, two weight rows, all 1.5 and all −2 (exact in both formats), against two rows of x holding 1 … 10,
    exactly; for LayerNorm, rows 1 … 4 (and columns 1 … 4) against float64, to 1e-6. A RuntimeError if one is
    off."""
    x = np.arange(1, 11, dtype=np.float32).reshape(2, 5)  # [2, 5]
    values = np.array([[1.5] * 5, [-2.0] * 5], dtype=np.float32)  # [2 rows of w, 5]
    for name in ("bfloat16", "float16"):
        bits = (values.view(np.uint32) >> 16).astype(np.uint16) if name == "bfloat16" else values.astype(np.float16)
        y = np.zeros((2, 2), dtype=np.float32)
        kernels[name](x, bits.view(np.uint16), y, 0, 2)
        if not np.array_equal(y, x @ values.T):
            raise RuntimeError(f"the {name} kernel computed {y.tolist()}, not {(x @ values.T).tolist()}")
    rows = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)  # [1, 4]
    ones, zeros = np.ones(4, dtype=np.float32), np.zeros(4, dtype=np.float32)
    want = (np.arange(1.0, 5.0) - 2.5) / np.sqrt(1.25 + 1e-5)  # float64
    got = np.empty_like(rows)
    kernels["layer_norm_rows"](rows, ones, zeros, 1e-5, got, 0, 1)
    columns = np.ascontiguousarray(rows.T)  # [4, 1]
    kernels["layer_norm_columns"](columns, ones, zeros, 1e-5)
    for name, result in (("layer_norm_rows", got[0]), ("layer_norm_columns", columns[:, 0])):
        if not np.allclose(result, want, rtol=0, atol=1e-6):
            raise RuntimeError(f"the {name} kernel computed {result.tolist()}, not {want.tolist()}")
    return kernels


# reassoc lets the compiler keep several partial sums (the vectorised loops), contract lets it fuse a multiply and
# an add; no flag that assumes away inf or NaN, so those propagate as in NumPy.
FLAGS = {"reassoc", "contract"}


def _build() -> dict:
    """The kernels by name: the products for bfloat16 bits (uint16) and float16, and the two LayerNorms; each
    compiled at its first call. An ImportError where Numba is missing."""
    import numba  # noqa: F401 - first, so that a missing Numba is what the error names (not llvmlite)

    bfloat16_to_float32, float16_to_float32 = _widenings()
    return {
        "bfloat16": _product(bfloat16_to_float32),
        "float16": _product(float16_to_float32),
        **_layer_norms(),
    }


def _widenings():
    """Two compiled conversions of a weight's uint16 bits to float32, for use inside kernels."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def bfloat16_to_float32(typingctx, bits):  # uint16 bits -> float32: the bits as a float32's top half
        def codegen(context, builder, signature, args):
            word = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(word, ir.FloatType())

        return types.float32(types.uint16), codegen

    @intrinsic
    def float16_to_float32(typingctx, bits):  # uint16 bits of a float16 -> float32: the processor's own
        def codegen(context, builder, signature, args):  # conversion (Numba has no float16 arrays on the CPU)
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(types.uint16), codegen

    return bfloat16_to_float32, float16_to_float32


def _product(widen):
    """The few-row product over 2-byte weights whose bits ``widen`` turns into float32 (see matvec_2byte)."""
    import numba

    @numba.njit(nogil=True, fastmath=FLAGS, cache=True, boundscheck=False)
    def product(x, w, y, start, stop):  # x [M, K], w [N, K] uint16, y [M, N]: y[:, start:stop]
        M, K = x.shape
        for n in range(start, stop):
            for m in range(M):
                total = np.float32(0.0)
                for k in range(K):
                    total += widen(w[n, k]) * x[m, k]
                y[m, n] = total

    return product


def _layer_norms() -> dict:
    """LayerNorm along the rows and down the columns (see layer_norm_rows and layer_norm_columns)."""
    import numba

    @numba.njit(nogil=True, fastmath=FLAGS, cache=True, boundscheck=False)
    def layer_norm_rows(x, weight, bias, eps, out, start, stop):  # x, out [R, C]; weight, bias [C]
        C = x.shape[1]
        for r in range(start, stop):
            total = 0.0
            for c in range(C):
                total += np.float64(x[r, c])
            mean = np.float32(total / C)
            squares = 0.0
            for c in range(C):
                d = np.float64(x[r, c] - mean)
                squares += d * d
            scale = np.float32(1.0 / np.sqrt(squares / C + eps))
            for c in range(C):
                out[r, c] = ((x[r, c] - mean) * scale) * weight[c] + bias[c]

    @numba.njit(nogil=True, fastmath=FLAGS, cache=True, boundscheck=False)
    def layer_norm_columns(h, weight, bias, eps):  # h [F, M] in place; weight, bias [F]
        F, M = h.shape
        totals = np.zeros(M, dtype=np.float64)
        for f in range(F):  # row by row of h, so that the inner loops run along contiguous memory
            for m in range(M):
                totals[m] += np.float64(h[f, m])
        means = (totals / F).astype(np.float32)  # [M]
        squares = np.zeros(M, dtype=np.float64)
        for f in range(F):
            for m in range(M):
                d = np.float64(h[f, m] - means[m])
                squares[m] += d * d
        scales = (1.0 / np.sqrt(squares / F + eps)).astype(np.float32)  # [M]
        for f in range(F):
            for m in range(M):
                h[f, m] = ((h[f, m] - means[m]) * scales[m]) * weight[f] + bias[f]

    return {"layer_norm_rows": layer_norm_rows, "layer_norm_columns": layer_norm_columns}
