"""Pictures of what the model says: grounded boxes with their phrases, and the connector's attention maps.

* :func:`draw_entities` draws each entity's boxes in its own colour with the phrase on a filled label; line width
  and font size scale with the image. It takes :class:`kosmos2_ref.processing.grounding.Entity` objects (what the
  tasks return; ``processing.entities_to_pixel_boxes`` makes them of ``post_process_generation``'s tuples). Boxes
  are placed by the library's one rule, ``processing.grounding.box_to_pixels`` (``int(coordinate · side)`` as the
  original demo computes them, pixel edges in [0, side]); the part of an outline on the image's far edge that
  falls outside it is clipped.
* :func:`attention_map`, :func:`attention_heatmap` and :func:`attention_grid` show where each of the 64 latent
  queries of the image-to-text connector looks: its attention (mean over heads) over the 16 × 16 patch grid,
  i.e. keys 1…256 of the 257 image tokens (the CLS key and the 64 latent-query keys are dropped), upsampled and
  blended over the image (docs/numerics.md §5).

Pillow only; fonts are PIL's built-in default (scalable where Pillow was built with FreeType).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from .backend import to_numpy
from .processing.grounding import Entity, box_to_pixels
from .processing.image import load_image

# Tableau-10 plus a few: distinct hues that stay readable on photos.
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (255, 215, 0),
    (0, 128, 128),
]


def colour(i: int) -> tuple[int, int, int]:
    """The i-th entity's colour (the palette repeats after 12)."""
    return PALETTE[i % len(PALETTE)]


def line_width(size: tuple[int, int]) -> int:
    """Box line width for an image of ``size = (width, height)``: ~0.4 % of the shorter side, at least 2 px."""
    return max(2, round(min(size) / 250))


def font_size(size: tuple[int, int]) -> int:
    """Label font size for an image of ``size``: ~3 % of the shorter side, within [10, 64] px."""
    return int(min(64, max(10, round(min(size) / 32))))


def load_font(size: int):
    """PIL's default font at ``size`` px (Pillow >= 10.1 with FreeType), else the fixed bitmap default."""
    try:
        return PIL.ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):
        return PIL.ImageFont.load_default()


def _as_rgb_image(image) -> PIL.Image.Image:
    """A copy of ``image`` (a path, a PIL image or an array) as the RGB image the model sees (processing.image's
    ``load_image``)."""
    return load_image(image, "image").copy()  # drawn on: never the caller's image


def _check_entity(entity, i: int) -> Entity:
    if isinstance(entity, Entity):
        return entity
    hint = (
        (
            ": a (phrase, span, boxes) tuple of post_process_generation becomes one with "
            "processing.entities_to_pixel_boxes(entities, image.size)"
        )
        if isinstance(entity, (tuple, list))
        else ""
    )
    raise ValueError(f"entities[{i}] must be a kosmos2_ref.processing.grounding.Entity{hint}; got {entity!r}"[:400])


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light labels, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = fill
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def draw_boxes(
    image,
    boxes: Iterable[Sequence[float]],
    labels: Sequence[str | None] | None = None,
    colours: Sequence[tuple[int, int, int]] | None = None,
    width: int | None = None,
    size: int | None = None,
) -> PIL.Image.Image:
    """A copy of ``image`` with normalised ``boxes`` drawn, each with its label (if any) on a filled background.

    A label sits just above its box's top-left corner, or inside the box where there is no room above.
    """
    img = _as_rgb_image(image)
    boxes = list(boxes)
    labels = list(labels) if labels is not None else [None] * len(boxes)
    colours = list(colours) if colours is not None else [colour(i) for i in range(len(boxes))]
    if not (len(labels) == len(colours) == len(boxes)):
        raise ValueError(f"got {len(boxes)} boxes, {len(labels)} labels and {len(colours)} colours; they must be equal")
    width = width or line_width(img.size)
    font = load_font(size or font_size(img.size))
    draw = PIL.ImageDraw.Draw(img)
    pixel = [box_to_pixels(b, img.size) for b in boxes]
    for (x1, y1, x2, y2), fill in zip(pixel, colours):  # all boxes first, so labels stay on top
        draw.rectangle((x1, y1, x2, y2), outline=fill, width=width)
    pad = max(1, width)
    for (x1, y1, _x2, _y2), text, fill in zip(pixel, labels, colours):
        if not text:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        ly = y1 - th if y1 - th >= 0 else y1 + width  # above the box, else inside it
        lx = min(max(x1, 0), max(img.width - tw, 0))
        draw.rectangle((lx, ly, lx + tw - 1, ly + th - 1), fill=fill)
        draw.text((lx + pad - left, ly + pad - top), text, fill=_text_colour(fill), font=font)
    return img


def box_label(phrase: str | None, probability: float | None) -> str | None:
    """A box's label: its phrase, then the probability of its two location tokens to two decimals when known
    (``"a snowman 0.87"``; ``"0.87"`` for a phrase-less box)."""
    if probability is None:
        return phrase
    return f"{phrase} {probability:.2f}" if phrase else f"{probability:.2f}"


def draw_entities(
    image, entities, width: int | None = None, size: int | None = None, confidence: bool = False
) -> PIL.Image.Image:
    """A copy of ``image`` with every box of every entity, entity i in :func:`colour` (i), labelled with its
    phrase (phrase-less entities, named ``<patch_index_…>``, are drawn without a label).

    ``confidence=True`` adds each box's probability (``entity.confidence.boxes[k].probability``, the product of
    its two location tokens' probabilities) to its label; boxes without one (beam search, or given in the prompt)
    keep the bare phrase.
    """
    boxes, labels, colours = [], [], []
    for i, entity in enumerate(entities):
        entity = _check_entity(entity, i)
        phrase = None if entity.phrase.startswith("<patch_index_") else entity.phrase
        known = entity.confidence.boxes if confidence and entity.confidence is not None else []
        for k, box in enumerate(entity.boxes):
            probability = known[k].probability if k < len(known) else None
            boxes.append(box)
            labels.append(box_label(phrase, probability))
            colours.append(colour(i))
    return draw_boxes(image, boxes, labels, colours, width, size)


