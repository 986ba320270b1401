"""The things Kosmos-2 is for, one function each: grounded captions, referring expressions both ways, embeddings.

Each function takes the model first, then an image (a path, a PIL image or an array, as the processor takes
them: ``processing.image.load_image``), and returns a small dataclass::

    from kosmos2_ref import Kosmos2, tasks
    model = Kosmos2.from_pretrained("microsoft/kosmos-2-patch14-224")
    tasks.caption(model, "two_dogs.jpg").caption
    tasks.ground(model, "two_dogs.jpg", "a dog").boxes

``processor=`` (keyword) overrides the model's own processor, which :func:`model_processor` builds once per model.
Boxes come back both normalised to [0, 1] (``boxes``) and in pixels of the image given (``pixel_boxes``,
``processing.grounding.box_to_pixels``: ``int(coordinate · side)`` as the original demo computes them).
Entities are :class:`processing.grounding.Entity` objects (``tasks.Entity`` is the same class).

* :func:`caption` -- grounded captioning: the prompt ``"<grounding> An image of"`` makes the model wrap the
  phrases it names in ``<phrase>…</phrase><object>…</object>`` (docs/numerics.md §11).
* :func:`ground` -- referring expression comprehension: the prompt ``"<grounding><phrase> a snowman</phrase>"``
  makes the model emit the ``<object>`` of that phrase; its boxes are the answer.
* :func:`describe` -- referring expression generation: the prompt ``"<grounding><phrase> It</phrase>"`` with the
  box given as its ``<object>`` (the processor inserts it, docs/numerics.md §10.3); the model continues the
  sentence.
* :func:`embed` -- the image embeddings the decoder reads [N, 64, 2048] and the pooled CLIP vector [N, 1024].

Generation is :func:`kosmos2_ref.generate`: greedy with the checkpoint's defaults unless keyword arguments say
otherwise.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image

from .backend import to_numpy
from .checks import is_int
from .confidence import run_confidences
from .files import file_present
from .hub import CheckpointNotFoundError, resolve_checkpoint
from .processing import Kosmos2Processor
from .processing.grounding import Entity, box_to_pixels, entities_to_pixel_boxes, strip_tags
from .processing.image import ImageProcessorConfig, load_image
from .processing.tokenizer import Kosmos2Tokenizer

__all__ = [
    "CaptionResult",
    "CaptionStreamer",
    "DescribeResult",
    "EmbedResult",
    "Entity",
    "GroundResult",
    "caption",
    "describe",
    "embed",
    "ground",
    "model_processor",
    "processor_for",
]

DEFAULT_CAPTION_PROMPT = "<grounding> An image of"
DEFAULT_MAX_NEW_TOKENS = 64
GROUND_MAX_NEW_TOKENS = 16  # "<object> A B </object>" and the end: a few tokens suffice
DESCRIBE_PROMPT = "<grounding><phrase> It</phrase>"  # the box is inserted as its <object>


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class CaptionResult:
    """A grounded caption: ``caption`` without tags, its ``entities``, and the raw generated ``text`` (tags kept,
    the prompt included, everything after ``</image>``)."""

    caption: str
    entities: list[Entity]
    text: str
    image_size: tuple[int, int]  # (width, height)
    prompt: str = DEFAULT_CAPTION_PROMPT

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "caption": self.caption,
            "entities": [e.to_dict() for e in self.entities],
            "image_size": list(self.image_size),
            "prompt": self.prompt,
        }


@dataclass
class GroundResult:
    """Where ``phrase`` is: ``boxes`` (empty when the model gave it no ``<object>``)."""

    phrase: str
    boxes: list[tuple[float, float, float, float]]
    pixel_boxes: list[tuple[int, int, int, int]]
    text: str
    caption: str
    entities: list[Entity]
    image_size: tuple[int, int]

    def to_dict(self) -> dict:
        return {
            "phrase": self.phrase,
            "boxes": [list(b) for b in self.boxes],
            "pixel_boxes": [list(b) for b in self.pixel_boxes],
            "text": self.text,
            "caption": self.caption,
            "entities": [e.to_dict() for e in self.entities],
            "image_size": list(self.image_size),
        }


@dataclass
class DescribeResult:
    """What is in ``box``: ``description`` is the sentence the model wrote about it (starting with "It")."""

    box: tuple[float, float, float, float]
    pixel_box: tuple[int, int, int, int]
    description: str
    text: str
    entities: list[Entity]
    image_size: tuple[int, int]

    def to_dict(self) -> dict:
        return {
            "box": list(self.box),
            "pixel_box": list(self.pixel_box),
            "description": self.description,
            "text": self.text,
            "entities": [e.to_dict() for e in self.entities],
            "image_size": list(self.image_size),
        }


@dataclass
class EmbedResult:
    """``image_embeds`` [N, 64, C]: what the decoder reads; ``pooled`` [N, 1024]: the CLIP tower's pooled output
    (post-LayerNorm of the CLS token)."""

    image_embeds: np.ndarray
    pooled: np.ndarray
    names: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def normalise_box(box, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(x1, y1, x2, y2)`` -> normalised floats. Values in [0, 1] are taken as normalised; if any value is
    above 1 the box is in pixels and is divided by the image size. Raises ValueError naming the box."""
    if isinstance(box, str):
        parts = [p for p in box.replace(" ", ",").split(",") if p]
        try:
            box = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"box {box!r}: expected four numbers x1,y1,x2,y2") from None
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ValueError(f"box {box!r}: expected four numbers x1,y1,x2,y2") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"box {box!r}: expected four finite numbers x1,y1,x2,y2")
    if any(v < 0 for v in values):
        raise ValueError(f"box {tuple(values)}: coordinates must not be negative")
    w, h = image_size
    if any(v > 1 for v in values):  # pixels
        x1, y1, x2, y2 = values
        if x2 > w or y2 > h:
            raise ValueError(f"box {tuple(values)} (pixels) lies outside the {w}x{h} image")
        values = [x1 / w, y1 / h, x2 / w, y2 / h]
    x1, y1, x2, y2 = values
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"box {tuple(box) if not isinstance(box, str) else box}: needs x2 > x1 and y2 > y1")
    return x1, y1, x2, y2


