"""Any checkpoint this package loads -> a safetensors checkpoint folder (``kosmos2-ref convert SRC DST``).

The source may be a folder or a Hub id, with ``model.safetensors``, shards, or a PyTorch ``pytorch_model.bin``
(single or sharded, read without torch). The output is what transformers' ``save_pretrained`` writes and both
libraries read: ``config.json``, one ``model.safetensors`` (the tied LM head stored once, as
``text_model.model.embed_tokens.weight``), and the source's generation, tokenizer and processor files unchanged.

Every tensor is converted to ``dtype`` ("float32", "float16" or "bfloat16"; the stored dtype when None) -- all of
them, vectors included, as ``model.to(dtype).save_pretrained`` does -- and streamed to the file a chunk at a time:
the weights are never held in memory whole. The output appears only when complete: everything is written into a
temporary folder beside ``dst``, which is renamed to ``dst`` at the end and removed on any failure.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .config import Kosmos2Config
from .hub import resolve_checkpoint
from .weights import CONVERT_CHUNK_BYTES, SINGLE_FILE, STORAGE_DTYPES, WeightsError, convert_storage, plan_weights

# storage name -> safetensors dtype tag, and back
_TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_RAW = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}
# Files copied unchanged when the source has them (config.json is rewritten; the weights are converted).
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "processor_config.json",
)


def _chunks(raw: np.ndarray, src_tag: str, dst_tag: str):
    """The tensor's bytes in ``dst_tag``, CONVERT_CHUNK_BYTES of source at a time (row-major order)."""
    flat = np.ascontiguousarray(raw).reshape(-1)  # a view for every contiguous tensor (all but strided .bin)
    per_chunk = max(1, CONVERT_CHUNK_BYTES // flat.dtype.itemsize)
    for i in range(0, flat.size, per_chunk):
        part = flat[i : i + per_chunk]
        if src_tag == dst_tag:
            yield part
        elif dst_tag == "F64":
            yield part.astype(np.float64)
        else:
            yield convert_storage(part, src_tag, _NAMES[dst_tag])


def write_safetensors(
    path: Path, tensors: list[tuple[str, str, tuple[int, ...], object]], metadata: dict[str, str]
) -> None:
    """Write a safetensors file from ``(name, dtype tag, shape, chunks)`` entries, ``chunks`` an iterable of arrays
    whose bytes follow one another: an 8-byte little-endian header length, the JSON header (padded with spaces to
    a multiple of 8, as the safetensors library pads it), then each tensor's bytes in header order."""
    header: dict[str, object] = {"__metadata__": metadata}
    begin = 0
    for name, tag, shape, _ in tensors:
        end = begin + int(np.prod(shape, dtype=np.int64)) * _RAW[tag].itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [begin, end]}
        begin = end
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, _tag, _shape, chunks in tensors:
            start = f.tell()
            for part in chunks:
                f.write(memoryview(np.ascontiguousarray(part)).cast("B"))
            want = header[name]["data_offsets"]
            if f.tell() - start != want[1] - want[0]:  # a bug, never a user error: refuse the file
                raise RuntimeError(f"{name}: wrote {f.tell() - start} bytes, the header says {want[1] - want[0]}")
        f.flush()
        os.fsync(f.fileno())


def _config_dict(folder: Path, dtype_name: str | None) -> dict:
    """The source's config.json as it is, its dtype entries naming the new dtype when one is chosen: ``torch_dtype``
    (what 4.x writes and both versions read) and ``dtype`` (5.x), wherever the source has them."""
    d = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if dtype_name is None:
        return d
    for part in (d, d.get("text_config"), d.get("vision_config")):
        if isinstance(part, dict):
            for key in ("torch_dtype", "dtype"):
                if key in part:
                    part[key] = dtype_name
    if "torch_dtype" not in d and "dtype" not in d:
        d["torch_dtype"] = dtype_name
    return d


def convert_checkpoint(src, dst: str | Path, dtype: str | None = None, **hub_kwargs) -> Path:
    """Write the checkpoint ``src`` (a folder or a Hub id) as a safetensors folder ``dst``, which must not exist.

    ``dtype`` converts every tensor ("float32", "float16", "bfloat16"); None keeps each as stored. Returns ``dst``.
    Raises :class:`~kosmos2_ref.weights.WeightsError` (a ValueError) for a source that does not load, or a ``dst``
    that exists; on any failure nothing is left at ``dst``.
    """
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise WeightsError(f"dtype={dtype!r} is not supported: expected one of {STORAGE_DTYPES} (or None: as stored)")
    dst = Path(dst).expanduser()
    if dst.exists():
        raise WeightsError(
            f"output folder {str(dst)!r} already exists: convert writes a new folder, choose another name or remove it"
        )
    if not dst.parent.is_dir():
        raise WeightsError(f"output folder {str(dst)!r}: its parent folder does not exist")
    folder = resolve_checkpoint(src, **hub_kwargs)
    cfg = Kosmos2Config.from_pretrained(folder)
    plan = plan_weights(folder, cfg)  # every check before anything is written
    tensors = []
    for key, (f, fkey) in plan.items():
        src_tag = f.st_dtype(fkey)
        dst_tag = _TAGS[dtype] if dtype is not None else src_tag
        tensors.append((key, dst_tag, f.shape(fkey), _chunks(f.raw(fkey), src_tag, dst_tag)))

    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        write_safetensors(tmp / SINGLE_FILE, tensors, {"format": "pt"})
        config = _config_dict(folder, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name in COPIED_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is a normal folder
        os.rename(tmp, dst)  # atomic: dst appears complete, or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
