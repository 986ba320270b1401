"""Shared set-up for the notebooks: one checkpoint, our model and processor, a test image, and transformers
(when it is installed) reading the very same files.

    from _setup import compare, setup
    S = setup()          # S.model, S.processor, S.config, S.params, S.folder, S.kind, S.image
    inputs = S.inputs("<grounding> An image of")     # our processor on S.image: a dict of NumPy arrays
    hf = S.hf_model()    # transformers' Kosmos2ForConditionalGeneration on S.folder (ImportError without torch)
    compare("logits", ours, theirs)                  # prints and returns max |Δ|

The image is the photo shipped in the package (``kosmos2_ref/assets/two_dogs.jpg``), or with ``setup(model="mini")``
a scene of the miniature's synthetic world; :data:`SCENES` says what is where in each, for the grounding lessons.

Where the weights come from:

1. ``$KOSMOS2_WEIGHTS`` set: a checkpoint folder (for example a download of microsoft/kosmos-2-patch14-224), or
   a Hub id found in the local Hugging Face cache ("hub" stands for microsoft/kosmos-2-patch14-224). Nothing is
   downloaded. The lessons then run on the real 1.66 B-parameter model: slower (minutes), and the captions mean
   something.
2. Otherwise a tiny checkpoint with seeded random weights (every weight redrawn, LayerNorms included), written to
   a temporary folder that is removed when the kernel exits:
   * with torch + transformers installed, it is a transformers ``Kosmos2ForConditionalGeneration`` with a tiny
     config saved with ``save_pretrained``, so every parity cell compares the two libraries on one set of files;
   * without them, the NumPy-only builder of :mod:`kosmos2_ref.demo` (:func:`write_numpy_checkpoint` below is
     the fallback should that import fail).
   The tokenizer and processor files are written by kosmos2_ref's ``Kosmos2Processor.default()``: the real
   Kosmos-2 tokenizer, shipped in the package.

The tiny config keeps every *count* of the real model (65037 ids, 224-pixel images, 14-pixel patches, 257 vision
tokens, 64 latent queries) and shrinks the widths and depths, so shapes read like the real ones and a forward
pass takes milliseconds.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message="IProgress not found")     # tqdm.auto in a kernel without ipywidgets

# The tests' TINY config (tests/fixtures_model.py): real counts, tiny widths.
TINY = {
    "text_config": {"vocab_size": 65037, "embed_dim": 32, "layers": 2, "ffn_dim": 64, "attention_heads": 4,
                    "max_position_embeddings": 64},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "image_size": 224, "patch_size": 14},
    "latent_query_num": 64,
}


def have_transformers() -> bool:
    """True when torch and transformers import (the parity cells need both)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# Building a tiny random checkpoint

def _randomize_torch_(model, seed: int) -> None:
    """Redraw every parameter from a seeded generator: LayerNorm weights 1 ± 0.2, other vectors ± 0.2, matrices
    with std 1/√fan_in (latent queries and position vectors 0.5, token embeddings 0.05). Identity LayerNorms hide
    bugs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_draw(name, tuple(p.shape), lambda shape: torch.randn(shape, generator=g)))


def _draw(name: str, shape: tuple, randn):
    """One parameter's random value. The token embedding is small (std 0.05): with a large tied embedding a tiny
    random model only repeats its last token, a small one lets the blocks matter and the tokens vary."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(s in name for s in ("layer_norm", "layernorm", "layrnorm", "_ln."))
    if len(shape) == 1 and is_norm and leaf == "weight":
        return 1.0 + 0.2 * randn(shape)
    if len(shape) == 1:
        return 0.2 * randn(shape)
    fan_in = shape[-1] if len(shape) == 2 else math.prod(shape[1:])
    std = 0.05 if "embed_tokens" in name else 0.5 if any(s in name for s in ("latent_query", "position_embedding")) \
        else 1.0 / math.sqrt(fan_in)
    return std * randn(shape)