# ----------------------------------------------------------------------------------------------------------------
# The processor of a model


def processor_for(model):
    """The processor of ``model``'s checkpoint folder (its tokenizer and preprocessor files); where the folder
    has none, the real Kosmos-2 processor built from the tokenizer packaged with kosmos2_ref."""
    folder = getattr(model, "folder", None)
    if folder is None and getattr(model, "name_or_path", None):
        try:
            folder = resolve_checkpoint(model.name_or_path, local_files_only=True)
        except CheckpointNotFoundError:
            folder = None
    if folder is not None:
        folder = Path(folder)
        has_tokenizer = file_present(folder / "tokenizer.json") or file_present(folder / "sentencepiece.bpe.model")
        has_images = file_present(folder / "preprocessor_config.json") or file_present(folder / "processor_config.json")
        if has_tokenizer and has_images:
            return Kosmos2Processor.from_pretrained(folder)
        if has_tokenizer:
            return Kosmos2Processor(Kosmos2Tokenizer.from_pretrained(folder), ImageProcessorConfig())
    return Kosmos2Processor.default()


_PROCESSORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its processor
_PROCESSORS_LOCK = threading.Lock()  # one build per model when threads ask for it together


def model_processor(model, processor=None):
    """``processor`` when one is given, else ``model``'s own: :func:`processor_for` built on first use and kept
    for as long as the model lives. Thread-safe: threads asking together get the same processor, built once."""
    if processor is not None:
        return processor
    with _PROCESSORS_LOCK:
        cached = _PROCESSORS.get(model)
        if cached is None:
            cached = _PROCESSORS[model] = processor_for(model)
    return cached


# ----------------------------------------------------------------------------------------------------------------
# Generation


