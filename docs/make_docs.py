#!/usr/bin/env python
"""Generate the numbers, tables and figures of docs/ from the code, so the docs cannot drift from it.

    python docs/make_docs.py                 # rewrite every generated block and both figures
    python docs/make_docs.py --check         # exit 1 if a checked block is stale (tests/test_docs.py does this)
    python docs/make_docs.py --skip-parity   # everything except the transformers measurements

A generated block in a markdown file sits between two markers and is replaced as a whole::

    <!-- BEGIN GENERATED: params (docs/make_docs.py) -->
    ...
    <!-- END GENERATED: params -->

Blocks (file: name — what):

* architecture.md: ``params`` — the parameter count by part, from ``kosmos2_ref.weights.expected_shapes``;
  ``shapes`` — the shape of every tensor along the data flow, for the released config;
* parity.md: ``parity`` — errors measured against transformers on a tiny random checkpoint (needs torch and
  transformers; left as it is when they are missing);
* backends.md: ``storage`` — the weights' size per storage dtype; ``erf`` — the error of our erf and GELU;
* api.md: ``api`` — signatures and first docstring paragraphs of the public API; ``cli`` — ``--help`` of each
  command.

``--check`` compares the blocks that depend only on the code (params, shapes, storage, api); the measured ones
(parity, erf) and the ``--help`` text (whose layout varies with the Python version) are not compared.

Figures: figures/dataflow.png (the pipeline with its shapes), figures/patch_grid.png (the 32×32 grid of
``<patch_index_k>`` cells) and figures/mini_grounding.png (the packaged miniature's grounded caption of a synthetic
scene and a latent query's attention: the README's picture, redrawn from whatever weights are packaged), drawn
with Pillow.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import math
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
FIGURES = DOCS / "figures"
NOTEBOOKS = ROOT / "notebooks"
sys.path.insert(0, str(ROOT))

from kosmos2_ref.config import Kosmos2Config  # noqa: E402
from kosmos2_ref.weights import expected_shapes  # noqa: E402

BEGIN = "<!-- BEGIN GENERATED: {name} (docs/make_docs.py) -->"
END = "<!-- END GENERATED: {name} -->"
CHECKED = {"params": "architecture.md", "shapes": "architecture.md", "storage": "backends.md", "api": "api.md"}


# ================================================================================================================
# Blocks in markdown files


def block_pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(BEGIN.format(name=name)) + r"\n(.*?)" + re.escape(END.format(name=name)), re.S)


def read_block(path: Path, name: str) -> str | None:
    """The text between the markers of block ``name`` in ``path`` (None when the file or block is missing)."""
    if not path.is_file():
        return None
    m = block_pattern(name).search(path.read_text(encoding="utf-8"))
    return m.group(1) if m else None


def write_block(path: Path, name: str, body: str) -> bool:
    """Replace block ``name`` of ``path`` with ``body``; True when the file changed."""
    text = path.read_text(encoding="utf-8")
    pat = block_pattern(name)
    if not pat.search(text):
        raise SystemExit(f"{path}: no block {name!r} (markers {BEGIN.format(name=name)!r} … {END.format(name=name)!r})")
    new = pat.sub(lambda m: BEGIN.format(name=name) + "\n" + body + END.format(name=name), text)
    if new != text:
        path.write_text(new, encoding="utf-8")
        return True
    return False


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one letter per column (l or r)."""
    align = align or "l" * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


# ================================================================================================================
# architecture.md: parameters

# (part, predicate on the key): the first part whose predicate holds takes the key.
PARTS = [
    ("vision: patch embedding, class token, positions", lambda k: k.startswith("vision_model.model.embeddings.")),
    (
        "vision: pre_layrnorm and post_layernorm",
        lambda k: k.startswith(("vision_model.model.pre_layrnorm", "vision_model.model.post_layernorm")),
    ),
    ("vision: encoder blocks", lambda k: k.startswith("vision_model.model.encoder.layers.")),
    ("connector: dense", lambda k: k.startswith("image_to_text_projection.dense.")),
    ("connector: latent queries", lambda k: k == "image_to_text_projection.latent_query"),
    ("connector: cross-attention (x_attn)", lambda k: k.startswith("image_to_text_projection.x_attn.")),
    ("text: token embeddings (= the tied LM head)", lambda k: k == "text_model.model.embed_tokens.weight"),
    ("text: decoder blocks", lambda k: k.startswith("text_model.model.layers.")),
    ("text: final layer_norm", lambda k: k.startswith("text_model.model.layer_norm.")),
    ("text: untied lm_head", lambda k: k == "text_model.lm_head.weight"),
]


def param_parts(cfg: Kosmos2Config) -> list[tuple[str, int, int]]:
    """[(part, number of keys, number of parameters)] for ``cfg``, in data-flow order; every key counted once."""
    counts = {name: [0, 0] for name, _ in PARTS}
    for key, shape in expected_shapes(cfg).items():
        part = next((name for name, pred in PARTS if pred(key)), None)
        if part is None:
            raise ValueError(f"key {key!r} belongs to no part of the parameter table: extend PARTS")
        counts[part][0] += 1
        counts[part][1] += math.prod(shape)
    return [(name, k, n) for name, (k, n) in counts.items() if k]


def block_param_counts(cfg: Kosmos2Config) -> dict[str, int]:
    """Parameters of one vision block and one text block."""
    shapes = expected_shapes(cfg)
    v = sum(math.prod(s) for k, s in shapes.items() if k.startswith("vision_model.model.encoder.layers.0."))
    t = sum(math.prod(s) for k, s in shapes.items() if k.startswith("text_model.model.layers.0."))
    return {"vision block": v, "text block": t}


