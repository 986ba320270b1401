"""What the web page asks of the model, without HTTP: uploads, the three tasks with their tokens and confidences,
and the connector's attention. ``kosmos2_ref.server`` puts it on the network; scripts may use it directly.

One :class:`ModelService` owns one model. Its model is used by one request at a time (a lock), and at most
``max_waiting`` more may wait for it; a request beyond those is refused at once with :class:`Busy` (the server
answers 503) instead of piling up threads. Images are decoded once on upload, outside the lock, and kept by id in
a small least-recently-used store, so captioning, grounding and the heat maps of one image do not upload it again.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import PIL.ImageOps

from .backend import to_numpy
from .confidence import TagIds, entity_confidences, token_probabilities
from .draw import attention_heatmap, attention_map
from .generation import generate
from .processing.grounding import box_to_pixels, entities_to_pixel_boxes
from .processing.image import load_image
from .tasks import DEFAULT_CAPTION_PROMPT, GROUND_MAX_NEW_TOKENS, CaptionStreamer, model_processor, normalise_box

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # 10 MiB: a large phone photo; the model sees 224 x 224 anyway
MAX_IMAGE_PIXELS = 40_000_000  # 40 megapixels decoded (about 120 MB as RGB)
MAX_NEW_TOKENS_LIMIT = 128  # one request cannot hold the model for long
DEFAULT_MAX_NEW_TOKENS = 48
KEPT_IMAGES = 16
HEATMAP_SIDE = 448
# The formats Pillow is allowed to try: decoding decides what a file is, never its name or Content-Type.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


class RequestError(ValueError):
    """A bad request, with the HTTP status it deserves (400 unless said otherwise)."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class Busy(RequestError):
    """The model is in use and the queue of waiting requests is full."""

    status = 503


# ----------------------------------------------------------------------------------------------------------------
# Uploads


def decode_upload(
    data: bytes, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_IMAGE_PIXELS
) -> PIL.Image.Image:
    """The bytes of an uploaded file -> an RGB image, or a RequestError saying what is wrong with it.

    The size is checked before decoding (413), the pixel count from the header before the pixels are decoded
    (413: a small file can expand into gigabytes, a "decompression bomb"), and the content by decoding it (400).
    """
    if len(data) == 0:
        raise RequestError("the upload is empty: send the bytes of an image file (JPEG, PNG, ...)")
    if len(data) > max_bytes:
        raise RequestError(f"the upload is {len(data):,} bytes; the limit is {max_bytes:,}", 413)
    try:
        img = PIL.Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except PIL.Image.DecompressionBombError as exc:
        raise RequestError(f"the image is too large to decode safely ({exc})", 413) from None
    except (PIL.UnidentifiedImageError, OSError, ValueError):
        raise RequestError(
            f"the upload is not an image this server decodes; expected one of {', '.join(IMAGE_FORMATS)}"
        ) from None
    width, height = img.size
    if width * height > max_pixels:
        raise RequestError(
            f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}", 413
        )
    try:
        img.load()  # the pixels are decoded here; a truncated file fails here
        img = PIL.ImageOps.exif_transpose(img)  # as a photo is shown, as processing.image.load_image does for paths
        return load_image(img, "the upload")  # RGB, exactly as the processor converts it
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestError(f"the upload could not be decoded as an image: {' '.join(str(exc).split())}") from None


@dataclass
class StoredImage:
    image: PIL.Image.Image
    attention: np.ndarray | None = None  # projection_attentions [1, H, Q, S], computed on first use


class ImageStore:
    """The last ``capacity`` uploaded images by id (the sha256 of their pixels), least recently used dropped."""

    def __init__(self, capacity: int = KEPT_IMAGES):
        self.capacity = capacity
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, img: PIL.Image.Image) -> str:
        digest = hashlib.sha256(f"{img.size}".encode() + img.tobytes()).hexdigest()[:16]
        with self._lock:
            if digest not in self._items:
                self._items[digest] = StoredImage(img)
            self._items.move_to_end(digest)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return digest

    def get(self, image_id) -> StoredImage:
        if not isinstance(image_id, str) or not image_id:
            raise RequestError(f"image_id must be the string POST /api/images returned, got {image_id!r}")
        with self._lock:
            item = self._items.get(image_id)
            if item is not None:
                self._items.move_to_end(image_id)
        if item is None:
            raise RequestError(
                f"image_id {image_id!r} is not known (the server keeps the last {self.capacity} "
                f"uploads): upload the image again with POST /api/images",
                404,
            )
        return item


