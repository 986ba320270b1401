"""Checkpoint weights: safetensors file(s) -> a parameter tree named by the Hugging Face keys
(docs/numerics.md §8).

The tree is the key split on dots, with numeric parts as list indices, so
``text_model.model.layers.3.self_attn.q_proj.weight`` is ``params["text_model"]["model"]["layers"][3]
["self_attn"]["q_proj"]["weight"]`` and a block is called as ``linear(x, **layer["self_attn"]["q_proj"])``.

The safetensors format is simple (an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw little-endian data), so we read it ourselves with a memory map:

* float32 storage of a float32 file is a zero-copy view of the mapped file: peak memory stays at one copy of the
  weights (the page cache), and loading costs no time until a weight is used;
* bfloat16 files load without torch: NumPy has no bfloat16, so bfloat16 weights are held as their raw ``uint16``
  bits and widened to float32 where they are used (a cache-sized block at a time, :mod:`kosmos2_ref.layers`);
* a storage dtype that differs from the file's (a float32 file held in bfloat16, say) is converted with ordinary
  file reads one 1 MiB chunk at a time, never through the memory map, so the 4-byte source never becomes resident
  in this process beside its 2-byte copy;
* a truncated or corrupt file is caught from the header before any data is touched, with the file and key named.

Storage dtype (``dtype=``) applies to matrices (ndim >= 2); vectors (biases, LayerNorm parameters) are always held
in float32. Compute is always float32.
"""
from __future__ import annotations

import json
import math
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .config import Kosmos2Config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
CONVERT_CHUNK_BYTES = 1 << 20       # source bytes read and converted at a time (cache-sized) when converting

# safetensors dtype tag -> (numpy dtype of the raw data, bytes per element)
_ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
# Buffers some transformers versions wrote although they are derived, never learned; ignored silently.
_DERIVED_BUFFERS = ("vision_model.model.embeddings.position_ids", "text_model.model.embed_positions.weights",
                    "text_model.model.embed_positions._float_tensor")


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
    t = u >> 16                  # the bit that will become the last kept bit ...
    t &= 1
    t += 0x7FFF                  # ... decides ties: add 0x7FFF or 0x8000, then truncate
    t += u
    t >>= 16
    out = t.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reading one safetensors file

class SafetensorsFile:
    """A memory-mapped safetensors file: ``keys()``, ``shape(key)``, ``dtype(key)``, ``raw(key)`` (zero-copy)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"weights file {str(self.path)!r} does not exist")
        size = self.path.stat().st_size
        if size < 8:
            raise WeightsError(f"weights file {str(self.path)!r} is truncated or not safetensors: "
                               f"{size} bytes, too short for the 8-byte header length")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n == 0 or 8 + n > size:
                raise WeightsError(f"weights file {str(self.path)!r} is truncated or not safetensors: header length "
                                   f"{n} does not fit in the file's {size} bytes")
            raw_header = f.read(n)
        try:
            header = json.loads(raw_header.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"weights file {str(self.path)!r} is corrupt: its header is not valid JSON ({exc})") \
                from None
        if not isinstance(header, dict):
            raise WeightsError(f"weights file {str(self.path)!r} is corrupt: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_len = size - self.data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int, str]] = {}
        for key, info in header.items():
            try:
                tag, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise WeightsError(f"weights file {str(self.path)!r} is corrupt: bad header entry for key {key!r}") \
                    from None
            if tag not in _ST_DTYPES:
                raise WeightsError(f"weights file {str(self.path)!r}: key {key!r} has unsupported dtype {tag!r}")
            dt = _ST_DTYPES[tag]
            nbytes = math.prod(shape) * dt.itemsize
            if end - begin != nbytes or begin < 0:
                raise WeightsError(f"weights file {str(self.path)!r} is corrupt: key {key!r} has shape {list(shape)} "
                                   f"({nbytes} bytes) but a byte range of {end - begin}")
            if end > data_len:
                raise WeightsError(f"weights file {str(self.path)!r} is truncated: key {key!r} needs bytes up to "
                                   f"{end} of the data section but the file holds only {data_len}")
            self._entries[key] = (dt, shape, begin, end, tag)
        self._map = None

    def keys(self):
        return self._entries.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def st_dtype(self, key: str) -> str:
        return self._entries[key][4]

    def raw(self, key: str) -> np.ndarray:
        """The tensor as stored (BF16 as uint16 bits), a read-only view of the memory map: no copy."""
        dt, shape, begin, end, _ = self._entries[key]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = self._map[self.data_start + begin:self.data_start + end]
        return buf.view(dt).reshape(shape)

    def read_converted(self, key: str, storage: str) -> np.ndarray:
        """The tensor converted to ``storage`` ("float32", "float16", or "bfloat16" as uint16 bits), read with
        ordinary file reads a chunk at a time into a new array.

        The memory map is not touched, so the source bytes never become part of this process's resident memory:
        loading a float32 file into 2-byte storage peaks near the 2-byte copy plus one chunk, not near both copies.
        """
        dt, shape, begin, end, tag = self._entries[key]
        out = np.empty(shape, dtype=np.uint16 if storage == "bfloat16" else np.dtype(storage))
        flat = out.reshape(-1)
        per_chunk = max(1, CONVERT_CHUNK_BYTES // dt.itemsize)
        chunk = np.empty(min(per_chunk, flat.size), dtype=dt)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            for i in range(0, flat.size, per_chunk):
                part = chunk[:min(per_chunk, flat.size - i)]
                view = memoryview(part).cast("B")
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise WeightsError(f"weights file {str(self.path)!r} is truncated: key {key!r} ends early")
                    got += n
                flat[i:i + part.size] = convert_storage(part, tag, storage)
        out.flags.writeable = False                    # like the memory-mapped views: weights are read-only
        return out


# safetensors dtype tag -> the storage name that holds it unchanged
_ZERO_COPY = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def convert_storage(raw: np.ndarray, st_dtype: str, storage: str) -> np.ndarray:
    """A stored float tensor -> the requested storage dtype ("float32", "float16" or "bfloat16" as uint16 bits).

    Returns ``raw`` itself when nothing needs converting (:func:`load_flat` keeps such tensors as views of the
    memory map and calls this, through :meth:`SafetensorsFile.read_converted`, one chunk at a time for the rest).
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


