"""The primitives every stage is built from: linear, layer_norm, gelu, quick_gelu, softmax, attention.

Functions of arrays and parameters only; they know no model. The array namespace comes from the input
(``get_xp``), so the same code runs on NumPy and CuPy. Everything computes in float32.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

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
    With more than one row in x the product is taken as ``(W @ xᵀ)ᵀ`` (:func:`_matmul_weight_first`, faster in
    OpenBLAS). A 2-byte weight (float16/bfloat16 storage) on NumPy goes through :func:`linear_upcast_blocks`, which widens it
    a cache-sized block at a time; the textbook form ``x @ as_float32(weight).T`` is what it computes.
    """
    if weight.dtype != np.float32 and get_xp(x) is np and weight.size > UPCAST_MIN_SIZE:
        y = linear_upcast_blocks(x, weight)
    elif x.size > x.shape[-1]:              # more than one row
        y = _matmul_weight_first(x, as_float32(weight))
    else:
        y = x @ as_float32(weight).T        # [..., in] @ [in, out] -> [..., out]
    if bias is not None:
        y += bias                           # in place: y is a fresh array
    return y


def _matmul_weight_first(x, w):
    """x @ w.T computed as (w @ xᵀ)ᵀ: the same product, a different call into BLAS (so the float32 roundings of
    the sums may differ in the last bit; both are the product to float32 accuracy).

    With more than one row in x, this OpenBLAS runs the product with the weight as the left operand 10-30 %
    faster (it tiles the long weight dimension better). The result [N, M] is handed back as its transpose, a free
    view [M, N] in column-major order. Element-wise ops and float64-accumulated reductions (LayerNorm) do not
    care; a long float32 sum does (along a strided axis NumPy adds one term at a time instead of pairwise), so the
    LM head makes its logits row-major and ``connector.l2_normalize`` sums in float64.
    x [..., K], w [N, K] -> [..., N].
    """
    K = x.shape[-1]
    x2 = x.reshape(-1, K)                      # [M, K] (a view when x is contiguous either way)
    y = (w @ x2.T).T                           # [N, K] @ [K, M] -> [N, M], seen as [M, N]
    return y.reshape(x.shape[:-1] + (w.shape[0],))


# --------------------------------------------------------------------------------------------------------------
# 2-byte weights: widen block by block, never the whole matrix
#
# ``x @ as_float32(W).T`` on a 2-byte W first writes a float32 copy of all of W (for the LM head 65037 x 2048,
# 533 MB) to memory and then reads it back: three times the bytes of the float32 product, plus a large allocation
# per call. Instead the rows of W are widened a block at a time into a small scratch buffer that stays in the CPU
# cache, and each block's product is taken from there while it is hot. DRAM then sees only the 2-byte weights.
# With few rows in x (decoding) the product of a block is cheap and the widening dominates, so the blocks are
# spread over a few threads (NumPy's ufuncs and BLAS release the GIL); with many rows (prefill, vision) the
# blocks are larger and BLAS's own threads do the product.

UPCAST_MIN_SIZE = 1 << 16                 # smaller matrices are simply widened whole
UPCAST_BLOCK_BYTES = 1 << 20              # float32 bytes per block when x has few rows: ~half a core's 2 MiB L2
UPCAST_BLOCK_BYTES_MANY_ROWS = 8 << 20    # float32 bytes per block when x has many rows (GEMM likes wide blocks)
UPCAST_FEW_ROWS = 8                       # x with at most this many rows counts as "few" (decoding)
UPCAST_THREADS = max(1, min(os.cpu_count() or 1, 4))

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_local = threading.local()


def widen_into(src, dst):
    """2-byte weight rows -> float32, written into ``dst`` (a float32 array of the same shape).

    bfloat16 (uint16 bits) is the top half of a float32: copy the bits into a uint32 and shift them up, two
    vectorised passes over cached memory. float16 is cast by NumPy.
    """
    if src.dtype == np.uint16:
        bits = dst.view(np.uint32)
        np.copyto(bits, src)              # zero-extends 16 -> 32 bits
        bits <<= 16
    else:
        np.copyto(dst, src)