def params_block(cfg: Kosmos2Config | None = None) -> str:
    cfg = cfg or Kosmos2Config()
    parts = param_parts(cfg)
    total = sum(n for _, _, n in parts)
    keys = sum(k for _, k, _ in parts)
    rows = [[name, f"{k}", f"{n:,}", f"{100 * n / total:.2f} %", human_bytes(4 * n)] for name, k, n in parts]
    rows.append(["**total**", f"**{keys}**", f"**{total:,}**", "100 %", f"**{human_bytes(4 * total)}**"])
    blocks = block_param_counts(cfg)
    return (
        table(["part", "keys", "parameters", "share", "float32"], rows, "lrrrr")
        + f"\nOne vision block holds {blocks['vision block']:,} parameters "
        f"({cfg.vision_config.num_hidden_layers} of them), one text block {blocks['text block']:,} "
        f"({cfg.text_config.layers} of them). The LM head is the token embedding itself "
        f"(`tie_word_embeddings`), so it is counted once; the sinusoidal position table is computed, not "
        f"stored.\n"
    )


# ================================================================================================================
# architecture.md: shapes along the data flow


def dataflow_shapes(cfg: Kosmos2Config, B="B", T="T", S="S") -> dict[str, tuple[str, str, tuple]]:
    """key -> (stage, tensor, shape) for every tensor of the data flow. ``B`` (batch), ``T`` (prompt tokens) and
    ``S`` (cached tokens) may be numbers or names."""
    v, t = cfg.vision_config, cfg.text_config
    g = v.image_size // v.patch_size
    N = g * g
    Q, C, Cv = cfg.latent_query_num, t.embed_dim, v.hidden_size
    px = v.num_channels * v.patch_size**2
    return {
        "pixel_values": ("processor", "pixel_values", (B, v.num_channels, v.image_size, v.image_size)),
        "input_ids": ("processor", "input_ids, attention_mask, image_embeds_position_mask", (B, T)),
        "patches": (
            "vision",
            f"patches ({g}×{g}, each {v.num_channels}·{v.patch_size}·{v.patch_size} numbers)",
            (B, N, px),
        ),
        "patch_embeds": ("vision", "patch embeddings (patches @ kernelᵀ)", (B, N, Cv)),
        "vision_tokens": ("vision", "+ class token, + positions, pre_layrnorm", (B, N + 1, Cv)),
        "vision_attn": (
            "vision",
            f"attention probabilities, each of {v.num_hidden_layers} blocks",
            (B, v.num_attention_heads, N + 1, N + 1),
        ),
        "vision_mlp": ("vision", "MLP hidden (fc1, quick_gelu)", (B, N + 1, v.intermediate_size)),
        "vision_last": ("vision", "last_hidden_state (no post-LN)", (B, N + 1, Cv)),
        "pooler": ("vision", "pooler_output = post_layernorm(token 0)", (B, Cv)),
        "projected": ("connector", "post_layernorm, L2-normalise, dense", (B, N + 1, C)),
        "connector_kv": ("connector", "keys/values: image tokens then latent queries", (B, N + 1 + Q, C)),
        "projection_attentions": ("connector", "projection_attentions", (B, t.attention_heads, Q, N + 1 + Q)),
        "image_embeds": ("connector", "image_embeds", (B, Q, C)),
        "text_embeds": ("decoder", "embeddings, image rows spliced in, ×√d, + sinusoids", (B, T, C)),
        "text_attn": ("decoder", f"attention probabilities, each of {t.layers} blocks", (B, t.attention_heads, T, T)),
        "text_ffn": ("decoder", "FFN hidden (fc1, gelu, ffn_layernorm)", (B, T, t.ffn_dim)),
        "last_hidden_state": ("decoder", "last_hidden_state (final layer_norm)", (B, T, C)),
        "logits": ("decoder", "logits = h @ embed_tokensᵀ", (B, T, t.vocab_size)),
        "kv_cache": (
            "generation",
            f"KV cache: keys and values of each of {t.layers} layers",
            (B, t.attention_heads, S, t.head_dim),
        ),
        "step_logits": ("generation", "one decoding step: logits of the last position", (B, 1, t.vocab_size)),
    }


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def shapes_block(cfg: Kosmos2Config | None = None) -> str:
    cfg = cfg or Kosmos2Config()
    rows = [[stage, tensor, f"`{_fmt_shape(shape)}`"] for stage, tensor, shape in dataflow_shapes(cfg).values()]
    return table(["stage", "tensor", "shape"], rows) + (
        "\nB = batch, T = prompt tokens (67 image-prompt tokens + the text: `<s> <image>` 64 slots `</image>` …), "
        "S = tokens in the cache. With `interpolate_pos_encoding` an H×W image has (H/14)·(W/14) patches instead of "
        f"{(cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2}; the connector still returns "
        f"{cfg.latent_query_num} rows.\n"
    )


# ================================================================================================================
# backends.md: storage sizes and the erf approximation


def storage_block(cfg: Kosmos2Config | None = None) -> str:
    cfg = cfg or Kosmos2Config()
    shapes = expected_shapes(cfg)
    matrix = sum(math.prod(s) for s in shapes.values() if len(s) >= 2)
    vector = sum(math.prod(s) for s in shapes.values() if len(s) < 2)
    rows = []
    for dtype, size in (("float32", 4), ("float16", 2), ("bfloat16", 2)):
        held = "float16" if dtype == "float16" else "uint16 bits" if dtype == "bfloat16" else "float32"
        rows.append([f"`{dtype}`", held, human_bytes(size * matrix + 4 * vector)])
    return (
        table(["dtype=", "matrices held as", "weights in memory"], rows, "llr")
        + f"\n{matrix:,} parameters sit in matrices (ndim ≥ 2) and follow `dtype=`; {vector:,} sit in vectors "
        f"(biases, LayerNorms, the class token), which stay float32.\n"
    )


