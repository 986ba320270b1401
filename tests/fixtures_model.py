"""Test checkpoints: a transformers ``Kosmos2ForConditionalGeneration`` with seeded random weights, saved with
``save_pretrained`` so that our real loader reads the same folder transformers reads.

Every parameter is redrawn, LayerNorms included (weight ≈ 1 ± 0.2, bias ± 0.2): identity LayerNorms hide bugs.
Only the test suite imports this module (it needs torch and transformers).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np

# Tiny config: the real vocabulary layout (65037 ids) so real prompts and patch tokens fit, tiny widths.
TINY = {
    "text_config": {
        "vocab_size": 65037,
        "embed_dim": 32,
        "layers": 2,
        "ffn_dim": 64,
        "attention_heads": 4,
        "max_position_embeddings": 64,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 224,
        "patch_size": 14,
    },
    "latent_query_num": 64,
}
# Odd head counts and head dims, a different latent query count, a small image.
TINY_ODD = {
    "text_config": {
        "vocab_size": 65037,
        "embed_dim": 30,
        "layers": 3,
        "ffn_dim": 44,
        "attention_heads": 3,
        "max_position_embeddings": 32,
    },
    "vision_config": {
        "hidden_size": 35,
        "intermediate_size": 50,
        "num_hidden_layers": 3,
        "num_attention_heads": 5,
        "image_size": 56,
        "patch_size": 14,
    },
    "latent_query_num": 7,
}
FULL: dict = {}  # transformers' defaults are the released checkpoint's architecture


def hf_config(cfg: dict):
    from transformers import Kosmos2Config

    return Kosmos2Config(**copy.deepcopy(cfg))


def randomize_(model, seed: int) -> None:
    """Redraw every parameter of a torch model from a seeded generator (in place)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = any(s in name for s in ("layer_norm", "layernorm", "layrnorm", "_ln.", "ln."))
            if p.ndim == 1 and is_norm and leaf == "weight":
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.ndim == 2 else math.prod(p.shape[1:])
                std = 1.0 / math.sqrt(fan_in)
                if "embed_tokens" in name or "latent_query" in name or "position_embedding" in name:
                    std = 0.5
                p.copy_(std * torch.randn(p.shape, generator=g))


def build_hf_model(cfg: dict, seed: int = 0, attn_implementation: str = "eager"):
    """A randomised transformers model in eval mode."""
    import torch
    from transformers import Kosmos2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Kosmos2ForConditionalGeneration(hf_config(cfg))
    randomize_(model, seed)
    model.eval()
    model.set_attn_implementation(attn_implementation)
    return model


def build_lively_hf_model(seed: int = 0):
    """The TINY model with small token embeddings (std 0.05) and a 5× EOS embedding.

    With the fixtures' std-0.5 tied embeddings a tiny random model just repeats its last token; small embeddings
    let the blocks matter, so tokens vary, and the larger EOS row makes EOS win at different steps for different
    prompts (measured: after 14…27 tokens), so the EOS and pad-after-EOS paths are exercised.
    """
    import torch

    model = build_hf_model(TINY, seed=seed)
    with torch.no_grad():
        emb = model.text_model.model.embed_tokens.weight
        emb.copy_(0.05 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(5)))
        emb[2] *= 5.0
    return model


def save_checkpoint(model, folder: Path, max_shard_size=None) -> Path:
    folder = Path(folder)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    return folder


def save_bin_checkpoint(model, folder: Path, max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as transformers 4.x's ``save_pretrained(safe_serialization=False)`` did (5.x writes only
    safetensors): config.json, and torch.save of the whole state dict -- the tied head included, a second view of
    the embedding's storage -- in one pytorch_model.bin, or in shards pytorch_model-0000i-of-0000n.bin with a
    pytorch_model.bin.index.json."""
    import json

    import torch

    folder = Path(folder)
    model.save_pretrained(folder)  # config.json (+ generation_config.json) ...
    for f in folder.glob("*.safetensors*"):  # ... and no safetensors
        f.unlink()
    sd = model.state_dict()
    if max_shard_bytes is None:
        torch.save(sd, folder / "pytorch_model.bin")
        return folder
    shards, size = [{}], 0
    for k, v in sd.items():
        if shards[-1] and size + v.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, folder / name)
        weight_map.update({k: name for k in shard})
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(v.nbytes for v in sd.values())}, "weight_map": weight_map}, indent=2)
    )
    return folder


def image_prompt_ids(text_ids, num_image_tokens: int, bos: bool = True, first_image_token_id: int = 4):
    """The processor's layout (docs/numerics.md §10.1): <s> <image> [Q slots] </image> text; and the image mask."""
    ids = (
        ([0] if bos else [])
        + [64003]
        + list(range(first_image_token_id, first_image_token_id + num_image_tokens))
        + [64004]
        + list(text_ids)
    )
    mask = ([0] if bos else []) + [0] + [1] * num_image_tokens + [0] + [0] * len(text_ids)
    return ids, mask


def padded_batch(rows: list[tuple[list[int], list[int]]], side: str = "right", pad_id: int = 1):
    """Pad (ids, image mask) rows to one length: ids with pad_id, masks with 0. -> ids, attention, image mask."""
    T = max(len(r[0]) for r in rows)
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    att = np.zeros((len(rows), T), dtype=np.int64)
    img = np.zeros((len(rows), T), dtype=np.int64)
    for b, (r_ids, r_img) in enumerate(rows):
        n = len(r_ids)
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[b, sl], att[b, sl], img[b, sl] = r_ids, 1, r_img
    return ids, att, img


def generate_with_scores(model, pv, ids, att, img, **kw):
    """Our ``generate`` on one batch (pixel_values, input_ids, attention mask, image mask), returning its
    ``GenerateOutput`` with the processed scores of every step (what the parity tests compare)."""
    from kosmos2_ref import generate

    return generate(
        model,
        pixel_values=pv,
        input_ids=ids,
        attention_mask=att,
        image_embeds_position_mask=img,
        return_dict_in_generate=True,
        output_scores=True,
        **kw,
    )


def check(name: str, ours, ref, tol: float = 1e-5, scale_floor: float = 1.0):
    """Compare two arrays like llm.c's ``check_tensor``: print max |Δ| and assert it is within ``tol`` × the
    reference's scale (max |ref|, at least ``scale_floor``)."""
    from kosmos2_ref.backend import to_numpy

    ours = np.asarray(to_numpy(ours), dtype=np.float64)
    ref = np.asarray(ref.detach().cpu().numpy() if hasattr(ref, "detach") else ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != reference {ref.shape}"
    err = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, scale_floor)
    print(f"  {name:<42s} max|Δ| = {err:.3e}   scale {scale:.3e}   rel {err / scale:.3e}   (tol {tol:.0e})")
    assert np.all(np.isfinite(ours)), f"{name}: non-finite values"
    assert err <= tol * scale, f"{name}: max|Δ| {err:.3e} > {tol:.0e} × scale {scale:.3e}"
    return err
