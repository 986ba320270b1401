"""The checkpoint loader: sharded files, storage dtypes, bfloat16 files without torch, and every bad checkpoint
getting a clear error that names the file and the key."""

from __future__ import annotations

import json
import shutil

import fixtures_model as fm
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from kosmos2_ref import Kosmos2
from kosmos2_ref.config import ConfigError
from kosmos2_ref.hub import CheckpointNotFoundError
from kosmos2_ref.weights import (
    WeightsError,
    bf16_bits_to_float32,
    expected_shapes,
    flatten,
    float32_to_bf16_bits,
    unflatten,
)

TOL = 1e-5


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint folder, free to damage."""
    src, _ = tiny_checkpoint
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _inputs(seed=0):
    ids, img = fm.image_prompt_ids([712, 1648, 9, 10, 43867], 64)
    pv = np.random.default_rng(seed).standard_normal((1, 3, 224, 224)).astype(np.float32)
    return pv, np.array([ids]), np.array([img])


def _logits(model, pv, ids, img):
    return model(pixel_values=pv, input_ids=ids, image_embeds_position_mask=img).logits


def _hf_logits(hf, pv, ids, img):
    with torch.no_grad():
        return hf(
            pixel_values=torch.from_numpy(pv),
            input_ids=torch.from_numpy(ids),
            image_embeds_position_mask=torch.from_numpy(img),
        ).logits


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        Kosmos2.from_pretrained(tmp_path / "nope")
    assert issubclass(CheckpointNotFoundError, ValueError)


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        Kosmos2.from_pretrained(tmp_path)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json.*not valid JSON"):
        Kosmos2.from_pretrained(ckpt)


def test_config_bad_value(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["attention_heads"] = 5  # 32 is not divisible by 5
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"embed_dim=32 is not divisible by attention_heads=5"):
        Kosmos2.from_pretrained(ckpt)


def test_config_bad_typed_value_names_the_file(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["pad_token_id"] = 999999  # would shift every position silently: must be a real id
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError,
        match=r"config\.json: text_config\.pad_token_id must be a token id, an integer in "
        r"\[0, 65036\] \(below vocab_size\), got 999999",
    ):
        Kosmos2.from_pretrained(ckpt)


@pytest.mark.parametrize(
    "text, msg",
    [
        ("[1]", r"generation_config\.json: expected a JSON object of generation settings, got a JSON list"),
        ("{oops", r"generation_config\.json: not valid JSON"),
    ],
)
def test_generation_config_not_an_object(ckpt, text, msg):
    (ckpt / "generation_config.json").write_text(text)
    with pytest.raises(ConfigError, match=msg):
        Kosmos2.from_pretrained(ckpt)


def test_missing_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(
        WeightsError,
        match=r"has no weights: expected one of model\.safetensors, "
        r"model\.safetensors\.index\.json, pytorch_model\.bin, "
        r"pytorch_model\.bin\.index\.json",
    ):
        Kosmos2.from_pretrained(ckpt)


def test_truncated_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors' is truncated: key '[\w.]+' needs bytes"):
        Kosmos2.from_pretrained(ckpt)


def test_file_too_short(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(WeightsError, match=r"model\.safetensors' is truncated or not safetensors"):
        Kosmos2.from_pretrained(ckpt)


def test_corrupt_header(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"#not-json!!!"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"model\.safetensors' is corrupt: its header is not valid JSON"):
        Kosmos2.from_pretrained(ckpt)


def test_not_a_safetensors_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 10)
    with pytest.raises(WeightsError, match=r"model\.safetensors' is truncated or not safetensors: header length"):
        Kosmos2.from_pretrained(ckpt)


def test_missing_key(ckpt):
    path = ckpt / "model.safetensors"
    flat = load_file(path)
    del flat["text_model.model.layers.1.ffn.fc2.bias"]
    save_file(flat, path)
    with pytest.raises(WeightsError, match=r"missing key 'text_model\.model\.layers\.1\.ffn\.fc2\.bias'"):
        Kosmos2.from_pretrained(ckpt)


def test_unexpected_key_warns_and_loads(ckpt):
    path = ckpt / "model.safetensors"
    flat = load_file(path)
    flat["text_model.model.layers.0.self_attn_sope.scale"] = np.ones(3, np.float32)
    save_file(flat, path)
    with pytest.warns(UserWarning, match=r"unexpected key.*self_attn_sope\.scale"):
        Kosmos2.from_pretrained(ckpt)


def test_shape_mismatch(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["ffn_dim"] = 48
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        WeightsError,
        match=r"model\.safetensors': key 'text_model\.model\.layers\.0\.ffn\.[\w.]+' has "
        r"shape \[64(, 32)?\], but config\.json implies \[48(, 32)?\]",
    ):
        Kosmos2.from_pretrained(ckpt)


def test_unknown_dtype_argument(ckpt):
    with pytest.raises(ValueError, match=r"dtype='int8' is not supported"):
        Kosmos2.from_pretrained(ckpt, dtype="int8")


def test_key_set_matches_transformers(tiny_checkpoint):
    """Our expected key set and shapes are exactly transformers' state dict (lm_head tied, not stored)."""
    folder, hf = tiny_checkpoint
    model = Kosmos2.from_pretrained(folder)
    ref = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "text_model.lm_head.weight"}
    assert expected_shapes(model.config) == ref
    assert "text_model.lm_head.weight" not in load_file(folder / "model.safetensors")