def erf_block() -> str:
    from kosmos2_ref import fast
    from kosmos2_ref.backend import erf_numpy
    from kosmos2_ref.layers import gelu

    x64 = np.linspace(-8.0, 8.0, 160_001)
    ref_erf = np.array([math.erf(v) for v in x64])
    x32 = x64.astype(np.float32)
    e_erf = np.abs(erf_numpy(x64) - ref_erf).max()
    e_erf32 = np.abs(erf_numpy(x32).astype(np.float64) - np.array([math.erf(v) for v in x32.astype(np.float64)])).max()
    exact32 = 0.5 * x32 * (1.0 + np.array([math.erf(v) for v in (x32 / np.sqrt(2)).astype(np.float64)]))
    e_gelu = np.abs(gelu(x32).astype(np.float64) - exact32).max()
    e_fast_gelu = np.abs(fast.gelu(x32).astype(np.float64) - exact32).max()
    tanh = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    exact = 0.5 * x64 * (1.0 + np.array([math.erf(v / math.sqrt(2)) for v in x64]))
    e_tanh = np.abs(tanh - exact).max()
    rows = [
        ["`erf_numpy`, float64 input", f"{e_erf:.1e}"],
        ["`erf_numpy`, float32 input", f"{e_erf32:.1e}"],
        ["`layers.gelu` (float32) vs 0.5·x·(1 + erf(x/√2))", f"{e_gelu:.1e}"],
        ["`fast.gelu` (float32, x · sigmoid of the fitted logit) vs the same", f"{e_fast_gelu:.1e}"],
        ["the tanh approximation of GELU, for comparison", f"{e_tanh:.1e}"],
    ]
    return table(["function, on 160 001 points in [−8, 8]", "max abs error vs `math.erf`"], rows, "lr")


# ================================================================================================================
# parity.md: measured against transformers