class CaptionStreamer:
    """A ``put(token_ids)`` / ``end()`` streamer (transformers' ``BaseStreamer`` protocol) that calls
    ``on_text(piece)`` with each new piece of the caption as it grows, tags stripped.

    The first ``put`` of transformers-style generators is the prompt itself; it is recognised and not counted as
    generated. The text is re-decoded from the prompt on every step, so a word split over several tokens (and
    SentencePiece's leading spaces) come out right.
    """

    def __init__(self, processor, prompt_ids: np.ndarray, on_text: Callable[[str], None]):
        self.processor = processor
        self.prompt = [int(i) for i in np.asarray(prompt_ids).reshape(-1)]
        self.new: list[int] = []
        self.on_text = on_text
        self.shown = ""
        self._first = True

    def _clean(self) -> str:
        text = self.processor.decode(self.prompt + self.new, skip_special_tokens=True)
        return strip_tags(self.processor.post_process_generation(text, cleanup_and_extract=False)).lstrip()

    def put(self, token_ids) -> None:
        ids = [int(i) for i in np.asarray(to_numpy(token_ids)).reshape(-1)]
        first, self._first = self._first, False
        if first and ids == self.prompt:
            return
        self.new.extend(ids)
        text = self._clean()
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.on_text(text[len(self.shown) :])
            self.shown = text

    def start(self) -> None:
        """Show the prompt's own words (e.g. "An image of") before any token is generated."""
        text = self._clean()
        if text:
            self.on_text(text)
            self.shown = text

    def end(self) -> None:
        pass


def _generate(model, inputs: dict, max_new_tokens: int, streamer=None, **generate_kwargs):
    """:func:`kosmos2_ref.generate`'s output (greedy and the checkpoint's defaults unless ``generate_kwargs`` say
    otherwise, e.g. ``num_beams=3``), with each step's scores for the confidences."""
    from .generation import generate

    if streamer is not None:
        generate_kwargs["streamer"] = streamer
    generate_kwargs.update(output_scores=True, return_dict_in_generate=True)
    return generate(
        model,
        pixel_values=inputs["pixel_values"],
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        image_embeds_position_mask=inputs["image_embeds_position_mask"],
        max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )


def _confidences(model, processor, out, raw_entities) -> list:
    """Each raw entity's :class:`~kosmos2_ref.confidence.EntityConfidence` (or None) from the run's scores; all
    None under beam search, whose scores are the beams' and not the chosen tokens' own."""
    if not out.scores or out.scores[0].shape[0] != 1:
        return [None] * len(raw_entities)
    return run_confidences(out, 0, processor, model.config.text_config.eos_token_id, raw_entities)


def _with_confidences(entities: list[Entity], confidences: list) -> list[Entity]:
    for entity, conf in zip(entities, confidences):
        entity.confidence = conf
    return entities


def _check_max_new_tokens(n) -> int:
    if not is_int(n) or n < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {n!r}")
    return int(n)


def run_prompt(
    model,
    processor,
    image,
    prompt: str,
    bboxes=None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    on_text: Callable[[str], None] | None = None,
    **generate_kwargs,
):
    """Generate after ``prompt`` about ``image``: (raw text after </image>, caption, raw entities, PIL image,
    each raw entity's confidence or None).

    ``on_text`` receives the caption piece by piece as it is generated (tags stripped); ``generate_kwargs`` go
    to :func:`kosmos2_ref.generate`.
    """
    processor = model_processor(model, processor)
    max_new_tokens = _check_max_new_tokens(max_new_tokens)
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    img = load_image(image)
    inputs = processor(text=prompt, images=img, bboxes=bboxes)
    streamer = None
    if on_text is not None:
        streamer = CaptionStreamer(processor, inputs["input_ids"], on_text)
        streamer.start()
    out = _generate(model, inputs, max_new_tokens, streamer, **generate_kwargs)
    decoded = processor.batch_decode(np.asarray(to_numpy(out.sequences)), skip_special_tokens=True)[0]
    text = processor.post_process_generation(decoded, cleanup_and_extract=False)
    caption_text, raw_entities = processor.post_process_generation(decoded)
    return text, caption_text, raw_entities, img, _confidences(model, processor, out, raw_entities)


# ----------------------------------------------------------------------------------------------------------------
# The tasks


def caption(
    model,
    image,
    *,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    on_text: Callable[[str], None] | None = None,
    processor=None,
    **generate_kwargs,
) -> CaptionResult:
    """A grounded caption of ``image``: the caption, the phrases it grounds and their boxes.

    ``prompt`` defaults to ``"<grounding> An image of"``; ``"<grounding> Describe this image in detail:"`` gives
    longer captions; without ``<grounding>`` the model writes plain text. ``on_text(piece)`` receives the caption
    as it grows; ``generate_kwargs`` (``num_beams=``, ``no_repeat_ngram_size=``, ...) go to
    :func:`kosmos2_ref.generate`.
    """
    text, cap, raw, img, conf = run_prompt(
        model, processor, image, prompt, None, max_new_tokens, on_text, **generate_kwargs
    )
    return CaptionResult(cap, _with_confidences(entities_to_pixel_boxes(raw, img.size), conf), text, img.size, prompt)