def _quiet_transformers() -> None:
    """No progress bars or warnings from transformers in the lessons' output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def write_transformers_checkpoint(folder: Path, config: dict = TINY, seed: int = 0) -> Path:
    """A transformers Kosmos2ForConditionalGeneration with ``config`` and seeded random weights, saved to
    ``folder`` with ``save_pretrained`` (config.json, generation_config.json, model.safetensors)."""
    import torch
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    _quiet_transformers()

    torch.manual_seed(seed)
    model = Kosmos2ForConditionalGeneration(Kosmos2Config(**json.loads(json.dumps(config))))
    _randomize_torch_(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_numpy_checkpoint(folder: Path, config: dict = TINY, seed: int = 0) -> Path:
    """The same kind of checkpoint without torch: random weights for every key of
    ``kosmos2_ref.weights.expected_shapes`` written as safetensors, and a config.json transformers can read."""
    from kosmos2_ref.config import Kosmos2Config
    from kosmos2_ref.weights import expected_shapes, save_safetensors

    cfg = Kosmos2Config.from_dict(json.loads(json.dumps(config)))
    rng = np.random.default_rng(seed)
    flat = {k: _draw(k, s, lambda shape: rng.standard_normal(shape)).astype(np.float32)
            for k, s in expected_shapes(cfg).items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(flat, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    gen = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# The test image

PHOTO = Path(__file__).resolve().parents[1] / "kosmos2_ref" / "assets" / "two_dogs.jpg"

# What is where in each picture (normalised x1, y1, x2, y2), for the grounding lesson: a caption as the model
# writes it, with {phrase} marking each grounded phrase.
SCENES = {
    "photo": ("An image of {two puppies} sitting in {a field of flowers}",
              {"two puppies": [(0.28, 0.13, 0.51, 0.97), (0.51, 0.08, 0.75, 0.98)],
               "a field of flowers": [(0.0, 0.45, 1.0, 1.0)]}),
    "drawing": ("An image of {a snowman} warming himself by {a fire}",
                {"a snowman": [(0.19, 0.17, 0.5, 0.9)], "a fire": [(0.61, 0.54, 0.86, 0.87)]}),
}


def drawn_image(width: int = 320, height: int = 240) -> PIL.Image.Image:
    """A picture drawn with PIL, for when the packaged photo is missing: a snowman by a fire under a sun."""
    img = PIL.Image.new("RGB", (width, height), (120, 170, 225))          # sky
    d = PIL.ImageDraw.Draw(img)
    sx, sy = width / 320, height / 240
    box = lambda x1, y1, x2, y2: (x1 * sx, y1 * sy, x2 * sx, y2 * sy)     # noqa: E731
    d.rectangle(box(0, 170, 320, 240), fill=(238, 242, 248))               # snow
    d.ellipse(box(250, 15, 300, 65), fill=(250, 215, 60))                  # sun
    d.ellipse(box(60, 120, 160, 215), fill=(252, 252, 252), outline=(180, 190, 200))   # snowman, bottom
    d.ellipse(box(75, 75, 145, 135), fill=(252, 252, 252), outline=(180, 190, 200))    # middle
    d.ellipse(box(88, 40, 132, 84), fill=(252, 252, 252), outline=(180, 190, 200))     # head
    d.rectangle(box(86, 78, 134, 88), fill=(200, 30, 40))                  # scarf
    d.polygon([(110 * sx, 60 * sy), (128 * sx, 64 * sy), (110 * sx, 66 * sy)], fill=(240, 120, 20))   # nose
    for ex in (101, 115):
        d.ellipse(box(ex, 52, ex + 4, 56), fill=(20, 20, 20))              # eyes
    d.polygon([(205 * sx, 200 * sy), (235 * sx, 130 * sy), (265 * sx, 200 * sy)], fill=(245, 120, 20))   # fire
    d.polygon([(220 * sx, 200 * sy), (235 * sx, 155 * sy), (250 * sx, 200 * sy)], fill=(255, 220, 60))
    d.rectangle(box(195, 198, 275, 208), fill=(110, 70, 40))               # logs
    return img


def demo_image() -> tuple[PIL.Image.Image, str]:
    """(image, scene name): the photo shipped in the package (microsoft/unilm's two_dogs.jpg, 1200×602), or
    the drawing when it is missing."""
    if PHOTO.is_file():
        with PIL.Image.open(PHOTO) as im:
            return im.convert("RGB"), "photo"
    return drawn_image(), "drawing"


# ----------------------------------------------------------------------------------------------------------------
# The set-up object

@dataclass
class Setup:
    folder: Path                 # the checkpoint both libraries read
    kind: str                    # "real", "mini", "random (transformers)" or "random (numpy)"
    model: object                # kosmos2_ref.Kosmos2
    processor: object            # kosmos2_ref.processing.Kosmos2Processor
    image: PIL.Image.Image
    scene: str                   # a key of SCENES: what is where in the image
    _hf: dict = field(default_factory=dict, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def params(self):
        return self.model.params

    @property
    def is_real(self) -> bool:
        return self.kind == "real"

    def hf_model(self):
        """transformers' Kosmos2ForConditionalGeneration loaded from :attr:`folder` (eager attention, eval mode).
        Raises ImportError when torch or transformers is missing."""
        if "model" not in self._hf:
            import torch  # noqa: F401  (ImportError here is the signal to skip)
            from transformers import Kosmos2ForConditionalGeneration

            _quiet_transformers()
            self._hf["model"] = Kosmos2ForConditionalGeneration.from_pretrained(
                self.folder, attn_implementation="eager").eval()
        return self._hf["model"]

    def hf_processor(self):
        """transformers' Kosmos2Processor on :attr:`folder`, with the PIL image path (the one we match bit for bit;
        the torchvision path differs by a level in a few pixels, docs/numerics.md §12.4). Raises ImportError
        without them."""
        if "processor" not in self._hf:
            from transformers import AutoProcessor

            _quiet_transformers()
            self._hf["processor"] = AutoProcessor.from_pretrained(self.folder, backend="pil")
        return self._hf["processor"]

    def scene_caption(self) -> tuple[str, dict]:
        """(caption with {phrase} marks, {phrase: [boxes]}) for :attr:`image`."""
        return SCENES[self.scene]

    def inputs(self, text: str = "<grounding> An image of", image=None) -> dict:
        """Our processor's model inputs for one prompt and the demo image: NumPy arrays."""
        return self.processor(text=text, images=self.image if image is None else image)

    def describe(self) -> str:
        t, v = self.config.text_config, self.config.vision_config
        return (f"checkpoint: {self.kind} ({self.folder})\n"
                f"  vision: {v.num_hidden_layers} blocks, width {v.hidden_size}, {v.num_attention_heads} heads, "
                f"{v.image_size}px images in {v.patch_size}px patches\n"
                f"  text:   {t.layers} blocks, width {t.embed_dim}, {t.attention_heads} heads, {t.vocab_size} ids; "
                f"{self.config.latent_query_num} latent queries\n"
                f"  {self.model.num_parameters():,} parameters; transformers available: {have_transformers()}")