def measure_parity() -> str:
    """Run our model and transformers on one tiny random checkpoint and tabulate the differences."""
    import torch
    import transformers
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    sys.path.insert(0, str(NOTEBOOKS))
    import _setup

    from kosmos2_ref import Kosmos2, generate
    from kosmos2_ref.backend import to_numpy
    from kosmos2_ref.processing import Kosmos2Processor

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows: list[list[str]] = []

    def diff(name, ours, ref):
        a = np.asarray(to_numpy(ours), dtype=np.float64)
        b = np.asarray(ref.detach().numpy() if hasattr(ref, "detach") else ref, dtype=np.float64)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        err, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
        rows.append([name, f"`{_fmt_shape(a.shape)}`", f"{err:.1e}", f"{scale:.1e}", f"{err / max(scale, 1.0):.1e}"])
        return err

    def same(name, equal: bool, what: str):
        rows.append([name, what, "0" if equal else "**differs**", "", ""])

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _setup._quiet_transformers()
        _setup.write_transformers_checkpoint(folder, _setup.TINY, seed=0)
        Kosmos2Processor.default().save_pretrained(folder)
        ours = Kosmos2.from_pretrained(folder)
        hf = Kosmos2ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
        sdpa = Kosmos2ForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa").eval()
        proc = Kosmos2Processor.from_pretrained(folder)
        hproc = AutoProcessor.from_pretrained(folder, backend="pil")
        image, _ = _setup.demo_image()
        tt = lambda d: {k: torch.from_numpy(np.asarray(v)) for k, v in d.items()}  # noqa: E731

        # processor
        prompt = "<grounding> An image of"
        enc = proc(text=prompt, images=image)
        henc = hproc(text=prompt, images=image, return_tensors="np")
        diff("processor: pixel_values (PIL path)", enc["pixel_values"], henc["pixel_values"])
        same(
            "processor: input_ids, attention_mask, image_embeds_position_mask",
            all(np.array_equal(enc[k], henc[k]) for k in ("input_ids", "attention_mask", "image_embeds_position_mask")),
            f"`{_fmt_shape(enc['input_ids'].shape)}`",
        )

        # forward, every stage
        labels = np.where(enc["image_embeds_position_mask"] == 1, -100, enc["input_ids"])
        out = ours(**enc, labels=labels, output_hidden_states=True, output_attentions=True)
        with torch.no_grad():
            ref = hf(**tt(enc), labels=torch.from_numpy(labels), output_hidden_states=True, output_attentions=True)
            ref_vis = hf.vision_model(
                pixel_values=torch.from_numpy(enc["pixel_values"]), output_hidden_states=True, output_attentions=True
            )
            ref_sdpa = sdpa(**tt(enc))
        vo = out.vision_model_output
        for i, (a, b) in enumerate(zip(vo.hidden_states, ref_vis.hidden_states)):
            diff(f"vision hidden_states[{i}]", a, b)
        diff("vision attentions (last block)", vo.attentions[-1], ref_vis.attentions[-1])
        diff("vision pooler_output", vo.pooler_output, ref_vis.pooler_output)
        diff("image_embeds", out.image_embeds, ref.image_embeds)
        diff("projection_attentions", out.projection_attentions, ref.projection_attentions)
        for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
            diff(f"text hidden_states[{i}]", a, b)
        diff("text attentions (last block)", out.attentions[-1], ref.attentions[-1])
        diff("logits", out.logits, ref.logits)
        diff("logits vs transformers' SDPA attention", out.logits, ref_sdpa.logits)
        diff("loss (image positions labelled −100)", out.loss, ref.loss)

        # one cached decoding step
        T = enc["input_ids"].shape[1]
        cache = ours.new_cache(1, T + 1)
        first = ours(**enc, past_key_values=cache)
        nxt = np.asarray(to_numpy(first.logits[:, -1])).argmax(-1)[:, None]
        step = ours(input_ids=nxt, attention_mask=np.ones((1, T + 1), np.int64), past_key_values=cache)
        with torch.no_grad():
            r1 = hf(**tt(enc), use_cache=True)
            r2 = hf.text_model(
                input_ids=torch.from_numpy(nxt),
                attention_mask=torch.ones(1, T + 1, dtype=torch.long),
                past_key_values=r1.past_key_values,
                use_cache=True,
            )
        diff("one cached decoding step: logits", step.logits, r2.logits)

        # generation
        n_new = 16
        for label, kw in [
            ("greedy", dict(num_beams=1)),
            ("greedy, no_repeat_ngram_size=3", dict(no_repeat_ngram_size=3)),
            ("beam search, 3 beams", dict(num_beams=3)),
        ]:
            a = generate(ours, **enc, max_new_tokens=n_new, do_sample=False, **kw)
            with torch.no_grad():
                b = hf.generate(**tt(enc), max_new_tokens=n_new, do_sample=False, **kw).numpy()
            same(
                f"generate, {label}: token ids", a.shape == b.shape and np.array_equal(a, b), f"`{_fmt_shape(a.shape)}`"
            )

        # left padding: a padded row against the same row alone (docs/numerics.md §7.3)
        texts = ["<grounding> An image of", "<grounding> Describe this image in detail:"]
        batch = proc(text=texts, images=[image, image], padding_side="left")
        alone = proc(text=texts[0], images=image)
        pads = int((batch["attention_mask"][0] == 0).sum())
        kw = dict(max_new_tokens=8, do_sample=False, num_beams=1)
        g_b = generate(ours, **batch, **kw, output_scores=True, return_dict_in_generate=True)
        g_a = generate(ours, **alone, **kw, output_scores=True, return_dict_in_generate=True)
        ours_gap = max(
            float(np.abs(np.asarray(to_numpy(sb))[0] - np.asarray(to_numpy(sa))[0]).max())
            for sb, sa in zip(g_b.scores, g_a.scores)
        )
        with torch.no_grad():
            h_b = hf.generate(**tt(batch), **kw, output_scores=True, return_dict_in_generate=True)
            h_a = hf.generate(**tt(alone), **kw, output_scores=True, return_dict_in_generate=True)
        hf_gap = max(float((sb[0] - sa[0]).abs().max()) for sb, sa in zip(h_b.scores, h_a.scores))
        padded_rows = [
            [
                "kosmos2_ref (pad-aware positions, as transformers 4.37)",
                f"{ours_gap:.1e}",
                "yes" if np.array_equal(g_b.sequences[0, -8:], g_a.sequences[0, -8:]) else "no",
            ],
            [
                f"transformers {transformers.__version__} (past_length + 2)",
                f"{hf_gap:.1e}",
                "yes" if torch.equal(h_b.sequences[0, -8:], h_a.sequences[0, -8:]) else "no",
            ],
        ]

    tc = _setup.TINY
    header = (
        f"Measured by `python docs/make_docs.py` with transformers {transformers.__version__}, torch "
        f"{torch.__version__}, NumPy {np.__version__}, Python {platform.python_version()} on "
        f"{platform.machine()}; tiny random checkpoint (text {tc['text_config']['layers']} layers × "
        f"{tc['text_config']['embed_dim']}, vision {tc['vision_config']['num_hidden_layers']} layers × "
        f"{tc['vision_config']['hidden_size']}, {tc['latent_query_num']} latent queries, the real 65037-id "
        f"vocabulary), the packaged photo and the prompt `{prompt}`, float32, eager attention unless "
        f"stated.\n\n"
    )
    return (
        header
        + table(["compared", "shape", "max abs Δ", "max abs ref", "Δ / max(1, ref)"], rows, "llrrr")
        + f"\nLeft-padded batch ({pads} pads before the shorter prompt), greedy, 8 new tokens: the padded row "
        "against the same prompt run alone.\n\n"
        + table(["implementation", "max score Δ over the 8 steps", "same tokens"], padded_rows, "lrl")
    )


# ================================================================================================================
# api.md: signatures and the command line