def ground(
    model, image, phrase: str, *, max_new_tokens: int = GROUND_MAX_NEW_TOKENS, processor=None, **generate_kwargs
) -> GroundResult:
    """Where is ``phrase`` in ``image``? The boxes of the ``<object>`` the model emits right after it."""
    phrase = check_phrase(phrase)
    text, cap, raw, img, conf = run_prompt(
        model, processor, image, ground_prompt(phrase), None, max_new_tokens, **generate_kwargs
    )
    result = ground_result(phrase, text, cap, raw, img.size)
    _with_confidences(result.entities, conf)
    return result


def check_phrase(phrase) -> str:
    """A phrase to ground, whitespace collapsed; a ValueError naming it when it is empty or holds a tag bracket."""
    if not isinstance(phrase, str) or not phrase.strip():
        raise ValueError(f"phrase must be a non-empty string, got {phrase!r}")
    if "<" in phrase or ">" in phrase:
        raise ValueError(f"phrase {phrase!r} must not contain '<' or '>' (they delimit Kosmos-2's tags)")
    return " ".join(phrase.split())


def ground_prompt(phrase: str) -> str:
    return f"<grounding><phrase> {phrase}</phrase>"


def ground_result(phrase: str, text: str, cap: str, raw_entities, image_size) -> GroundResult:
    """The GroundResult of a generated ``text``: the boxes the model gave the prompt's ``phrase``."""
    entities = entities_to_pixel_boxes(raw_entities, image_size)
    # The prompt's phrase is the caption's first entity when the model gave it an <object>.
    hit = next((e for e in entities if e.span[0] == 0 and e.phrase == phrase), None)
    boxes = hit.boxes if hit else []
    return GroundResult(phrase, boxes, [box_to_pixels(b, image_size) for b in boxes], text, cap, entities, image_size)


def describe(
    model, image, box, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, processor=None, **generate_kwargs
) -> DescribeResult:
    """What is in ``box`` of ``image``? ``box`` is (x1, y1, x2, y2), normalised to [0, 1] or, when any value is
    above 1, in pixels."""
    img = load_image(image)
    if box is None:
        raise ValueError("box is required: (x1, y1, x2, y2), normalised or in pixels")
    norm = normalise_box(box, img.size)
    text, cap, raw, img, conf = run_prompt(
        model, processor, img, DESCRIBE_PROMPT, [norm], max_new_tokens, **generate_kwargs
    )
    entities = _with_confidences(entities_to_pixel_boxes(raw, img.size), conf)
    return DescribeResult(norm, box_to_pixels(norm, img.size), cap, text, entities, img.size)


def embed(
    model, images, *, batch_size: int = 8, progress: Callable[[int, int, str], None] | None = None, processor=None
) -> EmbedResult:
    """Image embeddings [N, 64, C] (what the decoder reads) and pooled CLIP vectors [N, 1024] of ``images`` (a
    list of paths / PIL images / arrays, or one), ``batch_size`` at a time. ``progress(done, total, name)`` is
    called with ``done=0`` before the first image and after each image."""
    processor = model_processor(model, processor)
    if images is None or isinstance(images, (str, Path, PIL.Image.Image, np.ndarray)):
        images = [images] if images is not None else []
    images = list(images)
    if not images:
        raise ValueError("embed needs at least one image")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    names = [str(im) if isinstance(im, (str, Path)) else f"image[{i}]" for i, im in enumerate(images)]
    embeds, pooled = [], []
    if progress is not None:
        progress(0, len(images), "")
    for start in range(0, len(images), batch_size):
        chunk = [load_image(im, f"images[{start + j}]") for j, im in enumerate(images[start : start + batch_size])]
        pv = processor(images=chunk)["pixel_values"]  # [b, 3, 224, 224]
        e, _, vout = model.encode_image(pv)
        embeds.append(np.asarray(to_numpy(e), dtype=np.float32))  # [b, 64, C]
        pooled.append(np.asarray(to_numpy(vout.pooler_output), dtype=np.float32))  # [b, 1024]
        if progress is not None:
            for j in range(len(chunk)):
                progress(start + j + 1, len(images), names[start + j])
    return EmbedResult(np.concatenate(embeds), np.concatenate(pooled), names)