# ----------------------------------------------------------------------------------------------------------------
# The expected key set of Kosmos2ForConditionalGeneration

def expected_shapes(cfg: Kosmos2Config) -> dict[str, tuple[int, ...]]:
    """Every weight key of ``Kosmos2ForConditionalGeneration`` and its shape, for ``cfg`` (docs/numerics.md §8).

    The tied ``text_model.lm_head.weight`` is listed only when ``tie_word_embeddings`` is False.
    """
    t, v = cfg.text_config, cfg.vision_config
    C, F, V = t.embed_dim, t.ffn_dim, t.vocab_size
    c, f, p = v.hidden_size, v.intermediate_size, v.patch_size
    s: dict[str, tuple[int, ...]] = {"text_model.model.embed_tokens.weight": (V, C)}
    for i in range(t.layers):
        pre = f"text_model.model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[pre + f"self_attn.{proj}.weight"] = (C, C)
            s[pre + f"self_attn.{proj}.bias"] = (C,)
        for ln, dim in (("self_attn.inner_attn_ln", C), ("self_attn_layer_norm", C),
                        ("ffn.ffn_layernorm", F), ("final_layer_norm", C)):
            s[pre + ln + ".weight"] = (dim,)
            s[pre + ln + ".bias"] = (dim,)
        s[pre + "ffn.fc1.weight"], s[pre + "ffn.fc1.bias"] = (F, C), (F,)
        s[pre + "ffn.fc2.weight"], s[pre + "ffn.fc2.bias"] = (C, F), (C,)
    s["text_model.model.layer_norm.weight"] = s["text_model.model.layer_norm.bias"] = (C,)
    if not t.tie_word_embeddings:
        s["text_model.lm_head.weight"] = (V, C)

    s["vision_model.model.embeddings.class_embedding"] = (c,)
    s["vision_model.model.embeddings.patch_embedding.weight"] = (c, v.num_channels, p, p)
    s["vision_model.model.embeddings.position_embedding.weight"] = (v.num_patches + 1, c)
    for ln in ("pre_layrnorm", "post_layernorm"):
        s[f"vision_model.model.{ln}.weight"] = s[f"vision_model.model.{ln}.bias"] = (c,)
    for i in range(v.num_hidden_layers):
        pre = f"vision_model.model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[pre + f"self_attn.{proj}.weight"] = (c, c)
            s[pre + f"self_attn.{proj}.bias"] = (c,)
        for ln in ("layer_norm1", "layer_norm2"):
            s[pre + ln + ".weight"] = s[pre + ln + ".bias"] = (c,)
        s[pre + "mlp.fc1.weight"], s[pre + "mlp.fc1.bias"] = (f, c), (f,)
        s[pre + "mlp.fc2.weight"], s[pre + "mlp.fc2.bias"] = (c, f), (c,)

    s["image_to_text_projection.latent_query"] = (cfg.latent_query_num, C)
    s["image_to_text_projection.dense.weight"] = (C, c)
    s["image_to_text_projection.dense.bias"] = (C,)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        s[f"image_to_text_projection.x_attn.{proj}.weight"] = (C, C)
        s[f"image_to_text_projection.x_attn.{proj}.bias"] = (C,)
    return s


# ----------------------------------------------------------------------------------------------------------------
# Folder -> flat dict -> tree