API = [
    (
        "The model",
        [
            "kosmos2_ref.Kosmos2",
            "kosmos2_ref.Kosmos2.from_pretrained",
            "kosmos2_ref.Kosmos2.forward",
            "kosmos2_ref.Kosmos2.decode_step",
            "kosmos2_ref.Kosmos2.encode_image",
            "kosmos2_ref.Kosmos2.get_image_features",
            "kosmos2_ref.Kosmos2.new_cache",
            "kosmos2_ref.Kosmos2.num_parameters",
            "kosmos2_ref.Kosmos2Output",
            "kosmos2_ref.vision.VisionOutput",
        ],
    ),
    (
        "Configuration",
        [
            "kosmos2_ref.Kosmos2Config",
            "kosmos2_ref.Kosmos2Config.from_pretrained",
            "kosmos2_ref.Kosmos2Config.from_dict",
            "kosmos2_ref.Kosmos2Config.to_dict",
            "kosmos2_ref.TextConfig",
            "kosmos2_ref.VisionConfig",
        ],
    ),
    (
        "Processing",
        [
            "kosmos2_ref.processing.Kosmos2Processor",
            "kosmos2_ref.processing.Kosmos2Processor.from_pretrained",
            "kosmos2_ref.processing.Kosmos2Processor.default",
            "kosmos2_ref.processing.Kosmos2Processor.__call__",
            "kosmos2_ref.processing.Kosmos2Processor.decode",
            "kosmos2_ref.processing.Kosmos2Processor.batch_decode",
            "kosmos2_ref.processing.Kosmos2Processor.post_process_generation",
            "kosmos2_ref.processing.Kosmos2Processor.post_process_image_text_to_text",
            "kosmos2_ref.processing.Kosmos2Processor.entities_to_pixel_boxes",
            "kosmos2_ref.processing.Kosmos2Processor.save_pretrained",
            "kosmos2_ref.processing.preprocess_images",
            "kosmos2_ref.processing.box_to_patch_indices",
            "kosmos2_ref.processing.patch_indices_to_box",
            "kosmos2_ref.processing.post_process_generation",
            "kosmos2_ref.processing.entities_to_pixel_boxes",
            "kosmos2_ref.processing.Entity",
            "kosmos2_ref.processing.box_to_pixels",
            "kosmos2_ref.processing.image.load_image",
            "kosmos2_ref.processing.image.ImageProcessorConfig.resize_target",
            "kosmos2_ref.processing.image.ImageProcessorConfig.seen_box",
            "kosmos2_ref.processing.image.ImageProcessorConfig.seen_image",
        ],
    ),
    (
        "Generation",
        [
            "kosmos2_ref.generate",
            "kosmos2_ref.generation.greedy_generate",
            "kosmos2_ref.generation.GenerateOutput",
            "kosmos2_ref.generation.TextStreamer",
        ],
    ),
    (
        "Tasks",
        [
            "kosmos2_ref.tasks.caption",
            "kosmos2_ref.tasks.ground",
            "kosmos2_ref.tasks.describe",
            "kosmos2_ref.tasks.embed",
            "kosmos2_ref.tasks.model_processor",
            "kosmos2_ref.tasks.CaptionResult",
            "kosmos2_ref.tasks.GroundResult",
            "kosmos2_ref.tasks.DescribeResult",
            "kosmos2_ref.tasks.EmbedResult",
        ],
    ),
    (
        "Drawing",
        [
            "kosmos2_ref.draw.draw_entities",
            "kosmos2_ref.draw.draw_boxes",
            "kosmos2_ref.draw.attention_map",
            "kosmos2_ref.draw.attention_heatmap",
            "kosmos2_ref.draw.attention_grid",
            "kosmos2_ref.draw.save_image",
        ],
    ),
    (
        "Checkpoints",
        [
            "kosmos2_ref.hub.resolve_checkpoint",
            "kosmos2_ref.hub.find_in_cache",
            "kosmos2_ref.hub.download",
            "kosmos2_ref.demo.demo_checkpoint",
            "kosmos2_ref.demo.build_demo_checkpoint",
            "kosmos2_ref.weights.load_flat",
            "kosmos2_ref.weights.plan_weights",
            "kosmos2_ref.weights.expected_shapes",
            "kosmos2_ref.torch_pickle.TorchBinFile",
            "kosmos2_ref.convert.convert_checkpoint",
        ],
    ),
    (
        "Backends and the cache",
        [
            "kosmos2_ref.get_backend",
            "kosmos2_ref.to_numpy",
            "kosmos2_ref.backend.cupy_available",
            "kosmos2_ref.cache.KVCache",
            "kosmos2_ref.cache.KVCache.update",
            "kosmos2_ref.cache.KVCache.advance",
            "kosmos2_ref.cache.KVCache.reorder",
        ],
    ),
    (
        "Stage functions (the textbook view)",
        [
            "kosmos2_ref.layers.linear",
            "kosmos2_ref.layers.layer_norm",
            "kosmos2_ref.layers.gelu",
            "kosmos2_ref.layers.quick_gelu",
            "kosmos2_ref.layers.softmax",
            "kosmos2_ref.layers.attention",
            "kosmos2_ref.layers.split_heads",
            "kosmos2_ref.layers.merge_heads",
            "kosmos2_ref.layers.as_float32",
            "kosmos2_ref.primitives.reference_mode",
            "kosmos2_ref.primitives.resolve_reference",
            "kosmos2_ref.vision.patch_embed",
            "kosmos2_ref.vision.position_embeddings",
            "kosmos2_ref.vision.embeddings",
            "kosmos2_ref.vision.encoder_layer",
            "kosmos2_ref.vision.vision_forward",
            "kosmos2_ref.connector.l2_normalize",
            "kosmos2_ref.connector.cross_attention",
            "kosmos2_ref.connector.image_to_text",
            "kosmos2_ref.decoder.position_ids_from_input_ids",
            "kosmos2_ref.decoder.sinusoidal_positions",
            "kosmos2_ref.decoder.decoder_attention_mask",
            "kosmos2_ref.decoder.embed",
            "kosmos2_ref.decoder.self_attention",
            "kosmos2_ref.decoder.ffn",
            "kosmos2_ref.decoder.decoder_layer",
            "kosmos2_ref.decoder.lm_head",
            "kosmos2_ref.decoder.text_forward",
            "kosmos2_ref.decoder.causal_lm_loss",
        ],
    ),
]
# Methods that only forward to a function: documented with that function's signature (minus ``model``).
DELEGATES: dict[str, str] = {}


def resolve(path: str):
    """The object at dotted ``path`` (a module, then attributes), or None when it does not exist."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def format_signature(fn, drop_first: bool = False) -> str:
    """``(a, b=1, *, c=None, **kw)`` without annotations; ``drop_first`` drops self/cls/model."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if params and (drop_first or params[0].name in ("self", "cls")):
        params = params[1:]
    out, star_done = [], False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star_done:
            out.append("*")
            star_done = True
        s = p.name
        if p.kind is p.VAR_POSITIONAL:
            s, star_done = "*" + s, True
        elif p.kind is p.VAR_KEYWORD:
            s = "**" + s
        if p.default is not p.empty:
            s += "=" + repr(p.default)
        out.append(s)
    return "(" + ", ".join(out) + ")"


