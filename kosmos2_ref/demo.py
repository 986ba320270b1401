"""A small Kosmos-2 checkpoint with seeded random weights, for trying the pipeline where the real weights are not.

``demo_checkpoint()`` returns a folder holding ``config.json`` (the real 65037-id vocabulary layout, 224-pixel
images in 14-pixel patches, 64 latent queries, tiny widths), ``model.safetensors`` (random, built with NumPy only,
about 9 MB: the 65037-row embedding is most of it), ``generation_config.json`` and the processor files written by
``Kosmos2Processor.save_pretrained`` from the real tokenizer packaged in ``kosmos2_ref/assets``. Its captions and
boxes are noise; it runs the same code path as the real model in a fraction of a second.

It is built once into ``$KOSMOS2_REF_CACHE`` (else ``$XDG_CACHE_HOME/kosmos2_ref``, else ``~/.cache/kosmos2_ref``)
as ``demo-tiny-<version>``, written in a temporary folder and renamed into place, so an interrupted or concurrent
build never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .config import Kosmos2Config
from .processing import Kosmos2Processor
from .version import __version__
from .weights import expected_shapes, save_safetensors

DEMO_SEED = 2023
# Bump when the recipe changes, so caches built by an older recipe are rebuilt, not reused.
DEMO_RECIPE = 1
DEMO_CONFIG = {
    "text_config": {
        "vocab_size": 65037,
        "embed_dim": 32,
        "layers": 2,
        "ffn_dim": 64,
        "attention_heads": 4,
        "max_position_embeddings": 2048,
        "no_repeat_ngram_size": 3,
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
GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
MARKER = "kosmos2_ref_demo.json"  # names the recipe; its presence also says "random weights"


def cache_root() -> Path:
    """``$KOSMOS2_REF_CACHE``, else ``$XDG_CACHE_HOME/kosmos2_ref``, else ``~/.cache/kosmos2_ref``."""
    if os.environ.get("KOSMOS2_REF_CACHE"):
        return Path(os.environ["KOSMOS2_REF_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "kosmos2_ref"


def _marker() -> dict:
    return {
        "random_weights": True,
        "recipe": DEMO_RECIPE,
        "seed": DEMO_SEED,
        "kosmos2_ref": __version__,
        "note": "seeded random weights: a demo of the pipeline, not of the model; its outputs are noise",
    }


def is_demo_checkpoint(folder) -> bool:
    """Whether ``folder`` is a random-weight demo checkpoint built here."""
    return folder is not None and (Path(folder) / MARKER).is_file()


def random_weights(cfg: Kosmos2Config, seed: int = DEMO_SEED) -> dict[str, np.ndarray]:
    """Every weight of ``cfg`` drawn from a seeded generator, float32, named by the checkpoint keys.

    LayerNorm weights are 1 ± 0.2 and vectors ± 0.2 (not 1 and 0: identity LayerNorms hide bugs); matrices have
    std 1/√fan_in; the token embedding, latent queries and position embedding std 0.5, so the tied LM head and
    the connector produce logits of a useful spread.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            norm = any(s in key for s in ("layer_norm", "layernorm", "layrnorm", "_ln."))
            centre = 1.0 if norm and key.endswith(".weight") else 0.0
            a = centre + 0.2 * rng.standard_normal(shape, dtype=np.float32)
        else:
            fan_in = math.prod(shape[1:])
            std = (
                0.5
                if any(s in key for s in ("embed_tokens", "latent_query", "position_embedding"))
                else 1.0 / math.sqrt(fan_in)
            )
            a = std * rng.standard_normal(shape, dtype=np.float32)
        flat[key] = a.astype(np.float32, copy=False)
    return flat


def build_demo_checkpoint(folder: str | Path, seed: int = DEMO_SEED) -> Path:
    """Write the demo checkpoint (weights, config, generation config, processor files) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = Kosmos2Config.from_dict(json.loads(json.dumps(DEMO_CONFIG)))
    save_safetensors(
        random_weights(cfg, seed), folder / "model.safetensors", metadata={"kosmos2_ref_demo": "random weights"}
    )
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    Kosmos2Processor.default().save_pretrained(folder)
    (folder / MARKER).write_text(json.dumps({**_marker(), "seed": seed}, indent=2) + "\n")
    return folder


def demo_checkpoint(root: str | Path | None = None) -> Path:
    """The cached demo checkpoint folder, built on first use (a couple of seconds)."""
    root = Path(root) if root is not None else cache_root()
    final = root / f"demo-tiny-{__version__}"
    marker = final / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")).get("recipe") == DEMO_RECIPE:
                return final
        except (OSError, ValueError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        build_demo_checkpoint(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not secret
        if final.exists():  # an older recipe (or a broken folder): replace it
            stale = root / f".stale-{final.name}-{os.getpid()}"
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, final)  # atomic on one file system
        except OSError:
            if not (final / MARKER).is_file():  # not a concurrent build that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
