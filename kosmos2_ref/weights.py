"""Checkpoint weights: safetensors or PyTorch ``.bin`` file(s) -> a parameter tree named by the Hugging Face keys
(docs/numerics.md §8). The ``.bin`` reader is :mod:`kosmos2_ref.torch_pickle`, the storage dtypes and their conversion
:mod:`kosmos2_ref.storage`; :data:`WEIGHT_FILES` says which
file a folder holding several is read from; docs/checkpoints.md lists what loads.

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
* a truncated or corrupt file is caught from the header before any data is touched, with the file and key named;
  so is a header whose byte ranges overlap or leave gaps, as the safetensors library refuses it.

Storage dtype (``dtype=``) applies to matrices (ndim >= 2); vectors (biases, LayerNorm parameters) are always held
in float32. Compute is always float32.
"""

from __future__ import annotations

import json
import math
import struct
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .checks import is_int
from .config import Kosmos2Config

# re-exported: weights.WeightsError, weights.STORAGE_DTYPES, ... are the names the rest of the package imports
from .storage import (  # noqa: F401
    CONVERT_CHUNK_BYTES,
    STORAGE_DTYPES,
    ZERO_COPY,
    WeightsError,
    bf16_bits_to_float32,
    convert_storage,
    float32_to_bf16_bits,
    read_converted_range,
)
from .torch_pickle import TorchBinFile

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"  # torch.save's zip format, read by kosmos2_ref.torch_pickle
BIN_INDEX_FILE = "pytorch_model.bin.index.json"