def first_paragraph(obj) -> str:
    """The docstring's first paragraph on one line, reStructuredText roles and literals turned into markdown code."""
    doc = inspect.getdoc(obj) or ""
    para = " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines()).strip()
    para = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", para)  # :class:`X` -> `X`
    return para.replace("``", "`")


def api_entry(path: str) -> str | None:
    obj = resolve(DELEGATES.get(path, path))
    if obj is None:
        print(f"make_docs: {path} not found; left out of api.md", file=sys.stderr)
        return None
    short = path.removeprefix("kosmos2_ref.")
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj) if f.name != "extra"]
        return f"#### `{short}`\n\n{first_paragraph(obj)}\n\nFields: {', '.join(f'`{n}`' for n in names)}.\n"
    if inspect.isclass(obj):
        head = f"#### `{short}{format_signature(obj.__init__) if '__init__' in vars(obj) else '()'}`"
    else:
        head = f"#### `{short}{format_signature(obj, drop_first=path in DELEGATES)}`"
    doc = first_paragraph(obj)
    return f"{head}\n\n{doc}\n" if doc else f"{head}\n"


def api_block() -> str:
    parts = []
    for section, paths in API:
        entries = [e for e in (api_entry(p) for p in paths) if e]
        if entries:
            parts.append(f"### {section}\n\n" + "\n".join(entries))
    return "\n".join(parts)


def cli_block() -> str:
    try:
        from kosmos2_ref import cli
    except ImportError:
        return "(the command line is not in this version)\n"
    os.environ["COLUMNS"] = "100"
    parser = cli.build_parser()
    texts = [("kosmos2-ref --help", parser.format_help())]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        texts.append((f"kosmos2-ref {name} --help", p.format_help()))
    return "\n".join(f"```text\n$ {cmd}\n{txt.rstrip()}\n```\n" for cmd, txt in texts)


# ================================================================================================================
# Figures


def _font(size: int):
    import PIL.ImageFont

    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return PIL.ImageFont.load_default()


def _arrow(d, a, b, fill=(90, 90, 90), width=3, head=11):
    d.line([a, b], fill=fill, width=width)
    ang = math.atan2(b[1] - a[1], b[0] - a[0])
    pts = [
        b,
        (b[0] - head * math.cos(ang - 0.4), b[1] - head * math.sin(ang - 0.4)),
        (b[0] - head * math.cos(ang + 0.4), b[1] - head * math.sin(ang + 0.4)),
    ]
    d.polygon(pts, fill=fill)


def dataflow_figure(cfg: Kosmos2Config | None = None):
    """The pipeline as boxes and arrows, each box with what it does and the shape it hands on."""
    import PIL.Image
    import PIL.ImageDraw

    cfg = cfg or Kosmos2Config()
    sh = {k: _fmt_shape(s) for k, (_, _, s) in dataflow_shapes(cfg).items()}
    W, H = 1240, 900
    img = PIL.Image.new("RGB", (W, H), "white")
    d = PIL.ImageDraw.Draw(img)
    title, body, mono = _font(21), _font(16), _font(16)
    colours = {
        "input": (236, 236, 236),
        "processor": (255, 236, 204),
        "vision": (214, 234, 255),
        "connector": (224, 245, 216),
        "decoder": (246, 222, 240),
        "generation": (255, 247, 200),
        "output": (236, 236, 236),
    }

    def box(x, y, w, h, kind, head, lines, shape=None):
        d.rounded_rectangle([x, y, x + w, y + h], radius=14, fill=colours[kind], outline=(80, 80, 80), width=2)
        d.text((x + 14, y + 10), head, fill=(20, 20, 20), font=title)
        yy = y + 42
        for line in lines:
            d.text((x + 14, yy), line, fill=(50, 50, 50), font=body)
            yy += 22
        if shape:
            d.text((x + 14, y + h - 30), "-> " + shape, fill=(0, 60, 140), font=mono)
        return (x, y, w, h)

    L, R, w = 40, 660, 540
    b_img = box(L, 20, w, 70, "input", "image (any size, RGB)", [])
    b_txt = box(R, 20, w, 95, "input", "text + optional boxes", ['"<grounding> An image of", [(x1, y1, x2, y2), …]'])
    b_pix = box(
        L,
        130,
        w,
        120,
        "processor",
        "processor: image (processing/image.py)",
        ["Pillow bicubic resize to 224x224 (aspect ignored),", "x 1/255, normalise with CLIP mean/std"],
        "pixel_values " + sh["pixel_values"],
    )
    b_tok = box(
        R,
        155,
        w,
        140,
        "processor",
        "processor: text (processing/tokenizer.py, grounding.py)",
        ["<s> <image> 64 slots </image> text; boxes ->", "<object><patch_index_k>…</object>; tokenise", "(65037 ids)"],
        "input_ids, masks " + sh["input_ids"],
    )
    b_vis = box(
        L,
        290,
        w,
        170,
        "vision",
        "vision tower (vision.py): CLIP ViT-L/14",
        [
            f"patches {sh['patches']} @ kernel^T = stride-14 conv",
            "+ class token + positions, pre_layrnorm",
            f"{cfg.vision_config.num_hidden_layers} pre-LN blocks: "
            f"attention ({cfg.vision_config.num_attention_heads} heads), "
            "quick_gelu MLP",
        ],
        "last_hidden_state " + sh["vision_last"],
    )
    box(
        L,
        500,
        w,
        170,
        "connector",
        "connector (connector.py)",
        [
            "post_layernorm on all 257 tokens, L2-normalise,",
            f"dense -> {sh['projected']};",
            f"{cfg.latent_query_num} latent queries attend to [image; queries]",
        ],
        "image_embeds " + sh["image_embeds"],
    )
    b_dec = box(
        R,
        335,
        w,
        235,
        "decoder",
        "decoder (decoder.py)",
        [
            "embed ids; image rows -> the 64 slots; x sqrt(2048)",
            "+ sinusoid positions (pad-aware)",
            f"{cfg.text_config.layers} pre-LN blocks with sub-LN: attention",
            f"({cfg.text_config.attention_heads} heads) + inner_attn_ln, gelu FFN + ffn_layernorm",
            "final layer_norm; logits = h @ embed_tokens^T",
            "(KV cache: cache.py)",
        ],
        "logits " + sh["logits"],
    )
    b_gen = box(
        R,
        610,
        w,
        120,
        "generation",
        "generate (generation/)",
        ["prefill once, then one token per step;", "greedy · beam search · sampling, processors"],
        "ids [B, T + new]",
    )
    box(
        R,
        770,
        w,
        110,
        "output",
        "decode + post_process_generation",
        ["caption, [(phrase, (start, end), [boxes])]", "-> draw.py: boxes on the image"],
    )
    cx = lambda b: b[0] + b[2] // 2  # noqa: E731
    _arrow(d, (cx(b_img), 90), (cx(b_img), 130))
    _arrow(d, (cx(b_txt), 115), (cx(b_txt), 155))
    _arrow(d, (cx(b_pix), 250), (cx(b_pix), 290))
    _arrow(d, (cx(b_vis), 460), (cx(b_vis), 500))
    _arrow(d, (cx(b_tok), 295), (cx(b_tok), 335))
    _arrow(d, (L + w, 585), (R, 470))
    _arrow(d, (cx(b_dec), 570), (cx(b_dec), 610))
    _arrow(d, (cx(b_gen), 730), (cx(b_gen), 770))
    d.text((L, 700), "Shapes for the released config; B batch, T tokens.", fill=(90, 90, 90), font=body)
    d.text((L, 724), "Regenerate: python docs/make_docs.py", fill=(90, 90, 90), font=body)
    return img