def _scratch(rows: int, cols: int):
    """This thread's reusable float32 buffer of shape [rows, cols] (no page faults from a fresh allocation)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < rows * cols:
        buf = _local.buf = np.empty(rows * cols, dtype=np.float32)
    return buf[:rows * cols].reshape(rows, cols)


def _upcast_rows(x2, w, y, start: int, stop: int, block_rows: int):
    """y[:, start:stop] = x2 @ float32(w[start:stop]).T, widening ``block_rows`` rows of w at a time."""
    for r in range(start, stop, block_rows):
        n = min(block_rows, stop - r)
        wb = _scratch(n, w.shape[1])
        widen_into(w[r:r + n], wb)                     # [n, K] float32, in cache
        if y.shape[0] == 1:
            np.matmul(x2, wb.T, out=y[:, r:r + n])     # [1, K] @ [K, n]: a matrix-vector product
        else:
            y[:, r:r + n] = x2 @ wb.T                  # [M, K] @ [K, n]


def linear_upcast_blocks(x, w):
    """x @ float32(w).T for a 2-byte ``w`` [N, K], widened block by block (see the comment above).

    x [..., K] float32 -> [..., N] float32; equal to ``x @ as_float32(w).T`` up to BLAS summation order.
    """
    global _pool
    N, K = w.shape
    x2 = np.ascontiguousarray(x.reshape(-1, K))       # [M, K]
    M = x2.shape[0]
    y = np.empty((M, N), dtype=np.float32)
    if M > UPCAST_FEW_ROWS:
        block = max(1, UPCAST_BLOCK_BYTES_MANY_ROWS // (4 * K))
        _upcast_rows(x2, w, y, 0, N, block)            # BLAS threads the product of each wide block
    else:
        block = max(1, UPCAST_BLOCK_BYTES // (4 * K))
        n_threads = min(UPCAST_THREADS, -(-N // block))
        if n_threads <= 1:
            _upcast_rows(x2, w, y, 0, N, block)
        else:
            with _pool_lock:
                if _pool is None:
                    _pool = ThreadPoolExecutor(max_workers=UPCAST_THREADS, thread_name_prefix="kosmos2-upcast")
            per = -(-N // n_threads)
            per = -(-per // block) * block             # whole blocks per thread
            jobs = [_pool.submit(_upcast_rows, x2, w, y, s, min(s + per, N), block) for s in range(0, N, per)]
            for j in jobs:
                j.result()
    return y.reshape(x.shape[:-1] + (N,))


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) · weight + bias, biased variance, in float32."""
    xp = get_xp(x)
    # The moments accumulate in float64 (only the [..., 1] results are float64; no large temporaries): with a
    # float32 sum, a constant row gets a mean off by an ulp, which 1/sqrt(eps) then amplifies ~300-fold.
    # (sum / n rather than .mean(): the same float64 numbers, without .mean()'s Python-level wrapper, which is a
    # visible cost at 97 LayerNorms per decoded token.)
    n = x.shape[-1]
    mean = (x.sum(axis=-1, keepdims=True, dtype=xp.float64) / n).astype(xp.float32)   # [..., 1]
    xc = x - mean                                                                       # [..., C]
    var = (xc * xc).sum(axis=-1, keepdims=True, dtype=xp.float64) / n                  # [..., 1]
    xc *= (1.0 / xp.sqrt(var + eps)).astype(xp.float32)
    xc *= weight
    xc += bias
    return xc


def gelu(x):
    """Exact GELU, 0.5·x·(1 + erf(x/√2)) = 0.5·x·erfc(-x/√2).

    Written with erfc so the left tail (where 1 + erf cancels) keeps its relative precision. The tanh form
    is off by ~5e-4 and would break parity with transformers' ``nn.functional.gelu``.
    """
    if get_xp(x) is np and x.size > 2 * ELEMENTWISE_BLOCK:
        return _in_cache_sized_blocks(_gelu, x)
    return _gelu(x)