def test_full_config_key_count_and_parameters():
    """docs/numerics.md §8: 886 keys with the tied head (885 stored), 1,664,485,376 unique parameters."""
    from kosmos2_ref.config import Kosmos2Config

    shapes = expected_shapes(Kosmos2Config())
    assert len(shapes) == 885
    assert sum(int(np.prod(s)) for s in shapes.values()) == 1_664_485_376


def test_sharded_checkpoint(tiny_checkpoint, tmp_path):
    folder, hf = tiny_checkpoint
    sharded = fm.save_checkpoint(hf, tmp_path / "sharded", max_shard_size="3MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    pv, ids, img = _inputs()
    a = _logits(Kosmos2.from_pretrained(sharded), pv, ids, img)
    b = _logits(Kosmos2.from_pretrained(folder), pv, ids, img)
    assert np.array_equal(a, b)


def test_sharded_index_pointing_to_wrong_file(tiny_checkpoint, tmp_path):
    _, hf = tiny_checkpoint
    sharded = fm.save_checkpoint(hf, tmp_path / "sharded", max_shard_size="3MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    key = next(k for k, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][key] = files[1]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=rf"says key '{key}' is in '{files[1]}', but that file has no such key"):
        Kosmos2.from_pretrained(sharded)


@pytest.mark.parametrize("weight_map", [["x"], {"text_model.model.layer_norm.weight": 3}])
def test_sharded_index_weight_map_not_an_object(tiny_checkpoint, tmp_path, weight_map):
    _, hf = tiny_checkpoint
    sharded = fm.save_checkpoint(hf, tmp_path / "sharded", max_shard_size="3MB")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        WeightsError,
        match=r"index\.json' is corrupt: its 'weight_map' must be a JSON object mapping "
        r"each weight name to a shard file name",
    ):
        Kosmos2.from_pretrained(sharded)


def test_sharded_missing_shard(tiny_checkpoint, tmp_path):
    _, hf = tiny_checkpoint
    sharded = fm.save_checkpoint(hf, tmp_path / "sharded", max_shard_size="3MB")
    victim = sorted(sharded.glob("model-*-of-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(WeightsError, match=rf"weights file '.*{victim.name}' does not exist"):
        Kosmos2.from_pretrained(sharded)


def test_float32_storage_is_memory_mapped(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    model = Kosmos2.from_pretrained(folder)
    w = model.params["text_model"]["model"]["embed_tokens"]["weight"]
    assert w.dtype == np.float32 and not w.flags.owndata and not w.flags.writeable  # a view of the file map


def test_converted_storage_does_not_keep_the_file_mapped(tiny_checkpoint):
    """A 2-byte load of a float32 file reads and converts with file reads: the matrices own their memory (the file
    map would otherwise keep all 4-byte pages resident beside the 2-byte copy)."""
    folder, _ = tiny_checkpoint
    model = Kosmos2.from_pretrained(folder, dtype="bfloat16")
    for key, w in flatten(model.params).items():
        if w.ndim >= 2:
            assert w.dtype == np.uint16 and w.flags.owndata, key
            assert not w.flags.writeable, key  # read-only, like the memory-mapped views


def test_bf16_bits_round_trip_and_rounding():
    x = np.array([1.0, -2.5, 3.14159, 1e-30, 65504.0, np.inf, -np.inf, 1.00390625, 1.01171875], np.float32)
    ref = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(bf16_bits_to_float32(float32_to_bf16_bits(x)), ref)  # nearest-even like torch
    assert np.isnan(bf16_bits_to_float32(float32_to_bf16_bits(np.array([np.nan], np.float32))))[0]


@pytest.mark.parametrize("path", ["whole", "blocks"])
@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_two_byte_storage_matches_transformers_with_rounded_weights(tiny_checkpoint, storage, path, monkeypatch):
    """dtype=float16/bfloat16 stores matrices in 2 bytes and computes in float32: equal to transformers run in
    float32 on the same rounded matrices (vectors stay float32 on our side, so they are kept exact there too).

    "blocks" shrinks the block sizes so the tiny model takes the full-size path: the file converted a few hundred
    bytes at a time, and every matrix widened a few rows at a time. The model runs twice: for float16 the second run
    takes the products that skip the inf/NaN check (matrices seen finite, fast.linear_upcast_blocks)."""
    from kosmos2_ref import fast
    from kosmos2_ref import storage as storage_module

    if path == "blocks":
        monkeypatch.setattr(storage_module, "CONVERT_CHUNK_BYTES", 1000)
        monkeypatch.setattr(fast, "UPCAST_MIN_SIZE", 0)
        monkeypatch.setattr(fast, "UPCAST_BLOCK_BYTES", 4 * 64 * 3)
        monkeypatch.setattr(fast, "UPCAST_BLOCK_BYTES_MANY_ROWS", 4 * 64 * 7)
    folder, hf = tiny_checkpoint
    ours = Kosmos2.from_pretrained(folder, dtype=storage)
    w = ours.params["text_model"]["model"]["layers"][0]["ffn"]["fc1"]["weight"]
    assert w.dtype == (np.float16 if storage == "float16" else np.uint16)
    assert ours.params["text_model"]["model"]["layers"][0]["ffn"]["fc1"]["bias"].dtype == np.float32
    tdt = torch.float16 if storage == "float16" else torch.bfloat16
    import copy

    rounded = copy.deepcopy(hf)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim >= 2:
                p.copy_(p.to(tdt).to(torch.float32))
    pv, ids, img = _inputs(3)
    print()
    ref = _hf_logits(rounded, pv, ids, img)
    fm.check(f"logits, {storage} storage vs rounded reference", _logits(ours, pv, ids, img), ref, TOL)
    fm.check(f"logits, {storage} storage vs rounded reference, second run", _logits(ours, pv, ids, img), ref, TOL)
    full = _hf_logits(hf, pv, ids, img)
    err = np.abs(_logits(ours, pv, ids, img) - full.numpy()).max()
    print(f"  logits, {storage} storage vs float32 reference: max|Δ| = {err:.3e} (the storage rounding itself)")


@pytest.mark.parametrize("file_dtype", ["bfloat16", "float16"])
def test_two_byte_files_load_without_torch(tiny_checkpoint, tmp_path, file_dtype):
    """A checkpoint saved in bfloat16/float16 loads (float32 storage) and equals transformers on it in float32."""
    _, hf = tiny_checkpoint
    import copy

    tdt = getattr(torch, file_dtype)
    low = copy.deepcopy(hf).to(tdt)
    folder = fm.save_checkpoint(low, tmp_path / file_dtype)
    st = json.loads(
        (folder / "model.safetensors").read_bytes()[
            8 : 8 + int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
        ]
    )
    assert st["text_model.model.embed_tokens.weight"]["dtype"] == ("BF16" if file_dtype == "bfloat16" else "F16")
    from transformers import Kosmos2ForConditionalGeneration

    # transformers reads the same 2-byte file back in float32 (a fresh float32 sinusoid table, unlike .to())
    ref_model = Kosmos2ForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    pv, ids, img = _inputs(4)
    for storage in ("float32", file_dtype):
        ours = Kosmos2.from_pretrained(folder, dtype=storage)
        print()
        fm.check(
            f"logits, {file_dtype} file, {storage} storage",
            _logits(ours, pv, ids, img),
            _hf_logits(ref_model, pv, ids, img),
            TOL,
        )


def test_tree_round_trip():
    flat = {"a.b.0.c": 1, "a.b.1.c": 2, "a.d": 3, "e": 4}
    tree = unflatten(flat)
    assert tree == {"a": {"b": [{"c": 1}, {"c": 2}], "d": 3}, "e": 4}
    assert flatten(tree) == flat


# ---------------------------------------------------------------------------------------------------------------
# The header's byte ranges must tile the data section exactly, as the safetensors library requires


def _rewrite_header(path, edit):
    """Rewrite ``path``'s JSON header with ``edit(header)``; the data section is kept byte for byte."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def _two_biases(header):
    """Two keys of the same small shape, in header order, with their entries."""
    a, b = "text_model.model.layers.0.ffn.fc1.bias", "text_model.model.layers.1.ffn.fc1.bias"
    return header[a], header[b], a, b


def test_overlapping_tensors_are_refused(ckpt):
    """Two tensors sharing bytes: safetensors refuses the file (InvalidOffset); so do we, naming file and key."""

    def overlap(h):
        ea, eb, _, _ = _two_biases(h)
        eb["data_offsets"] = list(ea["data_offsets"])  # the second bias reads the first one's bytes

    _rewrite_header(ckpt / "model.safetensors", overlap)
    with pytest.raises(Exception, match="invalid offset"):  # what the safetensors library itself says
        load_file(ckpt / "model.safetensors")
    with pytest.raises(WeightsError, match=r"model\.safetensors' is corrupt: key '[\w.]+' .*overlap"):
        Kosmos2.from_pretrained(ckpt)


def test_gap_after_the_last_tensor_is_refused(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 16)  # 16 bytes no tensor accounts for
    with pytest.raises(WeightsError, match=r"model\.safetensors' is corrupt: .*16 byte\(s\) after the last tensor"):
        Kosmos2.from_pretrained(ckpt)


@pytest.mark.parametrize("offsets", [[0.0, 256.0], ["0", "256"], [0, None], [True, 256], [0]])
def test_data_offsets_must_be_two_integers(ckpt, offsets):
    def bad(h):
        next(v for k, v in h.items() if k != "__metadata__")["data_offsets"] = offsets

    _rewrite_header(ckpt / "model.safetensors", bad)
    with pytest.raises(
        WeightsError,
        match=r"model\.safetensors' is corrupt: key '[\w.]+' has data_offsets .* "
        r"expected two integers",
    ):
        Kosmos2.from_pretrained(ckpt)