def patch_grid_figure(n: int = 32, cell: int = 30):
    """The n×n grid of location cells with their indices, the 16×16 ViT patches (2×2 cells each) outlined, and the
    docs' example box (44, 863) with its two naming cells."""
    import PIL.Image
    import PIL.ImageDraw

    from kosmos2_ref.processing import patch_indices_to_box

    margin, top = 48, 92
    side = n * cell
    img = PIL.Image.new("RGB", (side + 2 * margin, side + top + margin), "white")
    d = PIL.ImageDraw.Draw(img)
    small, label, head = _font(9), _font(13), _font(18)
    ul, lr = 44, 863
    for k in (ul, lr):
        r, c = divmod(k, n)
        d.rectangle(
            [margin + c * cell, top + r * cell, margin + (c + 1) * cell, top + (r + 1) * cell], fill=(255, 205, 120)
        )
    for i in range(n + 1):
        w = 2 if i % 2 == 0 else 1
        col = (120, 120, 120) if i % 2 == 0 else (205, 205, 205)
        d.line([(margin + i * cell, top), (margin + i * cell, top + side)], fill=col, width=w)
        d.line([(margin, top + i * cell), (margin + side, top + i * cell)], fill=col, width=w)
    for k in range(n * n):
        r, c = divmod(k, n)
        d.text(
            (margin + c * cell + cell / 2, top + r * cell + cell / 2),
            str(k),
            fill=(70, 70, 70),
            font=small,
            anchor="mm",
        )
    for i in range(0, n, 4):
        d.text(
            (margin + i * cell + cell / 2, top - 6),
            f"col {i}" if i == 0 else str(i),
            fill=(0, 0, 0),
            font=label,
            anchor="mb",
        )
        d.text(
            (margin - 6, top + i * cell + cell / 2),
            f"row {i}" if i == 0 else str(i),
            fill=(0, 0, 0),
            font=label,
            anchor="rm",
        )
    x1, y1, x2, y2 = patch_indices_to_box(ul, lr, n)
    d.rectangle(
        [margin + x1 * side, top + y1 * side, margin + x2 * side, top + y2 * side], outline=(200, 30, 30), width=4
    )
    d.text(
        (margin, 12),
        "<patch_index_k>: cell k = 32·row + col of a 32x32 grid (id 64013 + k); grey lines: the 16x16 ViT patches",
        fill=(0, 0, 0),
        font=head,
    )
    d.text(
        (margin, 38),
        f"box (0.390625, 0.046875, 0.984375, 0.828125) <-> cells ({ul}, {lr}): "
        "the upper-left and lower-right cells, joined centre to centre",
        fill=(160, 20, 20),
        font=label,
    )
    return img


MINI_SCENE_SEED = 3  # the scene of the lessons and the demo