def _gelu(x):
    y = erfc(x * (-1.0 / math.sqrt(2.0)))      # a fresh array: finish in place
    y *= x
    y *= 0.5                                    # exact (a power of two), so the same as (0.5·x)·erfc
    return y


ELEMENTWISE_BLOCK = 1 << 16     # elements per block for a long chain of element-wise passes (256 KiB of float32)


def _in_cache_sized_blocks(fn, x):
    """``fn(x)`` for an element-wise ``fn``, applied ELEMENTWISE_BLOCK elements at a time (NumPy only).

    erfc takes ~20 passes over its input. Over a [1024, 8192] activation each pass would stream 33 MB through
    memory and allocate a fresh 33 MB temporary; over a 256 KiB block every pass stays in the CPU cache and the
    temporaries are small and reused, which made GELU ~3x faster on long prompts. Same numbers, element for element.
    """
    out = np.empty_like(x)                  # the same memory order as x (row- or column-major)
    src = x.ravel(order="K")                # x's elements in memory order (a view when x is contiguous)
    dst = out.ravel(order="K")              # a view: out is contiguous in that same order
    for i in range(0, src.size, ELEMENTWISE_BLOCK):
        dst[i:i + ELEMENTWISE_BLOCK] = fn(src[i:i + ELEMENTWISE_BLOCK])
    return out


def quick_gelu(x):
    """CLIP's quick GELU: x · sigmoid(1.702 x)."""
    xp = get_xp(x)
    d = x * -1.702
    xp.exp(d, out=d)
    d += 1.0
    return xp.divide(x, d, out=d)               # x / (1 + exp(-1.702 x)), in one buffer


ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu}


def softmax(x, axis: int = -1):
    """Numerically stable softmax: exp(x - max) / Σ exp(x - max)."""
    return _softmax_in_place(x - x.max(axis=axis, keepdims=True), axis)


def _softmax_in_place(e, axis: int = -1):
    """The softmax of ``e`` written over ``e`` itself (a fresh array of the caller's)."""
    xp = get_xp(e)
    e -= e.max(axis=axis, keepdims=True)
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


ATTENTION_BLOCK_BYTES = 8 << 20   # float32 bytes of scores formed at once when the probabilities are not returned


def attention(q, k, v, mask=None, scale: float | None = None, need_probs: bool = True):
    """Scaled dot-product attention.

    q [B, H, T, D], k and v [B, H, S, D], mask additive and broadcastable to [B, H, T, S] (0 = keep, a very
    negative number = drop). Returns (output [B, H, T, D], probabilities [B, H, T, S]).

    With ``need_probs=False`` the probabilities are not returned (None) and, for long inputs, the queries are taken
    a block at a time so that only a [B, H, block, S] slice of scores exists at once (about
    ``ATTENTION_BLOCK_BYTES``): a 1024-token prompt would otherwise build 128 MB of scores per layer, and touching
    that much fresh memory costs more than the arithmetic. Each query row's softmax is the same either way.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    B, H, T, D = q.shape
    S = k.shape[-2]
    rows = T if need_probs else max(1, ATTENTION_BLOCK_BYTES // (4 * B * H * S))
    if rows >= T:
        return _attention_block(q, k, v, mask, scale)
    xp = get_xp(q)
    out = xp.empty((B, H, T, D), dtype=xp.float32)
    for t in range(0, T, rows):
        m = mask if mask is None or mask.shape[-2] == 1 else mask[..., t:t + rows, :]
        out[:, :, t:t + rows], _ = _attention_block(q[:, :, t:t + rows], k, v, m, scale)
    return out, None


def _attention_block(q, k, v, mask, scale: float):
    """softmax(q kᵀ · scale + mask) v for one block of queries -> (output, probabilities)."""
    scores = q @ k.swapaxes(-1, -2)     # [B, H, T, D] @ [B, H, D, S] -> [B, H, T, S], a fresh array
    scores *= scale
    if mask is not None:
        scores += mask
    probs = _softmax_in_place(scores)   # [B, H, T, S]
    return probs @ v, probs             # [B, H, T, S] @ [B, H, S, D] -> [B, H, T, D]