def _open_checkpoint_files(folder: Path) -> dict[str, SafetensorsFile]:
    """key -> the open file that holds it, for a single file or a sharded checkpoint with its index."""
    if not folder.is_dir():
        raise WeightsError(f"checkpoint folder {str(folder)!r} does not exist")
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if single.is_file():
        f = SafetensorsFile(single)
        return {k: f for k in f.keys()}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise WeightsError(f"index file {str(index)!r} is corrupt: expected JSON with a 'weight_map' "
                               f"({type(exc).__name__}: {exc})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise WeightsError(f"index file {str(index)!r} is corrupt: its 'weight_map' must be a JSON object "
                               f"mapping each weight name to a shard file name, got {str(weight_map)[:80]}")
        files: dict[str, SafetensorsFile] = {}
        out: dict[str, SafetensorsFile] = {}
        for key, fname in weight_map.items():
            if fname not in files:
                files[fname] = SafetensorsFile(folder / fname)
            if key not in files[fname].keys():
                raise WeightsError(f"index file {str(index)!r} says key {key!r} is in {fname!r}, "
                                   f"but that file has no such key")
            out[key] = files[fname]
        return out
    present = sorted(p.name for p in folder.iterdir())[:12]
    raise WeightsError(f"checkpoint folder {str(folder)!r} has no {SINGLE_FILE} and no {INDEX_FILE} "
                       f"(it holds: {present}); a PyTorch .bin checkpoint is not supported, convert it to safetensors")


def load_flat(folder: str | Path, cfg: Kosmos2Config, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Read and check every weight of the checkpoint in ``folder``: key -> NumPy array in the storage dtype.

    Raises :class:`WeightsError` for a missing folder/file, a corrupt or truncated file, a missing key or a shape
    that does not match ``cfg``; warns about unexpected keys.
    """
    if dtype not in STORAGE_DTYPES:
        raise WeightsError(f"dtype={dtype!r} is not supported: expected one of {STORAGE_DTYPES}")
    folder = Path(folder)
    where = _open_checkpoint_files(folder)
    expected = expected_shapes(cfg)
    missing = [k for k in expected if k not in where]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"checkpoint {str(folder)!r} is missing key {missing[0]!r}{more}: "
                           f"it does not match its config.json")
    tied_head = "text_model.lm_head.weight"
    unexpected = [k for k in where if k not in expected and k not in _DERIVED_BUFFERS
                  and not (k == tied_head and cfg.text_config.tie_word_embeddings)]
    if unexpected:
        warnings.warn(f"checkpoint {str(folder)!r} has {len(unexpected)} unexpected key(s), ignored: "
                      f"{unexpected[:5]}", stacklevel=3)
    flat: dict[str, np.ndarray] = {}
    for key, shape in expected.items():
        f = where[key]
        if f.shape(key) != shape:
            raise WeightsError(f"weights file {str(f.path)!r}: key {key!r} has shape {list(f.shape(key))}, "
                               f"but config.json implies {list(shape)}")
        tag = f.st_dtype(key)
        if tag not in ("F32", "F16", "BF16", "F64"):
            raise WeightsError(f"weights file {str(f.path)!r}: key {key!r} has dtype {tag}, expected a float type")
        storage = dtype if len(shape) >= 2 else "float32"
        if _ZERO_COPY.get(tag) == storage:
            flat[key] = f.raw(key)                     # a view of the memory map: no copy, no time
        else:
            flat[key] = f.read_converted(key, storage)
    return flat


def unflatten(flat: dict[str, Any]) -> dict:
    """``{"a.b.0.c": x}`` -> ``{"a": {"b": [{"c": x}]}}``: numeric path parts become list indices."""
    tree: dict = {}
    for key, value in flat.items():
        parts = key.split(".")
        node: Any = tree
        for part, nxt in zip(parts[:-1], parts[1:]):
            child_default = [] if nxt.isdigit() else {}
            if isinstance(node, list):
                i = int(part)
                while len(node) <= i:
                    node.append(None)
                if node[i] is None:
                    node[i] = child_default
                node = node[i]
            else:
                node = node.setdefault(part, child_default)
        last = parts[-1]
        if isinstance(node, list):
            i = int(last)
            while len(node) <= i:
                node.append(None)
            node[i] = value
        else:
            node[last] = value
    return tree


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`unflatten`."""
    out: dict[str, Any] = {}
    items = enumerate(tree) if isinstance(tree, list) else tree.items() if isinstance(tree, dict) else None
    if items is None:
        return {prefix: tree}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def map_tree(fn, tree: Any) -> Any:
    """``fn`` applied to every leaf of a parameter tree."""
    if isinstance(tree, dict):
        return {k: map_tree(fn, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [map_tree(fn, v) for v in tree]
    return fn(tree)


def save_safetensors(flat: dict[str, np.ndarray], path: str | Path, metadata: dict | None = None) -> None:
    """Write float32/float16 arrays as a safetensors file, atomically (a temp file renamed into place)."""
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(tmp),
              metadata={"format": "pt", **(metadata or {})})
    tmp.replace(path)
