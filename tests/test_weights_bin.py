"""PyTorch ``.bin`` checkpoints read without torch (kosmos2_ref.torch_pickle): every tensor bit for bit equal to
what torch saved, whole checkpoints equal to their safetensors load, and a malicious pickle refused unrun.

torch writes every file here (``torch.save``, transformers' ``save_pretrained(safe_serialization=False)``); our
reader never imports it, which the subprocess test proves by making ``import torch`` fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import fixtures_model as fm
import numpy as np
import pytest
import torch

from kosmos2_ref import Kosmos2
from kosmos2_ref.config import Kosmos2Config
from kosmos2_ref.torch_pickle import TorchBinFile
from kosmos2_ref.weights import WeightsError, load_flat

REPO_ROOT = Path(__file__).resolve().parents[1]


def _bits(t: torch.Tensor) -> np.ndarray:
    """A torch tensor's exact bits as NumPy (bfloat16 as uint16, as our reader holds it)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _same_bits(ours: np.ndarray, ref: torch.Tensor) -> bool:
    want = _bits(ref)
    return (
        ours.shape == want.shape
        and ours.dtype == want.dtype
        and np.array_equal(np.ascontiguousarray(ours).view(np.uint8), np.ascontiguousarray(want).view(np.uint8))
    )


# ---------------------------------------------------------------------------------------------------------------
# Single tensors: dtypes, shared storages, strided views


def _tensor_zoo() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    half = torch.randn(5, 7, generator=g).half()
    bf = torch.randn(9, 4, generator=g).bfloat16()
    return {
        "f32": base,
        "f32.transposed": base.t(),  # shares base's storage, strides (1, 10)
        "f32.block": base[2:5, 3:9],  # offset 23, strides (10, 1)
        "f32.every_other": base[:, ::2],  # strides (10, 2)
        "f32.row": base[4],  # a contiguous slice at an offset
        "f16": half,
        "f16.transposed": half.t(),
        "bf16": bf,
        "bf16.block": bf[1:8:3, 1:],
        "f64": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "i64": torch.arange(7),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(2, 3, generator=g)),  # saved through _rebuild_parameter
    }


def test_every_tensor_bit_for_bit(tmp_path):
    zoo = _tensor_zoo()
    path = tmp_path / "zoo.bin"
    torch.save(zoo, path)
    f = TorchBinFile(path)
    assert list(f.keys()) == list(zoo)
    for key, t in zoo.items():
        assert _same_bits(f.raw(key), t), key
        assert f.shape(key) == tuple(t.shape), key
    assert not f.raw("f32").flags.writeable  # weights are read-only
    assert np.shares_memory(f.raw("f32"), f.raw("f32.transposed"))  # one storage, one mapping
    assert f.st_dtype("bf16") == "BF16" and f.raw("bf16").dtype == np.uint16


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
def test_converted_reads_equal_torch_conversion(tmp_path, storage):
    """read_converted (chunked file reads, or the strided view) gives the bits torch's own .to() gives."""
    zoo = {k: v for k, v in _tensor_zoo().items() if v.is_floating_point() and v.dtype != torch.float64}
    torch.save(zoo, tmp_path / "zoo.bin")
    f = TorchBinFile(tmp_path / "zoo.bin")
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[storage]
    for key, t in zoo.items():
        if t.dtype == torch.float16 and storage == "bfloat16":
            ref = t.float().to(tdt)  # float16 -> bfloat16 goes through float32 here, as in weights.py
        else:
            ref = t.to(tdt)
        assert _same_bits(f.read_converted(key, storage), ref), (key, storage)


# ---------------------------------------------------------------------------------------------------------------
# Whole checkpoints saved as .bin


@pytest.fixture(scope="module")
def saved_pair(tiny_checkpoint, tmp_path_factory):
    """The tiny model saved twice, as safetensors (save_pretrained) and as .bin (torch.save), in fp32/fp16/bf16."""
    _, hf = tiny_checkpoint
    import copy

    root = tmp_path_factory.mktemp("bin_pairs")
    out = {}
    for name, tdt in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        model = copy.deepcopy(hf).to(tdt)
        st = root / f"{name}-st"
        model.save_pretrained(st, safe_serialization=True)
        pt = fm.save_bin_checkpoint(model, root / f"{name}-bin")
        sharded = fm.save_bin_checkpoint(
            model, root / f"{name}-bin-sharded", max_shard_bytes=2_000_000 // model.dtype.itemsize
        )
        out[name] = (st, pt, sharded)
    return out


