"""The docs cannot drift from the code: the tables docs/make_docs.py derives from the code must equal what the
markdown files hold, the documented shapes must be the shapes the code produces, the quick start must run, and every
relative link must point at a file that exists.

When a test here fails after a code change, run ``python docs/make_docs.py`` and commit the regenerated docs.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load_make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", DOCS / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_docs = _load_make_docs()


def test_parameter_table_in_architecture_md_is_the_computed_one():
    written = make_docs.read_block(DOCS / "architecture.md", "params")
    assert written is not None, "docs/architecture.md lost its params block markers"
    assert written == make_docs.params_block(), (
        "docs/architecture.md's parameter table is stale: run python docs/make_docs.py"
    )


def test_parameter_table_adds_up_to_the_released_model():
    from kosmos2_ref.config import Kosmos2Config
    from kosmos2_ref.weights import expected_shapes

    cfg = Kosmos2Config()
    parts = make_docs.param_parts(cfg)
    assert sum(n for _, _, n in parts) == sum(math.prod(s) for s in expected_shapes(cfg).values()) == 1_664_485_376
    assert sum(k for _, k, _ in parts) == len(expected_shapes(cfg)) == 885  # 886 keys minus the tied head
    assert "**1,664,485,376**" in make_docs.read_block(DOCS / "architecture.md", "params")


def test_code_derived_blocks_are_up_to_date():
    stale = make_docs.stale_blocks()
    assert not stale, (
        f"stale generated blocks {stale} (in {[make_docs.CHECKED[s] for s in stale]}): run python docs/make_docs.py"
    )


def test_make_docs_check_command():
    proc = subprocess.run(
        [sys.executable, str(DOCS / "make_docs.py"), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_generated_block_has_its_markers():
    for name, fname in {
        "params": "architecture.md",
        "shapes": "architecture.md",
        "parity": "parity.md",
        "storage": "backends.md",
        "erf": "backends.md",
        "api": "api.md",
        "cli": "api.md",
    }.items():
        body = make_docs.read_block(DOCS / fname, name)
        assert body is not None, f"docs/{fname}: block {name!r} missing"
        assert body.strip(), f"docs/{fname}: block {name!r} is empty: run python docs/make_docs.py"


def _tiny_model():
    from kosmos2_ref import Kosmos2
    from kosmos2_ref.config import Kosmos2Config
    from kosmos2_ref.weights import expected_shapes, unflatten

    cfg = Kosmos2Config.from_dict(
        {
            "text_config": {"embed_dim": 24, "layers": 2, "ffn_dim": 40, "attention_heads": 3},
            "vision_config": {
                "hidden_size": 20,
                "intermediate_size": 36,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 56,
                "patch_size": 14,
            },
            "latent_query_num": 5,
        }
    )
    rng = np.random.default_rng(0)
    flat = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in expected_shapes(cfg).items()}
    return Kosmos2(cfg, unflatten(flat)), cfg


def test_documented_shapes_are_the_shapes_the_code_produces():
    """make_docs.dataflow_shapes (the architecture.md table) against a forward pass on a small config."""
    from kosmos2_ref.vision import patch_embed

    model, cfg = _tiny_model()
    B, Q = 2, cfg.latent_query_num
    text = [712, 1648, 9]
    ids = np.array([[0, 64003] + list(range(4, 4 + Q)) + [64004] + text] * B)
    img = np.array([[0, 0] + [1] * Q + [0] + [0] * len(text)] * B)
    T = ids.shape[1]
    pv = np.random.default_rng(1).standard_normal((B, 3, 56, 56)).astype(np.float32)
    cache = model.new_cache(B, T)
    out = model(
        pixel_values=pv,
        input_ids=ids,
        image_embeds_position_mask=img,
        past_key_values=cache,
        output_hidden_states=True,
        output_attentions=True,
    )
    vo = out.vision_model_output
    got = {
        "pixel_values": pv.shape,
        "input_ids": ids.shape,
        "patches": (B, vo.last_hidden_state.shape[1] - 1, 3 * 14 * 14),
        "patch_embeds": patch_embed(
            pv, model.params["vision_model"]["model"]["embeddings"]["patch_embedding"]["weight"]
        ).shape,
        "vision_tokens": vo.hidden_states[0].shape,
        "vision_attn": vo.attentions[0].shape,
        "vision_last": vo.last_hidden_state.shape,
        "pooler": vo.pooler_output.shape,
        "projection_attentions": out.projection_attentions.shape,
        "image_embeds": out.image_embeds.shape,
        "text_embeds": out.hidden_states[0].shape,
        "text_attn": out.attentions[0].shape,
        "last_hidden_state": out.last_hidden_state.shape,
        "logits": out.logits.shape,
        "kv_cache": cache.keys[0][:, :, : cache.length].shape,
    }
    step = model(input_ids=np.full((B, 1), 712), past_key_values=cache)
    got["step_logits"] = step.logits.shape
    documented = make_docs.dataflow_shapes(cfg, B, T, T)
    not_observable = {"vision_mlp", "projected", "connector_kv", "text_ffn"}  # intermediates no output returns
    assert set(documented) == set(got) | not_observable, "a documented tensor is neither checked nor exempted"
    for key, shape in got.items():
        assert tuple(documented[key][2]) == tuple(shape), f"{key}: documented {documented[key][2]}, code gives {shape}"


def test_figures_exist_and_are_pictures():
    import PIL.Image

    for name in ("dataflow.png", "patch_grid.png", "mini_grounding.png"):
        with PIL.Image.open(DOCS / "figures" / name) as im:
            assert im.width > 500 and im.height > 500, name


def test_quick_start_in_api_md_runs(tmp_path, monkeypatch):
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", quick, re.S).group(1)
    monkeypatch.setenv("KOSMOS2_REF_CACHE", str(tmp_path))  # the demo checkpoint is built here
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(code, "docs/api.md (quick start)", "exec"), scope)
    assert scope["out"].logits.shape[-1] == 65037
    assert isinstance(scope["caption"], str) and isinstance(scope["entities"], list)


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_relative_links_point_at_files(page):
    text = (DOCS / page).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (DOCS / target.split("#")[0]).resolve()
        assert path.exists(), f"docs/{page} links to {target}, which does not exist"
