"""A widen-and-multiply for 2-byte weights in one pass, compiled by Numba when it is installed (optional).

NumPy multiplies float32 by float32 only, so :func:`kosmos2_ref.fast.linear_upcast_blocks` widens float16 and
bfloat16 weights a cache-sized block at a time into float32 scratch and hands each block to the BLAS. Decoding a
token reads each weight from memory (2 bytes), writes it widened (4) and reads it back (4): a bfloat16 token took
1.8-2.7 x a float32 one on the processors measured (benchmarks/NOTES.md), where it has half the bytes to read.
The kernels here widen each weight in a register as they multiply it, so a weight is read once, 2 bytes, and
nothing is written but the outputs.

* bfloat16 (held as uint16 bits, :mod:`kosmos2_ref.storage`) is the top half of a float32: ``bits << 16``,
  reinterpreted.
* float16 is converted by the processor's own instruction (F16C's ``vcvtph2ps`` on x86): exact for every value,
  inf, NaN and subnormals included.

Each output is a dot product of one weight row with one row of x, summed in float32 in the order the compiler
vectorises it (several partial sums, then added): the numbers differ from the BLAS's by summation order only, as
the BLAS's differ from one another. Only for a few rows of x (decoding): each weight row is widened once per row
of x, so the arithmetic grows with the rows, where the BLAS's blocked product does not.

Installed with ``pip install "kosmos2-ref[numba]"``. The first product of each kind compiles its kernel (about a
second; Numba caches it on disk for later processes). ``KOSMOS2_FUSED=off`` keeps the blocked widening even with
Numba installed, the form before these kernels. :func:`kosmos2_ref.fast.linear` chooses; this module only
multiplies.
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np

FUSED_ENV = "KOSMOS2_FUSED"  # "off": widen in blocks (fast.linear_upcast_blocks) even where Numba is installed
_lock = threading.Lock()
_kernels: dict | None = None  # None until first use; then {} when Numba is missing, else dtype -> kernel
_missing = ""  # why the kernels are unavailable (Numba's import error), once looked up


def setting() -> str | None:
    """``KOSMOS2_FUSED`` when set ("off" or "on"), None when unset or blank; a ValueError otherwise."""
    text = os.environ.get(FUSED_ENV, "").strip().lower()
    if not text:
        return None
    if text not in ("off", "on"):
        raise ValueError(
            f"{FUSED_ENV} must be 'off' (widen 2-byte weights in blocks) or 'on' (the fused kernels, "
            f"which need Numba), got {text!r}"
        )
    return text


def available() -> bool:
    """Whether the fused kernels are used: Numba importable and ``KOSMOS2_FUSED`` not "off". With the setting
    "on" and no kernels, an ImportError that says why and how to install Numba."""
    wanted = setting()
    if wanted == "off":
        return False
    found = bool(_compiled())
    if wanted == "on" and not found:
        raise ImportError(
            f"{FUSED_ENV}=on, but the fused kernels are unavailable ({_missing}): they need Numba, "
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
    kernels[w.dtype.type](x, w.view(np.uint16), y, start, stop)  # float16 goes in as its bits


def _compiled() -> dict:
    """The kernels, built and checked at the first call; {} (and ``_missing`` saying why) when Numba is missing
    or its kernels failed to compile or to compute a known product, so that the blocked widening takes over."""
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
                        f"kosmos2_ref.fused: {_missing}; 2-byte weights are widened in blocks instead",
                        RuntimeWarning,
                        stacklevel=2,
                    )
    return _kernels


def _checked(kernels: dict) -> dict:
    """Each kernel compiled (or loaded from Numba's cache) and run on a small product whose answer is exact:
    two weight rows, all 1.5 and all −2 (exact in both formats), against two rows of x holding 1 … 10. A
    RuntimeError if a kernel's answer is off."""
    x = np.arange(1, 11, dtype=np.float32).reshape(2, 5)  # [2, 5]
    values = np.array([[1.5] * 5, [-2.0] * 5], dtype=np.float32)  # [2 rows of w, 5]
    for dtype, kernel in kernels.items():
        bits = (values.view(np.uint32) >> 16).astype(np.uint16) if dtype is np.uint16 else values.astype(np.float16)
        y = np.zeros((2, 2), dtype=np.float32)
        kernel(x, bits.view(np.uint16), y, 0, 2)
        if not np.array_equal(y, x @ values.T):
            raise RuntimeError(
                f"the {np.dtype(dtype).name} kernel computed {y.tolist()}, not {(x @ values.T).tolist()}"
            )
    return kernels


def _build() -> dict:
    """The kernels for bfloat16 bits (uint16) and float16, each compiled at its first call."""
    import numba
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

    # reassoc lets the compiler keep several partial sums (the vectorised loop), contract lets it fuse the
    # multiply-add; no flag that assumes away inf or NaN, so those propagate as in any float32 product.
    flags = {"reassoc", "contract"}

    def kernel(widen):
        @numba.njit(nogil=True, fastmath=flags, cache=True, boundscheck=False)
        def product(x, w, y, start, stop):  # x [M, K], w [N, K] uint16, y [M, N]: y[:, start:stop]
            M, K = x.shape
            for n in range(start, stop):
                for m in range(M):
                    total = np.float32(0.0)
                    for k in range(K):
                        total += widen(w[n, k]) * x[m, k]
                    y[m, n] = total

        return product

    return {np.uint16: kernel(bfloat16_to_float32), np.float16: kernel(float16_to_float32)}
