"""Storage dtypes of weights and their conversion, shared by the safetensors reader (:mod:`kosmos2_ref.weights`),
the ``.bin`` reader (:mod:`kosmos2_ref.torch_pickle`) and the converter; and :class:`WeightsError`, which all of
them raise. It imports nothing of the package, so both readers sit above it (docs/numerics.md §8).

NumPy has no bfloat16: bfloat16 weights are held as their raw ``uint16`` bits (the top half of a float32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
CONVERT_CHUNK_BYTES = 1 << 20  # source bytes read and converted at a time (cache-sized) when converting
# safetensors dtype tag -> the storage name that holds it unchanged
ZERO_COPY = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class WeightsError(ValueError):
    """A checkpoint whose weights cannot be loaded: names the file and the key."""


# ----------------------------------------------------------------------------------------------------------------
# bfloat16 <-> float32 on raw bits (NumPy has no bfloat16 type)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> float32: bfloat16 is the top half of a float32, so shift it back up."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bits, rounding to nearest even as torch does (NaN kept quiet)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    t = u >> 16  # the bit that will become the last kept bit ...
    t &= 1
    t += 0x7FFF  # ... decides ties: add 0x7FFF or 0x8000, then truncate
    t += u
    t >>= 16
    out = t.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Conversion


def read_converted_range(
    path: Path, offset: int, dt: np.dtype, shape: tuple[int, ...], tag: str, storage: str, key: str
) -> np.ndarray:
    """The contiguous tensor of ``shape`` and raw dtype ``dt`` at byte ``offset`` of ``path``, converted to
    ``storage`` with ordinary file reads of :data:`CONVERT_CHUNK_BYTES` at a time into a new read-only array."""
    out = np.empty(shape, dtype=np.uint16 if storage == "bfloat16" else np.dtype(storage))
    flat = out.reshape(-1)
    per_chunk = max(1, CONVERT_CHUNK_BYTES // dt.itemsize)
    chunk = np.empty(min(per_chunk, flat.size), dtype=dt)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        for i in range(0, flat.size, per_chunk):
            part = chunk[: min(per_chunk, flat.size - i)]
            view = memoryview(part).cast("B")
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise WeightsError(f"weights file {str(path)!r} is truncated: key {key!r} ends early")
                got += n
            flat[i : i + part.size] = convert_storage(part, tag, storage)
    out.flags.writeable = False  # like the memory-mapped views: weights are read-only
    return out


def convert_storage(raw: np.ndarray, st_dtype: str, storage: str) -> np.ndarray:
    """A stored float tensor -> the requested storage dtype ("float32", "float16" or "bfloat16" as uint16 bits).

    Returns ``raw`` itself when nothing needs converting (``weights.load_flat`` keeps such tensors as views of the
    memory map and calls this, through ``SafetensorsFile.read_converted``, one chunk at a time for the rest).
    """
    if st_dtype == "BF16":
        if storage == "bfloat16":
            return raw
        f32 = bf16_bits_to_float32(raw)
        return f32 if storage == "float32" else f32.astype(np.float16)
    if st_dtype == "F64":
        raw = raw.astype(np.float32)
    if storage == "bfloat16":
        return float32_to_bf16_bits(raw.astype(np.float32, copy=False))
    target = np.dtype(np.float32 if storage == "float32" else np.float16)
    return raw if raw.dtype == target else raw.astype(target)