def _wrap(d, text: str, font, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and d.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def mini_grounding_figure(seed: int = MINI_SCENE_SEED, panel: int = 360):
    """The README's figure: the packaged miniature's grounded caption of a synthetic scene, its boxes drawn
    (``tasks.caption``, ``draw.draw_entities``), beside one latent query's attention over the picture the model
    reads (``draw.attention_heatmap``): the query that looks most at the first grounded box, or the sharpest one
    when the caption grounds nothing. Whatever the weights write is shown; nothing is assumed about it."""
    import PIL.Image
    import PIL.ImageDraw

    from kosmos2_ref import Kosmos2, draw, tasks, world

    model = Kosmos2.from_pretrained("mini")
    processor = tasks.processor_for(model)
    scene = world.make_scene(seed, image_size=224)
    image = world.render(scene)
    result = tasks.caption(model, image, processor=processor, no_repeat_ngram_size=0)
    pixel_values = processor(images=image)["pixel_values"]
    _, attn, _ = model.encode_image(pixel_values)
    cfg = processor.image_processor_config
    seen = PIL.Image.fromarray(cfg.seen_image(pixel_values[0]))  # the picture as the model reads it
    grids = draw.attention_map(attn, query=None)  # [Q, g, g] over the picture the model reads
    g = grids.shape[-1]
    boxed = [e for e in result.entities if e.boxes]
    box = cfg.seen_box(boxed[0].boxes[0], image.size) if boxed else None  # on what the model reads
    if box is not None:
        x1, y1, x2, y2 = box
        r0, r1 = int(y1 * g), max(int(np.ceil(y2 * g)), int(y1 * g) + 1)
        c0, c1 = int(x1 * g), max(int(np.ceil(x2 * g)), int(x1 * g) + 1)
        query = int(np.argmax(grids[:, r0:r1, c0:c1].reshape(len(grids), -1).sum(-1)))
        why = f'the query that looks most at the box of "{boxed[0].phrase}"'
    else:
        query = int(np.argmax(grids.reshape(len(grids), -1).max(-1)))
        why = "the sharpest query (the caption grounds no phrase)"
    left = draw.draw_entities(image, result.entities).resize((panel, panel), PIL.Image.BICUBIC)
    right = draw.attention_heatmap(attn, seen, query=query).resize((panel, panel), PIL.Image.BICUBIC)

    margin, gap, top = 24, 24, 64
    W = 2 * panel + gap + 2 * margin
    head, body, small = _font(19), _font(15), _font(13)
    probe = PIL.ImageDraw.Draw(PIL.Image.new("RGB", (W, 10)))
    caption_lines = _wrap(probe, f'caption: "{result.caption}"', body, W - 2 * margin)
    note = f"right: {why}, over the picture as the model reads it (squashed to the model's image size)"
    note_lines = _wrap(probe, note, small, W - 2 * margin) + ["Regenerate: python docs/make_docs.py"]
    H = top + 28 + panel + 14 + 22 * len(caption_lines) + 18 * len(note_lines) + 20
    img = PIL.Image.new("RGB", (W, H), "white")
    d = PIL.ImageDraw.Draw(img)
    d.text(
        (margin, 14),
        "The miniature (5.7 M parameters, trained on synthetic shapes) on a synthetic scene",
        fill=(0, 0, 0),
        font=head,
    )
    d.text(
        (margin, 40),
        f"not the real Kosmos-2 · kosmos2_ref.world scene {seed} · greedy decoding",
        fill=(110, 110, 110),
        font=small,
    )
    d.text((margin, top + 4), "grounded caption, boxes drawn (tasks.caption)", fill=(40, 40, 40), font=body)
    d.text(
        (margin + panel + gap, top + 4), f"connector: latent query {query}'s attention", fill=(40, 40, 40), font=body
    )
    img.paste(left, (margin, top + 28))
    img.paste(right, (margin + panel + gap, top + 28))
    y = top + 28 + panel + 12
    for line in caption_lines:
        d.text((margin, y), line, fill=(0, 0, 0), font=body)
        y += 22
    for line in note_lines:
        d.text((margin, y + 6), line, fill=(110, 110, 110), font=small)
        y += 18
    return img


def save_png(img, path: Path) -> bool:
    """Write ``img`` when its pixels differ from the file's (so unchanged figures keep their bytes)."""
    import PIL.Image

    if path.is_file():
        with PIL.Image.open(path) as old:
            if old.size == img.size and old.convert("RGB").tobytes() == img.convert("RGB").tobytes():
                return False
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return True


# ================================================================================================================


def generated_blocks(skip_parity: bool) -> dict[str, tuple[str, str]]:
    """name -> (file, body) for every block to write."""
    blocks = {
        "params": ("architecture.md", params_block()),
        "shapes": ("architecture.md", shapes_block()),
        "storage": ("backends.md", storage_block()),
        "erf": ("backends.md", erf_block()),
        "api": ("api.md", api_block()),
        "cli": ("api.md", cli_block()),
    }
    if not skip_parity:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            print("make_docs: torch/transformers not installed; the parity block is left as it is")
        else:
            blocks["parity"] = ("parity.md", measure_parity())
    return blocks


def stale_blocks() -> list[str]:
    """The checked blocks whose text differs from what the code generates now."""
    now = {"params": params_block(), "shapes": shapes_block(), "storage": storage_block(), "api": api_block()}
    return [name for name, body in now.items() if read_block(DOCS / CHECKED[name], name) != body]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a checked block is stale; write nothing")
    ap.add_argument("--skip-parity", action="store_true", help="do not run the transformers measurements")
    ap.add_argument("--skip-figures", action="store_true", help="do not redraw the figures")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_blocks()
        for name in stale:
            print(f"docs/{CHECKED[name]}: block {name!r} is stale; run python docs/make_docs.py")
        return 1 if stale else 0
    for name, (fname, body) in generated_blocks(args.skip_parity).items():
        changed = write_block(DOCS / fname, name, body)
        print(f"docs/{fname}: {name} {'updated' if changed else 'unchanged'}")
    if not args.skip_figures:
        figures = (
            ("dataflow.png", dataflow_figure()),
            ("patch_grid.png", patch_grid_figure()),
            ("mini_grounding.png", mini_grounding_figure()),
        )
        for fname, fig in figures:
            changed = save_png(fig, FIGURES / fname)
            print(f"docs/figures/{fname}: {'written' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