# ----------------------------------------------------------------------------------------------------------------
# One generation run, with its tokens and their probabilities


@dataclass
class Run:
    """Everything one generation produced, for the page's raw view and for the confidences."""

    ids: list[int]
    prompt_length: int
    image_positions: list[int]  # prompt positions holding the 64 image embeddings
    probs: np.ndarray  # [generated] probability of each generated token
    text: str  # after </image>, tags kept, prompt included
    caption: str
    entities: list = field(default_factory=list)  # processing.grounding.Entity
    confidences: list = field(default_factory=list)  # confidence.EntityConfidence | None, one per entity


Emit = Callable[[str, dict], None]  # (event name, data): how a run reports progress


def _short_name(name_or_path: str | None) -> str:
    """A Hub id as it is; a checkpoint folder by its own name (the page need not show where the disk keeps it)."""
    if not name_or_path:
        return "model"
    path = Path(name_or_path)
    return path.name if path.is_dir() else name_or_path


class ModelService:
    """One model and its processor behind a lock, with a bounded queue; the page's operations as methods that
    return JSON-ready dicts (or raise RequestError)."""

    def __init__(
        self,
        model,
        processor=None,
        *,
        name: str | None = None,
        random_weights: bool = False,
        max_waiting: int = 4,
        max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
        default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        images: ImageStore | None = None,
    ):
        self.model = model
        self.processor = model_processor(model, processor)
        self.name = name or _short_name(getattr(model, "name_or_path", None))
        self.random_weights = random_weights
        self.max_new_tokens_limit = max(max_new_tokens_limit, default_max_new_tokens)
        self.default_max_new_tokens = default_max_new_tokens  # caption and describe, unless a request says
        self.images = images or ImageStore()
        self.tags = TagIds.from_tokenizer(self.processor.tokenizer, self.processor.num_patch_index_tokens)
        self.max_waiting = max_waiting
        self._model_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._admitted = 0  # requests running or waiting for the model

    # ----------------------------------------------------------------------------------------------- the queue
    @contextmanager
    def turn(self):
        """The model to oneself: wait in the queue for it, or raise Busy when the queue is full."""
        with self._count_lock:
            if self._admitted > self.max_waiting:  # one running and max_waiting waiting already
                raise Busy(f"the model is busy ({self.max_waiting} request(s) already waiting); try again shortly")
            self._admitted += 1
        try:
            with self._model_lock:
                yield
        finally:
            with self._count_lock:
                self._admitted -= 1

    @property
    def admitted(self) -> int:
        """How many requests hold or wait for the model now."""
        return self._admitted

    # ----------------------------------------------------------------------------------------------- facts
    def info(self) -> dict:
        cfg = self.model.config
        vc = cfg.vision_config
        return {
            "model": self.name,
            "random_weights": self.random_weights,
            "latent_queries": cfg.latent_query_num,
            "patch_grid": vc.image_size // vc.patch_size,
            "location_grid": self.processor.num_patches_per_side,
            "image_size": vc.image_size,
            "default_prompt": DEFAULT_CAPTION_PROMPT,
            "max_new_tokens": self.max_new_tokens_limit,
            "default_max_new_tokens": self.default_max_new_tokens,
            "max_upload_bytes": MAX_UPLOAD_BYTES,
            "max_image_pixels": MAX_IMAGE_PIXELS,
        }

    def upload(self, data: bytes, max_bytes: int = MAX_UPLOAD_BYTES) -> dict:
        img = decode_upload(data, max_bytes)
        image_id = self.images.put(img)
        return {"image_id": image_id, "width": img.width, "height": img.height}

    # ----------------------------------------------------------------------------------------------- checks
    def _max_new(self, value, default: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.max_new_tokens_limit:
            raise RequestError(
                f"max_new_tokens must be an integer from 1 to {self.max_new_tokens_limit}, got {value!r}"
            )
        return value

    # ----------------------------------------------------------------------------------------------- running
    def _token(self, token_id: int, position: int, prob=None) -> dict:
        entry = {
            "position": position,
            "id": int(token_id),
            "token": self.processor.tokenizer.id_to_token(int(token_id)),
        }
        if prob is not None:
            entry["prob"] = float(prob)
        return entry

    def _stream_hooks(self, inputs: dict, image_positions: list[int], emit: Emit):
        """(streamer, callback) for ``generate`` that report a run as it goes: "prompt" (every prompt token), "text"
        (the prompt's own words), then one "token" per generated token with the text it adds to the caption.

        The streamer (tasks.CaptionStreamer) decodes the caption so far, tags stripped; ``generate`` calls it and
        then the callback at each step, so the callback sends the token together with the piece it produced.
        """
        prompt_ids = [int(i) for i in inputs["input_ids"][0]]
        T = len(prompt_ids)
        emit(
            "prompt",
            {"tokens": [self._token(t, i) for i, t in enumerate(prompt_ids)], "image_positions": image_positions},
        )
        piece = {"text": ""}
        streamer = CaptionStreamer(self.processor, inputs["input_ids"], lambda s: piece.update(text=s))
        streamer.start()
        if piece["text"]:
            emit("text", {"text": piece["text"]})

        def callback(step: int, token_ids) -> None:
            emit("token", {**self._token(int(token_ids[0]), T + step), "text": piece["text"]})
            piece["text"] = ""

        return streamer, callback

    def _run(self, img, prompt: str, bboxes, max_new_tokens: int, emit: Emit | None) -> Run:
        """Generate after ``prompt`` (greedy, the checkpoint's settings) keeping each step's scores."""
        inputs = self.processor(text=prompt, images=img, bboxes=bboxes)
        T = inputs["input_ids"].shape[1]
        image_positions = [int(i) for i in np.flatnonzero(inputs["image_embeds_position_mask"][0])]
        streamer, callback = self._stream_hooks(inputs, image_positions, emit) if emit else (None, None)
        out = generate(
            self.model,
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            image_embeds_position_mask=inputs["image_embeds_position_mask"],
            max_new_tokens=max_new_tokens,
            output_scores=True,
            return_dict_in_generate=True,
            streamer=streamer,
            callback=callback,
        )
        ids = [int(i) for i in np.asarray(to_numpy(out.sequences))[0]]
        probs = token_probabilities(out.scores, ids[T:])
        decoded = self.processor.decode(ids, skip_special_tokens=True)
        text = self.processor.post_process_generation(decoded, cleanup_and_extract=False)
        caption, raw = self.processor.post_process_generation(decoded)
        confidences = entity_confidences(ids, T, probs, self.tags, raw, self.processor.num_patches_per_side)
        return Run(ids, T, image_positions, probs, text, caption, entities_to_pixel_boxes(raw, img.size), confidences)

    def _run_dict(self, run: Run, img) -> dict:
        entities = []
        for entity, conf in zip(run.entities, run.confidences):
            entities.append({**entity.to_dict(), "confidence": conf.to_dict() if conf is not None else None})
        T = run.prompt_length
        return {
            "text": run.text,
            "caption": run.caption,
            "entities": entities,
            "image_size": list(img.size),
            "prompt_tokens": [self._token(t, i) for i, t in enumerate(run.ids[:T])],
            "image_positions": run.image_positions,
            "generated_tokens": [self._token(t, T + k, run.probs[k]) for k, t in enumerate(run.ids[T:])],
        }

    # ----------------------------------------------------------------------------------------------- the tasks
    def caption(self, image_id, prompt=None, max_new_tokens=None, emit: Emit | None = None) -> dict:
        """A grounded caption; ``emit`` receives "prompt", "text" and one "token" event per generated token."""
        item = self.images.get(image_id)
        prompt = DEFAULT_CAPTION_PROMPT if prompt is None else prompt
        if not isinstance(prompt, str) or len(prompt) > 2000:
            raise RequestError(f"prompt must be a string of at most 2000 characters, got {str(prompt)[:80]!r}")
        n = self._max_new(max_new_tokens, self.default_max_new_tokens)
        with self.turn():
            run = self._run(item.image, prompt, None, n, emit)
        return {"task": "caption", "prompt": prompt, **self._run_dict(run, item.image)}

    def ground(self, image_id, phrase, max_new_tokens=None) -> dict:
        """Where is ``phrase``? The boxes the model gives the ``<object>`` right after it."""
        item = self.images.get(image_id)
        if not isinstance(phrase, str) or not phrase.strip() or len(phrase) > 300:
            raise RequestError(f"phrase must be a non-empty string of at most 300 characters, got {phrase!r}"[:200])
        if "<" in phrase or ">" in phrase:
            raise RequestError(f"phrase {phrase!r} must not contain '<' or '>' (they delimit Kosmos-2's tags)")
        phrase = " ".join(phrase.split())
        n = self._max_new(max_new_tokens, GROUND_MAX_NEW_TOKENS)
        with self.turn():
            run = self._run(item.image, f"<grounding><phrase> {phrase}</phrase>", None, n, None)
        result = self._run_dict(run, item.image)
        # The prompt's phrase is the first entity when the model gave it an <object> (tasks.ground's rule).
        hit = next((e for e in result["entities"] if e["span"][0] == 0 and e["phrase"] == phrase), None)
        return {
            "task": "ground",
            "phrase": phrase,
            "boxes": hit["boxes"] if hit else [],
            "pixel_boxes": hit["pixel_boxes"] if hit else [],
            "confidence": hit["confidence"] if hit else None,
            **result,
        }

    def describe(self, image_id, box, max_new_tokens=None) -> dict:
        """What is in ``box`` ([x1, y1, x2, y2], normalised to [0, 1] or in pixels)? The model's sentence."""
        item = self.images.get(image_id)
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        ):
            raise RequestError(f"box must be a list of four numbers [x1, y1, x2, y2], got {box!r}"[:200])
        try:
            norm = normalise_box(box, item.image.size)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if not all(0.0 <= v <= 1.0 for v in norm):
            raise RequestError(f"box {box} lies outside the image")
        n = self._max_new(max_new_tokens, self.default_max_new_tokens)
        with self.turn():
            run = self._run(item.image, "<grounding><phrase> It</phrase>", [norm], n, None)
        return {
            "task": "describe",
            "box": list(norm),
            "pixel_box": list(box_to_pixels(norm, item.image.size)),
            "description": run.caption,
            **self._run_dict(run, item.image),
        }

    # ----------------------------------------------------------------------------------------------- connector
    def _attention(self, item: StoredImage) -> np.ndarray:
        if item.attention is None:
            with self.turn():
                pixel_values = self.processor(images=item.image)["pixel_values"]
                item.attention = np.asarray(to_numpy(self.model.encode_image(pixel_values)[1]), np.float32)
        return item.attention

    def attention(self, image_id) -> dict:
        """Each latent query's attention over the image patches, mean over heads: Q rows of side² weights, each
        summing to the share of its attention that went to the image (the rest went to CLS and the latent keys)."""
        item = self.images.get(image_id)
        grid = attention_map(self._attention(item), None)  # [Q, side, side]
        Q, side, _ = grid.shape
        return {"queries": Q, "side": side, "weights": np.round(grid.reshape(Q, -1), 6).tolist()}

    def heatmap_png(self, image_id, query) -> bytes:
        """Latent query ``query``'s heat map over the image (draw.attention_heatmap), as PNG bytes."""
        item = self.images.get(image_id)
        Q = self.model.config.latent_query_num
        try:
            q = int(query)
        except (TypeError, ValueError):
            raise RequestError(f"query must be an integer from 0 to {Q - 1}, got {query!r}") from None
        if not 0 <= q < Q:
            raise RequestError(f"query must be an integer from 0 to {Q - 1}, got {q}")
        small = item.image.copy()
        small.thumbnail((HEATMAP_SIDE, HEATMAP_SIDE))  # the map has 16 x 16 cells: a big PNG shows no more
        buffer = io.BytesIO()
        attention_heatmap(self._attention(item), small, q).save(buffer, format="PNG")
        return buffer.getvalue()