def compare(name: str, ours, ref) -> float:
    """Print max |ours − ref| (NumPy vs NumPy or torch) llm.c-style, and return it relative to the reference's size:
    max |Δ| / max(1, max |ref|), so one tolerance serves the tiny checkpoint and the real one."""
    from kosmos2_ref.backend import to_numpy

    a = np.asarray(to_numpy(ours), dtype=np.float64)
    b = np.asarray(ref.detach().cpu().numpy() if hasattr(ref, "detach") else ref, dtype=np.float64)
    assert a.shape == b.shape, f"{name}: shape {a.shape} != reference {b.shape}"
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    print(f"{name:<40s} shape {str(a.shape):<18s} max|Δ| = {err:.2e}  (max|ref| = {scale:.2e})")
    return err / max(1.0, scale)


_TMP: list[tempfile.TemporaryDirectory] = []
_CACHE: dict = {}


def _resolve_weights() -> tuple[Path, str] | None:
    value = os.environ.get("KOSMOS2_WEIGHTS", "").strip()
    if not value:
        return None
    from kosmos2_ref.hub import DEFAULT_MODEL_ID, resolve_checkpoint

    if value.lower() in ("hub", "1", "true", "yes"):
        value = DEFAULT_MODEL_ID
    return resolve_checkpoint(value, local_files_only=True), "real"     # never downloads