@pytest.mark.parametrize("file_dtype", ["float32", "float16", "bfloat16"])
def test_bin_checkpoint_equals_safetensors_bit_for_bit(saved_pair, file_dtype):
    st, pt, sharded = saved_pair[file_dtype]
    assert (pt / "pytorch_model.bin").is_file() and not (pt / "model.safetensors").exists()
    assert (sharded / "pytorch_model.bin.index.json").is_file()
    shards = set(json.loads((sharded / "pytorch_model.bin.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1, shards
    cfg = Kosmos2Config.from_pretrained(st)
    for storage in ("float32", file_dtype):
        ref = load_flat(st, cfg, storage)
        for folder in (pt, sharded):
            ours = load_flat(folder, cfg, storage)
            assert ours.keys() == ref.keys()
            for k in ref:
                assert ours[k].dtype == ref[k].dtype and np.array_equal(
                    ours[k].view(np.uint8), ref[k].view(np.uint8)
                ), (folder.name, k)
    print(f"\n  {file_dtype}: {len(ref)} tensors equal bit for bit (single .bin and {len(shards)} shards)")


def test_bin_model_matches_transformers(saved_pair):
    """The .bin folder through the whole model: logits equal transformers' on the same folder."""
    from transformers import Kosmos2ForConditionalGeneration

    _, pt, _ = saved_pair["float32"]
    ref_model = Kosmos2ForConditionalGeneration.from_pretrained(pt, attn_implementation="eager").eval()
    ids, img = fm.image_prompt_ids([712, 1648, 9, 10, 43867], 64)
    pv = np.random.default_rng(5).standard_normal((1, 3, 224, 224)).astype(np.float32)
    ours = Kosmos2.from_pretrained(pt)(
        pixel_values=pv, input_ids=np.array([ids]), image_embeds_position_mask=np.array([img])
    ).logits
    with torch.no_grad():
        ref = ref_model(
            pixel_values=torch.from_numpy(pv),
            input_ids=torch.tensor([ids]),
            image_embeds_position_mask=torch.tensor([img]),
        ).logits
    print()
    fm.check("logits, pytorch_model.bin", ours, ref, 1e-5)


_NO_TORCH = """
import hashlib, sys
sys.modules["torch"] = None            # `import torch` now raises ImportError, as where torch is not installed
sys.modules["transformers"] = None
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch is importable")
from kosmos2_ref.config import Kosmos2Config
from kosmos2_ref.weights import load_flat
folder, storage = sys.argv[1], sys.argv[2]
flat = load_flat(folder, Kosmos2Config.from_pretrained(folder), storage)
for k in sorted(flat):
    print(k, flat[k].dtype, hashlib.sha256(flat[k].tobytes()).hexdigest())
print("torch loaded:", "torch" in sys.modules and sys.modules["torch"] is not None)
"""


@pytest.mark.parametrize(
    "file_dtype, which", [("float32", "single"), ("float16", "single"), ("bfloat16", "single"), ("bfloat16", "sharded")]
)
def test_bin_loads_where_torch_cannot_be_imported(saved_pair, file_dtype, which):
    st, pt, sharded = saved_pair[file_dtype]
    folder = pt if which == "single" else sharded
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(folder), file_dtype],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "torch loaded: False"
    import hashlib

    ref = load_flat(st, Kosmos2Config.from_pretrained(st), file_dtype)
    want = [f"{k} {ref[k].dtype} {hashlib.sha256(ref[k].tobytes()).hexdigest()}" for k in sorted(ref)]
    assert lines[:-1] == want
    print(f"\n  {which} {file_dtype} .bin without torch: {len(want)} tensors, sha256 equal to the safetensors load")


def test_safetensors_preferred_when_both_exist(saved_pair, tmp_path):
    st, pt, _ = saved_pair["float32"]
    both = tmp_path / "both"
    shutil.copytree(st, both)
    (both / "pytorch_model.bin").write_bytes(b"not even a zip")  # never opened
    cfg = Kosmos2Config.from_pretrained(st)
    ref = load_flat(st, cfg)
    assert all(np.array_equal(v, ref[k]) for k, v in load_flat(both, cfg).items())


def test_transformers_4x_bin_with_both_tied_keys(saved_pair, tmp_path):
    """transformers 4.x wrote the tied head into .bin files as a second view of the embedding's storage."""
    st, pt, _ = saved_pair["float32"]
    folder = tmp_path / "tied"
    shutil.copytree(pt, folder)
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    sd["text_model.lm_head.weight"] = sd["text_model.model.embed_tokens.weight"]  # same storage
    sd["text_model.model.embed_positions.weights"] = torch.zeros(3, 32)  # a derived buffer
    torch.save(sd, folder / "pytorch_model.bin")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither key deserves a warning
        flat = load_flat(folder, Kosmos2Config.from_pretrained(folder))
    assert "text_model.lm_head.weight" not in flat


# ---------------------------------------------------------------------------------------------------------------
# Files we refuse, and the malicious pickle


class _RunsACommand:
    """Pickles as a call to os.system: unpickling it with the standard unpickler runs the command."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _malicious_bin(path: Path, marker: Path) -> Path:
    """A real torch.save zip whose state dict holds, next to a genuine tensor, an object that runs a command."""
    torch.save({"text_model.model.layer_norm.weight": torch.ones(4), "evil": _RunsACommand(f"touch {marker}")}, path)
    return path


def test_the_malicious_file_is_really_malicious(tmp_path):
    """Control: torch.load without weights_only runs the command, so the refusal below is meaningful."""
    marker = tmp_path / "ran"
    path = _malicious_bin(tmp_path / "evil.bin", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_malicious_pickle_is_refused_and_nothing_runs(tiny_checkpoint, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(tiny_checkpoint[0] / "config.json", folder)
    marker = tmp_path / "ran"
    _malicious_bin(folder / "pytorch_model.bin", marker)
    with pytest.raises(
        WeightsError,
        match=r"pytorch_model\.bin': its pickle names (posix|os)\.system, which a "
        r"PyTorch state dict never needs; refusing to load it",
    ):
        Kosmos2.from_pretrained(folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    "module, name",
    [
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("subprocess", "Popen"),
        ("torch", "load"),
        ("torch._utils", "_rebuild_device_tensor_from_numpy"),
        ("collections", "namedtuple"),
    ],
)
def test_any_other_global_is_refused(tmp_path, module, name):
    # PROTO 2; GLOBAL module name; the string "code"; TUPLE1; REDUCE (call it); STOP -- hand-assembled opcodes
    body = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x04\x00\x00\x00code\x85R."
    path = tmp_path / "g.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", body)
    with pytest.raises(WeightsError, match=rf"its pickle names {module}\.{name}, which"):
        TorchBinFile(path)


def _rewrite_pickle(path, edit):
    """Rewrite the data.pkl member of a torch.save zip with ``edit(bytes) -> bytes``, the rest kept."""
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = edit(members[pkl])
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)


def test_a_record_changed_after_its_checks_is_refused(tmp_path):
    """BUILD (set state) on a tensor record would change its offset after the bounds check: refused."""
    path = tmp_path / "b.bin"
    torch.save({"w": torch.ones(10)}, path)
    # before the dict's SETITEM(S), BUILD the tensor with {"offset": 10**6}: EMPTY_DICT, "offset", int, SETITEM, BUILD
    evil = b"}X\x06\x00\x00\x00offsetJ@B\x0f\x00sb"
    _rewrite_pickle(
        path, lambda p: p.replace(b"R.", b"R" + evil + b".", 1) if p.endswith(b"R.") else p[:-2] + evil + p[-2:]
    )
    with pytest.raises(WeightsError, match=r"tries to change a tensor or storage record after building it"):
        TorchBinFile(path)


def test_one_storage_declared_twice_differently_is_refused(tmp_path):
    """Two tensors naming storage '0' with different element types would defeat the size check of the second."""
    path = tmp_path / "d.bin"
    torch.save({"a": torch.ones(10), "b": torch.ones(10, dtype=torch.float64)}, path)
    # make the float64 tensor claim storage '0' (the float32 one's, 40 bytes) instead of its own '1'
    _rewrite_pickle(path, lambda p: p.replace(b"X\x01\x00\x00\x001", b"X\x01\x00\x00\x000", 1))
    with pytest.raises(
        WeightsError,
        match=r"declares storage '0' as 10 x (Double|Float)Storage, another tensor as "
        r"10 x (Float|Double)Storage",
    ):
        TorchBinFile(path)


def test_legacy_format_bit_for_bit(tmp_path):
    """torch's legacy (pre-1.6) format: pickles then raw storages, read the same way, every tensor equal."""
    zoo = _tensor_zoo()
    path = tmp_path / "old.bin"
    torch.save(zoo, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    f = TorchBinFile(path)
    for key, t in zoo.items():
        assert _same_bits(f.raw(key), t), key
    assert np.shares_memory(f.raw("f32"), f.raw("f32.transposed"))


def test_legacy_format_checkpoint_loads(saved_pair, tmp_path):
    st, pt, _ = saved_pair["bfloat16"]
    folder = tmp_path / "legacy"
    shutil.copytree(pt, folder)
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save(sd, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    cfg = Kosmos2Config.from_pretrained(st)
    ref, ours = load_flat(st, cfg, "bfloat16"), load_flat(folder, cfg, "bfloat16")
    assert all(np.array_equal(ours[k], ref[k]) for k in ref)


def test_legacy_format_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.bin"
    torch.save(
        {"w": torch.ones(2), "evil": _RunsACommand(f"touch {marker}")}, path, _use_new_zipfile_serialization=False
    )
    with pytest.raises(WeightsError, match=r"its pickle names (posix|os)\.system"):
        TorchBinFile(path)
    assert not marker.exists()


def test_a_short_malicious_pickle_is_not_run_by_the_format_sniffing(tmp_path):
    """A file that is not a zip is first unpickled to see whether it is the legacy format: that look is restricted
    too (this 27-byte pickle calls os.system)."""
    marker = tmp_path / "ran"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    path = tmp_path / "short.bin"
    path.write_bytes(payload)
    with pytest.raises(WeightsError, match=r"is not a PyTorch checkpoint"):
        TorchBinFile(path)
    assert not marker.exists()


def test_truncated_legacy_file(tmp_path):
    path = tmp_path / "t.bin"
    torch.save({"w": torch.ones(1000)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=r"t\.bin' is truncated: storage '\w+' \(1000 elements\) ends past"):
        TorchBinFile(path)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"hello, this is not a checkpoint" * 4)
    with pytest.raises(WeightsError, match=r"x\.bin' is not a PyTorch checkpoint: expected a zip archive"):
        TorchBinFile(path)


def test_truncated_bin(tmp_path):
    path = tmp_path / "t.bin"
    torch.save({"w": torch.ones(1000)}, path)
    data = path.read_bytes()
    # cut a storage member short, keeping a valid zip: rewrite it with fewer bytes than the pickle claims
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    key = next(n for n in members if n.endswith("/data/0"))
    members[key] = members[key][:100]
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(
        WeightsError,
        match=r"t\.bin' is truncated: storage '0' of tensor 'w' should hold 1000 "
        r"elements \(4000 bytes\) but has 100 bytes",
    ):
        TorchBinFile(path)
    assert len(data) > 4000


def test_compressed_member_is_refused(tmp_path):
    path = tmp_path / "c.bin"
    torch.save({"w": torch.ones(1000)}, path)
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(WeightsError, match=r"storage member '[\w/]+data/0' is compressed"):
        TorchBinFile(path)


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    path = tmp_path / "s.bin"
    torch.save({"w": torch.ones(10)}, path)
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    # the size (10,) is pickled as BININT1 10 then TUPLE1; claim 11 elements instead
    members[pkl] = members[pkl].replace(b"K\n\x85", b"K\x0b\x85", 1)
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(WeightsError, match=r"reaches element 10 of storage '0', which holds 10"):
        TorchBinFile(path)


def test_bin_storage_is_memory_mapped_not_copied(saved_pair):
    """float32 weights of a float32 .bin are views of the file map (no copy); a 2-byte load converts with file
    reads and owns its memory, as for safetensors."""
    _, pt, _ = saved_pair["float32"]
    model = Kosmos2.from_pretrained(pt)
    w = model.params["text_model"]["model"]["embed_tokens"]["weight"]
    assert w.dtype == np.float32 and not w.flags.owndata and not w.flags.writeable
    base = w
    while getattr(base, "base", None) is not None:
        base = base.base
    assert isinstance(base, __import__("mmap").mmap)  # the mapped file itself
    low = Kosmos2.from_pretrained(pt, dtype="bfloat16")
    w = low.params["text_model"]["model"]["layers"][0]["ffn"]["fc1"]["weight"]
    assert w.dtype == np.uint16 and w.flags.owndata and not w.flags.writeable