# safetensors dtype tag -> (numpy dtype of the raw data, bytes per element)
_ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# Buffers some transformers versions wrote although they are derived, never learned; ignored silently.
_DERIVED_BUFFERS = (
    "vision_model.model.embeddings.position_ids",
    "text_model.model.embed_positions.weights",
    "text_model.model.embed_positions._float_tensor",
)


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
            raise WeightsError(
                f"weights file {str(self.path)!r} is truncated or not safetensors: "
                f"{size} bytes, too short for the 8-byte header length"
            )
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n == 0 or 8 + n > size:
                raise WeightsError(
                    f"weights file {str(self.path)!r} is truncated or not safetensors: header length "
                    f"{n} does not fit in the file's {size} bytes"
                )
            raw_header = f.read(n)
        try:
            header = json.loads(raw_header.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(
                f"weights file {str(self.path)!r} is corrupt: its header is not valid JSON ({exc})"
            ) from None
        if not isinstance(header, dict):
            raise WeightsError(f"weights file {str(self.path)!r} is corrupt: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_len = size - self.data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int, str]] = {}
        for key, info in header.items():
            self._entries[key] = self._parse_entry(key, info, data_len)
        self._check_tiling(data_len)
        self._map = None
        self._map_lock = threading.Lock()  # two threads reading the first tensor map the file once

    def _parse_entry(self, key: str, info, data_len: int):
        """One header entry -> (NumPy dtype, shape, begin, end, tag), every field checked, the key named."""
        where = f"weights file {str(self.path)!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise WeightsError(
                f"{where} is corrupt: bad header entry for key {key!r}: expected an object with "
                f"dtype, shape and data_offsets, got {str(info)[:80]}"
            )
        tag, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(is_int(n) and n >= 0 for n in shape):
            raise WeightsError(
                f"{where} is corrupt: key {key!r} has shape {shape!r}: expected a list of non-negative integers"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
            raise WeightsError(
                f"{where} is corrupt: key {key!r} has data_offsets {offsets!r}: expected two integers [begin, end]"
            )
        if tag not in _ST_DTYPES:
            raise WeightsError(f"{where}: key {key!r} has unsupported dtype {tag!r}")
        dt, shape, (begin, end) = _ST_DTYPES[tag], tuple(shape), offsets
        nbytes = math.prod(shape) * dt.itemsize
        if end - begin != nbytes or begin < 0:
            raise WeightsError(
                f"{where} is corrupt: key {key!r} has shape {list(shape)} ({nbytes} bytes) but a "
                f"byte range of {end - begin}"
            )
        if end > data_len:
            raise WeightsError(
                f"{where} is truncated: key {key!r} needs bytes up to {end} of the data section but "
                f"the file holds only {data_len}"
            )
        return dt, shape, begin, end, tag

    def _check_tiling(self, data_len: int) -> None:
        """The byte ranges must tile the data section: no two tensors share a byte, no byte is left over. This is
        what the safetensors library checks ("invalid offset", "incomplete metadata"); a file that breaks it was not
        written by it, and two tensors reading the same bytes would load silently as equal."""
        where = f"weights file {str(self.path)!r}"
        pos, prev = 0, None
        for key, (_, _, begin, end, _) in sorted(self._entries.items(), key=lambda kv: kv[1][2:4]):
            if begin < pos:
                raise WeightsError(
                    f"{where} is corrupt: key {key!r} (bytes {begin}..{end}) overlaps key {prev!r} "
                    f"(which ends at byte {pos}): tensors may not share bytes"
                )
            if begin > pos:
                raise WeightsError(
                    f"{where} is corrupt: {begin - pos} byte(s) before key {key!r} (at {begin}) "
                    f"belong to no tensor: the header's data_offsets must tile the data section"
                )
            pos, prev = end, key
        if pos != data_len:
            raise WeightsError(
                f"{where} is corrupt: {data_len - pos} byte(s) after the last tensor belong to no "
                f"tensor: the header's data_offsets must tile the data section"
            )

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
            with self._map_lock:
                if self._map is None:
                    self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = self._map[self.data_start + begin : self.data_start + end]
        return buf.view(dt).reshape(shape)

    def read_converted(self, key: str, storage: str) -> np.ndarray:
        """The tensor converted to ``storage`` ("float32", "float16", or "bfloat16" as uint16 bits), read with
        ordinary file reads a chunk at a time into a new array.

        The memory map is not touched, so the source bytes never become part of this process's resident memory:
        loading a float32 file into 2-byte storage peaks near the 2-byte copy plus one chunk, not near both copies.
        """
        dt, shape, begin, _, tag = self._entries[key]
        return read_converted_range(self.path, self.data_start + begin, dt, shape, tag, storage, key)


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
        for ln, dim in (
            ("self_attn.inner_attn_ln", C),
            ("self_attn_layer_norm", C),
            ("ffn.ffn_layernorm", F),
            ("final_layer_norm", C),
        ):
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

# The weight files a checkpoint folder may hold, in the order they are preferred (transformers' order too):
# safetensors first, since reading them runs no unpickler at all; each single file before its sharded form.
WEIGHT_FILES = (SINGLE_FILE, INDEX_FILE, BIN_FILE, BIN_INDEX_FILE)
EMBED_KEY = "text_model.model.embed_tokens.weight"
HEAD_KEY = "text_model.lm_head.weight"


def _open_weights_file(path: Path):
    """A safetensors file or a PyTorch zip checkpoint, by its name (``.bin``), both with the same interface."""
    if path.name.endswith(".bin"):
        return TorchBinFile(path)
    return SafetensorsFile(path)


def weights_file_of(folder: Path) -> Path | None:
    """The weight file (or index) :func:`load_flat` will read in ``folder``: the first of :data:`WEIGHT_FILES`."""
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def _read_index(index: Path) -> dict[str, str]:
    """A sharded checkpoint's index: weight name -> shard file name."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise WeightsError(
            f"index file {str(index)!r} is corrupt: expected JSON with a 'weight_map' ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise WeightsError(
            f"index file {str(index)!r} is corrupt: its 'weight_map' must be a JSON object "
            f"mapping each weight name to a shard file name, got {str(weight_map)[:80]}"
        )
    return weight_map


def _open_checkpoint_files(folder: Path) -> dict[str, Any]:
    """key -> the open file that holds it, for a single file or a sharded checkpoint with its index, safetensors
    or PyTorch ``.bin`` (:data:`WEIGHT_FILES` says which wins when a folder holds several)."""
    if not folder.is_dir():
        raise WeightsError(f"checkpoint folder {str(folder)!r} does not exist")
    chosen = weights_file_of(folder)
    if chosen is None:
        present = sorted(p.name for p in folder.iterdir())[:12]
        raise WeightsError(
            f"checkpoint folder {str(folder)!r} has no weights: expected one of "
            f"{', '.join(WEIGHT_FILES)} (it holds: {present})"
        )
    if not chosen.name.endswith(".index.json"):
        f = _open_weights_file(chosen)
        return {k: f for k in f.keys()}
    files: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for key, fname in _read_index(chosen).items():
        if fname not in files:
            files[fname] = _open_weights_file(folder / fname)
        if key not in files[fname].keys():
            raise WeightsError(
                f"index file {str(chosen)!r} says key {key!r} is in {fname!r}, but that file has no such key"
            )
        out[key] = files[fname]
    return out


def _same_values(f1, k1: str, f2, k2: str) -> bool:
    """Do two stored tensors hold the same numbers? Views of one ``.bin`` storage are the same without looking;
    otherwise compared a block of rows at a time (no full-size temporary)."""
    if f1 is f2 and hasattr(f1, "tensor_ref") and f1.tensor_ref(k1) == f2.tensor_ref(k2):
        return True
    if f1.shape(k1) != f2.shape(k2) or f1.st_dtype(k1) != f2.st_dtype(k2):
        return False
    a, b = f1.raw(k1), f2.raw(k2)
    rows = max(1, CONVERT_CHUNK_BYTES // max(1, a[:1].nbytes))
    return all(np.array_equal(a[i : i + rows], b[i : i + rows]) for i in range(0, max(len(a), 1), rows))


def _resolve_tied_head(folder: Path, where: dict[str, Any], cfg: Kosmos2Config) -> dict[str, tuple[Any, str]]:
    """key -> (file, key in that file), with the tied embedding found under either name, as transformers does.

    With ``tie_word_embeddings`` the LM head *is* the token embedding, so a checkpoint may store it as
    ``text_model.model.embed_tokens.weight`` (what save_pretrained writes), as ``text_model.lm_head.weight`` only
    (what some .bin-to-safetensors conversions write: it is read as the embedding), or as both. Both with equal
    values (a 4.x ``.bin`` holds two views of one storage) is one tensor. Both with different values: transformers
    5.23 then does not tie them -- the embedding is read from ``embed_tokens`` and the logits from ``lm_head`` --
    and warns; so do we (the head is loaded as a separate matrix).
    """
    source = {k: (f, k) for k, f in where.items()}
    if not cfg.text_config.tie_word_embeddings:
        return source
    if EMBED_KEY not in where and HEAD_KEY in where:
        source[EMBED_KEY] = source.pop(HEAD_KEY)
    elif EMBED_KEY in where and HEAD_KEY in where:
        if _same_values(where[EMBED_KEY], EMBED_KEY, where[HEAD_KEY], HEAD_KEY):
            del source[HEAD_KEY]
        else:
            warnings.warn(
                f"checkpoint {str(folder)!r}: config.json ties {HEAD_KEY!r} to {EMBED_KEY!r}, but the "
                f"checkpoint holds both with different values, so they are not tied (as transformers "
                f"does): the logits use {HEAD_KEY!r}. Set text_config.tie_word_embeddings=false to say "
                f"so",
                stacklevel=4,
            )
    return source


def plan_weights(folder: str | Path, cfg: Kosmos2Config) -> dict[str, tuple[Any, str]]:
    """Open and check the checkpoint in ``folder`` without reading any tensor: every weight key of ``cfg`` ->
    (the open file that holds it, its key in that file), in :func:`expected_shapes` order.

    Raises :class:`WeightsError` for a missing folder/file, a corrupt or truncated file, a missing key, a shape
    that does not match ``cfg`` or a tensor that is not a float; warns about unexpected keys.
    ``text_model.lm_head.weight`` is in the plan only when it is a matrix of its own (untied, or tied but stored
    with different values: see :func:`_resolve_tied_head`).
    """
    folder = Path(folder)
    source = _resolve_tied_head(folder, _open_checkpoint_files(folder), cfg)
    expected = expected_shapes(cfg)
    if HEAD_KEY in source:
        expected[HEAD_KEY] = expected[EMBED_KEY]
    missing = [k for k in expected if k not in source]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        hint = (
            " (tie_word_embeddings is false, so the LM head is a weight of its own)" if missing[0] == HEAD_KEY else ""
        )
        raise WeightsError(
            f"checkpoint {str(folder)!r} is missing key {missing[0]!r}{more}{hint}: it does not match its config.json"
        )
    unexpected = [k for k in source if k not in expected and k not in _DERIVED_BUFFERS]
    if unexpected:
        warnings.warn(
            f"checkpoint {str(folder)!r} has {len(unexpected)} unexpected key(s), ignored: {unexpected[:5]}",
            stacklevel=4,
        )
    plan: dict[str, tuple[Any, str]] = {}
    for key, shape in expected.items():
        f, fkey = source[key]
        if f.shape(fkey) != shape:
            raise WeightsError(
                f"weights file {str(f.path)!r}: key {fkey!r} has shape {list(f.shape(fkey))}, "
                f"but config.json implies {list(shape)}"
            )
        if f.st_dtype(fkey) not in ("F32", "F16", "BF16", "F64"):
            raise WeightsError(
                f"weights file {str(f.path)!r}: key {fkey!r} has dtype {f.st_dtype(fkey)}, expected a float type"
            )
        plan[key] = (f, fkey)
    return plan


def load_flat(folder: str | Path, cfg: Kosmos2Config, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Read and check every weight of the checkpoint in ``folder``: key -> NumPy array in the storage dtype
    (matrices in ``dtype``, vectors in float32). The checks are :func:`plan_weights`'."""
    if dtype not in STORAGE_DTYPES:
        raise WeightsError(f"dtype={dtype!r} is not supported: expected one of {STORAGE_DTYPES}")
    flat: dict[str, np.ndarray] = {}
    for key, (f, fkey) in plan_weights(folder, cfg).items():
        storage = dtype if len(f.shape(fkey)) >= 2 else "float32"
        if ZERO_COPY.get(f.st_dtype(fkey)) == storage:
            flat[key] = _contiguous(f.raw(fkey))  # a view of the memory map: no copy, no time
        else:
            flat[key] = f.read_converted(fkey, storage)
    return flat


def _contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` itself when row-major; a read-only row-major copy of a strided view (a ``.bin`` may store a weight as
    the transpose of another tensor's storage)."""
    if a.flags.c_contiguous:
        return a
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


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
    save_file(
        {k: np.ascontiguousarray(v) for k, v in flat.items()}, str(tmp), metadata={"format": "pt", **(metadata or {})}
    )
    tmp.replace(path)
