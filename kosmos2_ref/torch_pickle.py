"""PyTorch ``pytorch_model.bin`` checkpoints, read without torch and without running any code from the file.

``torch.save(state_dict, "pytorch_model.bin")`` (torch >= 1.6) writes a **zip archive**, every member stored
uncompressed::

    <archive>/data.pkl               a pickle of the state dict: {name: tensor}
    <archive>/data/0, data/1, ...    the raw bytes of each storage (a flat buffer that tensors are views of)
    <archive>/byteorder              "little" (absent in files from torch < 1.10, which were little-endian)
    <archive>/version, .format_version, .storage_alignment, .data/serialization_id   bookkeeping we do not need

``<archive>`` is "archive" or the file's stem. The pickle does not contain the numbers; each tensor in it is a call

    torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])

whose ``storage`` is a *persistent id*, the tuple ``("storage", torch.FloatStorage, "0", "cpu", numel)``: the
storage's element type (a class named by a GLOBAL opcode), the member ``data/0`` holding its bytes, the device it
was saved from and its length in elements. Several tensors may share one storage (a tied weight, a transposed
view), each with its own offset and strides, all counted in elements.

Unpickling is running a tiny program: ``GLOBAL`` imports any name and ``REDUCE`` calls it, which is how a
malicious ``.bin`` runs ``os.system``. :class:`RestrictedUnpickler` therefore resolves only the few names a state
dict needs (:data:`ALLOWED_GLOBALS`) -- and to *our* functions, which record what to read, never to torch's -- and
refuses every other name with :class:`~kosmos2_ref.storage.WeightsError` before anything is called.

The storages are memory-mapped: a zip member stored uncompressed is a plain byte range of the file, found from its
local file header, so a tensor is a NumPy view of the mapped file (bfloat16 as its ``uint16`` bits, as for
safetensors files) and a 6.66 GB checkpoint is never copied into memory.

The **legacy format** (``torch.save(..., _use_new_zipfile_serialization=False)``, the only one before torch 1.6) is
not a zip but pickles one after another, then the storages' bytes::

    pickle: the magic number 0x1950a86a20f9469cfc6c     pickle: the protocol version 1001
    pickle: {"little_endian": True, "type_sizes": ...}  pickle: the state dict (the same tensor calls; persistent ids
                                                                 ("storage", type, key, location, numel, None))
    pickle: the storage keys, sorted                    then per key: int64 numel, numel elements of raw bytes

It is read the same way: restricted unpickling, then the byte offset of each storage, then memory-mapped views.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import is_int
from .storage import WeightsError, convert_storage, read_converted_range

# torch's typed storage classes -> (the safetensors dtype tag we reuse for them, the NumPy dtype of the raw bytes)
STORAGE_TYPES = {
    "FloatStorage": ("F32", np.dtype("<f4")),
    "HalfStorage": ("F16", np.dtype("<f2")),
    "BFloat16Storage": ("BF16", np.dtype("<u2")),
    "DoubleStorage": ("F64", np.dtype("<f8")),
    "LongStorage": ("I64", np.dtype("<i8")),
    "IntStorage": ("I32", np.dtype("<i4")),
    "ShortStorage": ("I16", np.dtype("<i2")),
    "CharStorage": ("I8", np.dtype("i1")),
    "ByteStorage": ("U8", np.dtype("u1")),
    "BoolStorage": ("BOOL", np.dtype("?")),
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a torch < 1.6 file is this number


class _Error(ValueError):
    """Raised inside the unpickler; turned into a WeightsError naming the file by :class:`TorchBinFile`."""


# ----------------------------------------------------------------------------------------------------------------
# What the pickle describes: storage types, storages, tensors (plain records, nothing is read yet)


class _Record:
    """Base of the records below: the pickle's BUILD opcode (set an object's state) is refused on them, so a record
    cannot be changed after it was checked."""

    def __setstate__(self, state):
        raise _Error(
            "its pickle tries to change a tensor or storage record after building it (a BUILD opcode); "
            "torch.save never does"
        )


@dataclass(frozen=True)
class StorageType(_Record):
    """Stands for ``torch.FloatStorage`` and friends: only the element type matters to us."""

    name: str

    @property
    def tag(self) -> str:
        return STORAGE_TYPES[self.name][0]

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_TYPES[self.name][1]


@dataclass(frozen=True)
class StorageRef(_Record):
    """A persistent id resolved: the member ``data/<key>`` holds ``numel`` elements of ``type``."""

    type: StorageType
    key: str
    numel: int


@dataclass(frozen=True)
class TensorRef(_Record):
    """A tensor as ``_rebuild_tensor_v2`` describes it: a strided view of a storage (all counts in elements)."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def is_contiguous(self) -> bool:
        """Row-major with no gaps (a size-1 dimension may have any stride, as in torch)."""
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def _ints(v, what: str) -> tuple[int, ...]:
    if not isinstance(v, tuple) or not all(is_int(x) and x >= 0 for x in v):
        raise _Error(f"a tensor's {what} must be a tuple of non-negative integers, got {v!r}")
    return tuple(int(x) for x in v)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Our stand-in for ``torch._utils._rebuild_tensor_v2``: record the view, build nothing.

    ``requires_grad``, ``backward_hooks`` (an empty OrderedDict in a state dict) and ``metadata`` (Python attributes
    set on the tensor) do not change the numbers, so they are dropped.
    """
    if not isinstance(storage, StorageRef):
        raise _Error(f"a tensor's storage must be a persistent 'storage' id, got {type(storage).__name__}")
    if not is_int(storage_offset) or storage_offset < 0:
        raise _Error(f"a tensor's storage offset must be a non-negative integer, got {storage_offset!r}")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise _Error(f"a tensor has size {shape} but stride {strides} (different lengths)")
    last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else storage_offset - 1
    if last >= storage.numel:
        raise _Error(
            f"a tensor of size {shape}, stride {strides} at offset {storage_offset} reaches element {last} "
            f"of storage {storage.key!r}, which holds {storage.numel}"
        )
    return TensorRef(storage, int(storage_offset), shape, strides)


def _rebuild_tensor(storage, storage_offset, size, stride):
    """``torch._utils._rebuild_tensor`` (files from torch < 1.x): the same view without the extra arguments."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """``torch._utils._rebuild_parameter``: an ``nn.Parameter`` saved as such is just its tensor to us."""
    if not isinstance(data, TensorRef):
        raise _Error(f"a parameter must wrap a tensor, got {type(data).__name__}")
    return data


# (module, name) -> what it resolves to. Nothing else can be named by the pickle. Not here on purpose:
# torch.storage._load_from_bytes, which plain pickle.dumps(tensor) writes (torch.save never does): it calls torch.load
# on bytes inside the pickle, and so would need all of this again, recursively, for no checkpoint that exists.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,  # the state dict itself, and empty hook dicts
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,  # every tensor
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,  # every tensor, older files
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,  # a tensor saved as nn.Parameter
    **{("torch", name): StorageType(name) for name in STORAGE_TYPES},  # element types named in persistent ids
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build dicts, tuples, numbers, strings and our tensor records -- nothing else."""

    def find_class(self, module: str, name: str):
        # Called for every GLOBAL / STACK_GLOBAL / INST / OBJ / EXT opcode, before anything is called or built.
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise _Error(
                f"its pickle names {module}.{name}, which a PyTorch state dict never needs; refusing to "
                f"load it (nothing from the file was run). Allowed: tensors, storages, OrderedDict"
            )
        return found

    def persistent_load(self, pid):
        # torch's zip format: ("storage", storage type, member key, location, number of elements); the legacy
        # format adds a sixth entry, view metadata, None unless the storage was a view of another (torch < 1.0)
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise _Error(f"unknown persistent id {str(pid)[:80]}: expected ('storage', type, key, location, numel)")
        if len(pid) == 6 and pid[5] is not None:
            raise _Error(f"storage {pid[2]!r} is a view of another storage (torch < 1.0 files): not supported")
        _, stype, key, _location, numel = pid[:5]
        if not isinstance(stype, StorageType) or not isinstance(key, str) or not is_int(numel) or numel < 0:
            raise _Error(f"malformed storage id {str(pid)[:80]}")
        return StorageRef(stype, key, int(numel))