def _build_tiny(seed: int) -> tuple[Path, str]:
    tmp = tempfile.TemporaryDirectory(prefix="kosmos2-notebook-")
    _TMP.append(tmp)
    atexit.register(tmp.cleanup)
    folder = Path(tmp.name) / "tiny"
    if have_transformers():
        return write_transformers_checkpoint(folder, TINY, seed), "random (transformers)"
    try:
        from kosmos2_ref.demo import build_demo_checkpoint    # the package's NumPy-only builder
    except ImportError:
        return write_numpy_checkpoint(folder, TINY, seed), "random (numpy)"
    return Path(build_demo_checkpoint(folder, seed)), "random (numpy)"


WORLD_SEED = 3          # the generated scene the miniature's lessons look at (the demo's scene)


def world_image() -> tuple[PIL.Image.Image, str]:
    """A scene of the synthetic world (kosmos2_ref.world) at 224 px; it is registered in :data:`SCENES` as
    ``"world"``, with the caption and boxes the miniature was trained to write for it."""
    from kosmos2_ref import world

    scene = world.make_scene(WORLD_SEED, image_size=224)
    phrases = world.caption_phrases(scene)
    template = "An image of" + " and".join(f" {{{phrase}}}" for phrase, _ in phrases)
    SCENES["world"] = (template, {phrase: [tuple(b) for b in boxes] for phrase, boxes in phrases})
    return world.render(scene), "world"


def _mini() -> tuple[Path, str]:
    from kosmos2_ref.hub import resolve_checkpoint

    return resolve_checkpoint("mini"), "mini"


def setup(seed: int = 0, model: str = "tiny") -> Setup:
    """The checkpoint, model, processor and image for a lesson (built once per kernel).

    ``model="tiny"``: a tiny random checkpoint with the real model's counts (224-pixel images, 257 vision tokens,
    65037 ids) and the packaged photo; ``model="mini"``: the packaged miniature trained on synthetic shapes and a
    scene of its world, so captions, boxes and attention maps mean something. ``$KOSMOS2_WEIGHTS`` (the real
    weights) overrides both.
    """
    if model not in ("tiny", "mini"):
        raise ValueError(f"model must be 'tiny' or 'mini', got {model!r}")
    key = (seed, model)
    if key in _CACHE:
        return _CACHE[key]
    from kosmos2_ref import Kosmos2
    from kosmos2_ref.processing import Kosmos2Processor

    found = _resolve_weights()
    if found is None and model == "mini":
        found = _mini()
    folder, kind = found if found is not None else _build_tiny(seed)
    if kind in ("real", "mini"):
        try:
            processor = Kosmos2Processor.from_pretrained(folder)
        except ValueError:
            processor = Kosmos2Processor.default()
    else:
        processor = Kosmos2Processor.default()
        if not (folder / "tokenizer.json").is_file():
            processor.save_pretrained(folder)          # so transformers' AutoProcessor reads the same tokenizer
    net = Kosmos2.from_pretrained(folder)
    image, scene = world_image() if kind == "mini" else demo_image()
    s = Setup(folder=folder, kind=kind, model=net, processor=processor, image=image, scene=scene)
    _CACHE[key] = s
    return s


def cleanup() -> None:
    """Remove the temporary checkpoint folders now (they are removed at exit anyway)."""
    for tmp in _TMP:
        tmp.cleanup()
    _TMP.clear()
    _CACHE.clear()