# ----------------------------------------------------------------------------------------------------------------
# Attention of the connector's latent queries


def attention_map(projection_attentions, query: int = 0, batch: int = 0) -> np.ndarray:
    """Latent query ``query``'s attention over the patch grid, mean over heads: [side, side] float32.

    ``projection_attentions`` is [B, H, Q, S] with S = 1 + side² image keys (CLS first) followed by the Q latent
    keys, as ``Kosmos2.encode_image`` returns it. Pass ``query=None`` for all queries: [Q, side, side].
    """
    a = np.asarray(to_numpy(projection_attentions), dtype=np.float32)
    if a.ndim != 4:
        raise ValueError(f"projection_attentions must be [batch, heads, queries, keys], got shape {a.shape}")
    B, H, Q, S = a.shape
    patches = S - Q - 1  # drop CLS and the latent keys
    side = math.isqrt(max(patches, 0))
    if patches <= 0 or side * side != patches:
        raise ValueError(
            f"projection_attentions has {S} keys for {Q} queries: expected 1 + side² image keys then {Q} latent keys"
        )
    if not 0 <= batch < B:
        raise ValueError(f"batch={batch} is out of range for {B} images")
    mean = a[batch].mean(axis=0)  # [H, Q, S] -> [Q, S]
    grid = mean[:, 1 : 1 + patches].reshape(Q, side, side)  # [Q, 256] -> [Q, 16, 16]
    if query is None:
        return grid
    if not -Q <= query < Q:
        raise ValueError(f"query={query} is out of range for {Q} latent queries")
    return grid[query]


# A perceptual dark-to-bright ramp (close to matplotlib's "inferno"): anchor colours interpolated linearly.
_RAMP = np.array(
    [
        (0, 0, 4),
        (40, 11, 84),
        (101, 21, 110),
        (159, 42, 99),
        (212, 72, 66),
        (245, 125, 21),
        (250, 193, 39),
        (252, 255, 164),
    ],
    dtype=np.float64,
)


def colourise(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB through the ramp: [...] -> [..., 3]."""
    x = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_RAMP) - 1)
    i = np.minimum(np.floor(x).astype(int), len(_RAMP) - 2)
    t = (x - i)[..., None]
    return np.round(_RAMP[i] * (1 - t) + _RAMP[i + 1] * t).astype(np.uint8)


def _heat_over(img: PIL.Image.Image, grid: np.ndarray, alpha: float) -> PIL.Image.Image:
    lo, hi = float(grid.min()), float(grid.max())
    norm = (grid - lo) / (hi - lo) if hi > lo else np.zeros_like(grid)
    # Resize the [side, side] map in float ("F" mode) so the upsampling is smooth, then colour it.
    up = PIL.Image.fromarray(norm.astype(np.float32)).resize(img.size, PIL.Image.BILINEAR)
    heat = PIL.Image.fromarray(colourise(np.asarray(up)))
    return PIL.Image.blend(img, heat, alpha)


def attention_heatmap(
    projection_attentions, image, query: int = 0, batch: int = 0, alpha: float = 0.55
) -> PIL.Image.Image:
    """``image`` with latent query ``query``'s attention (mean over heads, min-max scaled) blended over it.

    The image is shown as the model saw it: resized to a square (the processor ignores the aspect ratio).
    """
    img = _as_rgb_image(image)
    grid = attention_map(projection_attentions, query, batch)
    side = max(img.size)
    return _heat_over(img.resize((side, side), PIL.Image.BICUBIC), grid, alpha)


def attention_grid(
    projection_attentions, image, batch: int = 0, columns: int = 8, cell: int = 112, alpha: float = 0.55
) -> PIL.Image.Image:
    """All latent queries' heat maps as one picture: ``columns`` per row, each ``cell`` px square and numbered."""
    img = _as_rgb_image(image).resize((cell, cell), PIL.Image.BICUBIC)
    grids = attention_map(projection_attentions, None, batch)  # [Q, side, side]
    Q = grids.shape[0]
    rows = math.ceil(Q / columns)
    gap = 2
    sheet = PIL.Image.new("RGB", (columns * (cell + gap) - gap, rows * (cell + gap) - gap), (255, 255, 255))
    font = load_font(max(10, cell // 9))
    for q in range(Q):
        tile = _heat_over(img, grids[q], alpha)
        d = PIL.ImageDraw.Draw(tile)
        label = str(q)
        left, top, right, bottom = d.textbbox((0, 0), label, font=font)
        d.rectangle((0, 0, right - left + 3, bottom - top + 3), fill=(0, 0, 0))
        d.text((2 - left, 2 - top), label, fill=(255, 255, 255), font=font)
        sheet.paste(tile, ((q % columns) * (cell + gap), (q // columns) * (cell + gap)))
    return sheet


def save_image(img: PIL.Image.Image, path) -> None:
    """Save ``img`` to ``path`` atomically (a temp file renamed into place); the format follows the extension."""
    path = Path(path)
    ext = path.suffix.lower()
    fmt = PIL.Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(
            f"cannot write an image to {str(path)!r}: unknown extension {ext or '(none)'!r}; use .png or .jpg"
        )
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist")
    tmp = path.with_name(f".{path.name}.partial")
    try:
        img.save(tmp, format=fmt)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