# ----------------------------------------------------------------------------------------------------------------
# The zip archive: members found by name, their bytes memory-mapped


def _member_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start in the file: after its 30-byte local header, name and extra field.

    The central directory's copy of the extra field may differ from the local one, so the local header is read.
    """
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise _Error(f"member {info.filename!r} has no local file header at offset {info.header_offset}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def is_legacy_format(path: Path) -> bool:
    """A legacy-format file: not a zip, but pickles whose first one is :data:`LEGACY_MAGIC`.

    Even this first look unpickles with :class:`RestrictedUnpickler`: 32 bytes are enough for a pickle that calls
    ``os.system``."""
    with open(path, "rb") as f:
        head = f.read(32)
    try:
        return RestrictedUnpickler(io.BytesIO(head)).load() == LEGACY_MAGIC
    except Exception:  # anything at all that is not that number (a refused name included): not a legacy file
        return False


class TorchBinFile:
    """A ``pytorch_model.bin`` (torch's zip format, or its legacy format) opened without torch: the same interface as
    :class:`~kosmos2_ref.weights.SafetensorsFile` -- ``keys()``, ``shape(key)``, ``st_dtype(key)``, ``raw(key)``
    (a zero-copy view of the memory-mapped file) and ``read_converted(key, storage)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        where = f"weights file {str(self.path)!r}"
        if not self.path.is_file():
            raise WeightsError(f"{where} does not exist")
        if not zipfile.is_zipfile(self.path):
            if not is_legacy_format(self.path):
                raise WeightsError(
                    f"{where} is not a PyTorch checkpoint: expected a zip archive written by "
                    f"torch.save (or torch's legacy format)"
                )
            self._open_legacy(where)
            return
        try:
            with zipfile.ZipFile(self.path) as z:
                infos = {i.filename: i for i in z.infolist()}
                pkl = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
                if len(pkl) != 1:
                    raise _Error(f"expected one '<archive>/data.pkl' member, found {pkl or 'none'}")
                self.prefix = pkl[0][: -len("data.pkl")]  # "archive/"
                order = infos.get(self.prefix + "byteorder")
                if order is not None and z.read(order).strip() != b"little":
                    raise _Error(
                        f"its byteorder is {z.read(order).strip().decode(errors='replace')!r}; only "
                        f"little-endian files are supported"
                    )
                state = RestrictedUnpickler(io.BytesIO(z.read(pkl[0]))).load()
        except _Error as exc:
            raise WeightsError(f"{where}: {exc}") from None
        except (
            zipfile.BadZipFile,
            pickle.UnpicklingError,
            EOFError,
            UnicodeDecodeError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
        ) as exc:
            # TypeError: one of our functions called with the wrong arguments by a crafted pickle; the others: a
            # damaged archive or pickle. Either way nothing from the file has been executed.
            raise WeightsError(f"{where} is corrupt: {type(exc).__name__}: {exc}") from None
        self._check_state(state, where)
        self._storage_offsets = self._locate_storages(infos, where)
        self._map = None

    def _open_legacy(self, where: str) -> None:
        """The legacy format: four pickles, the storage keys, then each storage as int64 numel + raw bytes."""
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                magic, version, sys_info = (RestrictedUnpickler(f).load() for _ in range(3))
                if magic != LEGACY_MAGIC or not is_int(version):
                    raise _Error("its first pickles are not torch's magic number and protocol version")
                if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
                    raise _Error(
                        f"it was written on a big-endian machine ({str(sys_info)[:80]}); only little-endian "
                        f"files are supported"
                    )
                state = RestrictedUnpickler(f).load()
                keys = RestrictedUnpickler(f).load()
                pos = f.tell()  # the first storage's 8-byte length starts here
                if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                    raise _Error("the list of storage keys after the state dict is malformed")
                self._check_state(state, where)
                types = {t.storage.key: t.storage for t in self._tensors.values()}
                self._storage_offsets = {}
                for key in keys:
                    f.seek(pos)
                    head = f.read(8)
                    if len(head) != 8:
                        raise _Error(f"storage {key!r} starts past the end of the file")
                    (numel,) = struct.unpack("<q", head)
                    ref = types.get(key)
                    itemsize = ref.type.dtype.itemsize if ref is not None else 1
                    if ref is not None and numel != ref.numel:
                        raise _Error(f"storage {key!r} holds {numel} elements, but the pickle says {ref.numel}")
                    self._storage_offsets[key] = pos + 8
                    pos += 8 + numel * itemsize
                    if numel < 0 or pos > size:
                        raise WeightsError(
                            f"{where} is truncated: storage {key!r} ({numel} elements) ends past the end of the file"
                        )
        except _Error as exc:
            raise WeightsError(f"{where}: {exc}") from None
        except (
            pickle.UnpicklingError,
            EOFError,
            UnicodeDecodeError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            struct.error,
        ) as exc:
            raise WeightsError(f"{where} is corrupt: {type(exc).__name__}: {exc}") from None
        missing = sorted({t.storage.key for t in self._tensors.values()} - self._storage_offsets.keys())
        if missing:
            raise WeightsError(f"{where} is corrupt: storage {missing[0]!r} is used by a tensor but not stored")
        self._map = None

    def _check_state(self, state, where: str) -> None:
        """The unpickled object must be a dict of name -> tensor record; kept as ``self._tensors``. A storage key
        must be declared the same way (element type and length) by every tensor that uses it: the bounds checks
        rely on it."""
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, TensorRef) for k, v in state.items()
        ):
            raise WeightsError(
                f"{where} does not hold a state dict: expected a dict of name -> tensor, got {type(state).__name__}"
            )
        declared: dict[str, StorageRef] = {}
        for name, t in state.items():
            first = declared.setdefault(t.storage.key, t.storage)
            if first != t.storage:
                raise WeightsError(
                    f"{where} is corrupt: tensor {name!r} declares storage {t.storage.key!r} as "
                    f"{t.storage.numel} x {t.storage.type.name}, another tensor as {first.numel} x "
                    f"{first.type.name}"
                )
        self._tensors: dict[str, TensorRef] = dict(state)

    def _locate_storages(self, infos: dict[str, zipfile.ZipInfo], where: str) -> dict[str, int]:
        """storage key -> file offset of its bytes; checks each member is stored (not compressed) and long
        enough for the elements the pickle says it holds."""
        offsets: dict[str, int] = {}
        for name, t in self._tensors.items():
            s = t.storage
            if s.key in offsets:
                continue
            info = infos.get(f"{self.prefix}data/{s.key}")
            if info is None:
                raise WeightsError(
                    f"{where}: tensor {name!r} lives in storage {s.key!r}, but the archive has no "
                    f"member {self.prefix}data/{s.key}"
                )
            if info.compress_type != zipfile.ZIP_STORED:
                raise WeightsError(
                    f"{where}: storage member {info.filename!r} is compressed; torch.save stores "
                    f"members uncompressed, which is what lets them be memory-mapped"
                )
            need = s.numel * s.type.dtype.itemsize
            if info.file_size < need:
                raise WeightsError(
                    f"{where} is truncated: storage {s.key!r} of tensor {name!r} should hold "
                    f"{s.numel} elements ({need} bytes) but has {info.file_size} bytes"
                )
            try:
                offsets[s.key] = _member_data_offset(self.path, info)
            except _Error as exc:
                raise WeightsError(f"{where} is corrupt: {exc}") from None
            if offsets[s.key] + need > self.path.stat().st_size:
                raise WeightsError(
                    f"{where} is truncated: storage {s.key!r} of tensor {name!r} ends past the end of the file"
                )
        return offsets

    # The SafetensorsFile interface --------------------------------------------------------------------------------

    def keys(self):
        return self._tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].shape

    def st_dtype(self, key: str) -> str:
        return self._tensors[key].storage.type.tag

    def tensor_ref(self, key: str) -> TensorRef:
        return self._tensors[key]

    def is_contiguous(self, key: str) -> bool:
        return self._tensors[key].is_contiguous()

    def raw(self, key: str) -> np.ndarray:
        """The tensor as stored (BF16 as uint16 bits): a read-only strided view of the memory map, no copy."""
        t = self._tensors[key]
        dt = t.storage.type.dtype
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._storage_offsets[t.storage.key]
        storage = self._map[start : start + t.storage.numel * dt.itemsize].view(dt)  # [numel]
        if t.is_contiguous():
            n = math.prod(t.shape)
            return storage[t.offset : t.offset + n].reshape(t.shape)
        base = storage[t.offset :]
        reach = sum((n - 1) * s for n, s in zip(t.shape, t.stride)) + 1 if all(t.shape) else 0
        if reach > base.size:  # as_strided does not check bounds: make sure, whatever was checked before
            raise WeightsError(f"weights file {str(self.path)!r}: tensor {key!r} reaches past its storage")
        return np.lib.stride_tricks.as_strided(
            base, shape=t.shape, strides=[s * dt.itemsize for s in t.stride], writeable=False
        )

    def data_offset(self, key: str) -> int:
        """File offset of the first byte of a contiguous tensor (for chunked reads that bypass the memory map)."""
        t = self._tensors[key]
        return self._storage_offsets[t.storage.key] + t.offset * t.storage.type.dtype.itemsize

    def read_converted(self, key: str, storage: str) -> np.ndarray:
        """The tensor converted to ``storage``, into a new array: contiguous tensors with chunked file reads (the
        memory map untouched, as for safetensors), a strided view (rare: a transposed tied weight) from the map."""
        t = self._tensors[key]
        if t.is_contiguous():
            return read_converted_range(
                self.path, self.data_offset(key), t.storage.type.dtype, t.shape, t.storage.type.tag, storage, key
            )
        out = convert_storage(np.ascontiguousarray(self.raw(key)), t.storage.type.tag, storage)
        out = np.array(out, copy=True) if not out.flags.owndata else out
        out.flags.writeable = False
        return out
