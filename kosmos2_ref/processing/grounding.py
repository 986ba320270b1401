"""Grounding: boxes ↔ patch-index tokens, and the post-processing of generated text into a caption and entities.

Mirrors transformers 5.23 ``models/kosmos2/processing_kosmos2.py`` (``_check_bboxes_for_single_text``,
``_insert_patch_index_tokens``, ``coordinate_to_patch_index``, ``patch_index_to_coordinate``,
``extract_entities_with_patch_indices``, ``adjust_entity_positions``, ``_cleanup_spaces``,
``clean_text_and_extract_entities_with_bboxes``), which in turn follows the original demo's
``kosmos-2/demo/decode_string.py`` (microsoft/unilm). docs/numerics.md §10.3 (boxes → tokens) and §11
(post-processing).

The image is a grid of n × n cells (n = 32 for 1024 patch tokens); cell k is row k // n, column k % n. A box is
named by the cells of its upper-left and lower-right corners.
"""

from __future__ import annotations

import bisect
import itertools
import math
import numbers
import re
from dataclasses import dataclass
from typing import Sequence

from ..checks import is_int, is_real
from .tokenizer import (
    BOO_TOKEN,
    BOP_TOKEN,
    DOM_TOKEN,
    EOI_TOKEN,
    EOO_TOKEN,
    EOP_TOKEN,
    NUM_PATCH_INDEX_TOKENS,
    patch_index_token,
)

Box = tuple  # (x1, y1, x2, y2) normalised floats, or (upper_left, lower_right) patch indices
# Post-processing returns its entities as transformers' Kosmos2Processor.post_process_generation does, tuples
# (name, (start, end), [(x1, y1, x2, y2), ...]), so that parity tests can compare them as they are. Everything
# past post-processing uses the one entity type, :class:`Entity`, made by :func:`entities_to_pixel_boxes`.

# Tags are what transformers removes with re.sub("<.*?>", "", text): a "<", the fewest characters other than a
# newline, then ">". tag_spans finds the same ones in linear time (the regex is quadratic in unmatched "<").
_PHRASE_SPAN = re.compile(r"<phrase>.+?</phrase>")
_PATCH = r"<patch_index_\d+>"
_PAIR = _PATCH + _PATCH
# An optional "<phrase>X</phrase>" (X: no "<") directly followed by "<object>", then one or more patch pairs
# separated by the delimiter, then "</object>". Groups: 1 the phrase tag, 2 X, 3 the pairs.
_ENTITY = re.compile(
    f"(?:({re.escape(BOP_TOKEN)}([^<]+){re.escape(EOP_TOKEN)}))?"
    f"{re.escape(BOO_TOKEN)}((?:{_PAIR}{re.escape(DOM_TOKEN)})*{_PAIR}){re.escape(EOO_TOKEN)}"
)
_PATCH_NUMBER = re.compile(r"<patch_index_(\d+)>")


def num_patches_per_side(num_patch_index_tokens: int = NUM_PATCH_INDEX_TOKENS) -> int:
    """n = int(√(number of patch tokens)): 32 for Kosmos-2."""
    return int(math.sqrt(num_patch_index_tokens))


# ---------------------------------------------------------------------------------------------- boxes ↔ indices
def _is_float(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, numbers.Integral)


def box_to_patch_indices(bbox: Sequence[float], num_patches_per_side: int = 32) -> tuple[int, int]:
    """(x1, y1, x2, y2) normalised to [0, 1] → (upper-left cell, lower-right cell) (docs/numerics.md §10.3).

    ul = floor(y1·n)·n + floor(x1·n); lr = ceil(y2·n − 1)·n + ceil(x2·n − 1) (coordinate_to_patch_index).
    Raises ValueError unless x2 > x1, y2 > y1 and all four lie in [0, 1].
    """
    if len(bbox) != 4:
        raise ValueError(f"a box must be (x1, y1, x2, y2), got {bbox!r}")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
        raise ValueError(f"box coordinates must be normalised to [0, 1], got {tuple(bbox)!r}")
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"a box must have x2 > x1 and y2 > y1, got (x1, y1, x2, y2) = {tuple(bbox)!r}")
    n = num_patches_per_side
    ul_x, ul_y = math.floor(x1 * n), math.floor(y1 * n)
    # Mathematically ceil(x2·n − 1) >= floor(x1·n) when x2 > x1; the max() only repairs the float rounding of
    # "− 1" for x2 < ~1e-17, where transformers would name column −1 (the previous row's last cell).
    lr_x, lr_y = max(math.ceil(x2 * n - 1), ul_x), max(math.ceil(y2 * n - 1), ul_y)
    return ul_y * n + ul_x, lr_y * n + lr_x


def patch_indices_to_box(upper_left: int, lower_right: int, num_patches_per_side: int = 32) -> tuple[float, ...]:
    """(upper-left cell, lower-right cell) → normalised (x1, y1, x2, y2) (patch_index_to_coordinate,
    docs/numerics.md §11.4).

    A box spanning one row, one column or one cell uses the outer cell edges; any other box joins the cell
    centres. Never raises: indices beyond the grid give coordinates beyond [0, 1], as in transformers.
    """
    n = num_patches_per_side
    cell = 1.0 / n
    ux, uy = upper_left % n, upper_left // n
    lx, ly = lower_right % n, lower_right // n
    if upper_left == lower_right or ux == lx or uy == ly:
        return ux * cell, uy * cell, lx * cell + cell, ly * cell + cell
    half = cell / 2
    return ux * cell + half, uy * cell + half, lx * cell + half, ly * cell + half


# --------------------------------------------------------------------------------------------- bboxes argument
def _check_box(box, where: str, num_patch_index_tokens: int) -> None:
    """One box: a tuple of 2 ints (patch indices in range, the lower-right cell not above or left of the
    upper-left one) or of 4 floats (checked when converted)."""
    if isinstance(box, tuple) and len(box) == 2 and all(is_int(v) for v in box):
        for v in box:
            if not 0 <= v < num_patch_index_tokens:
                raise ValueError(
                    f"bboxes{where}: patch indices must lie in [0, {num_patch_index_tokens - 1}], got {box!r}"
                )
        # transformers encodes a reversed pair as it is; the model was never shown such a box.
        n = num_patches_per_side(num_patch_index_tokens)
        (top, left), (bottom, right) = divmod(box[0], n), divmod(box[1], n)  # (row, column) of each cell
        if bottom < top or right < left:
            raise ValueError(
                f"bboxes{where}: {box!r} is not (upper_left, lower_right) patch indices: cell {box[1]} (row {bottom}, "
                f"column {right}) lies above or left of cell {box[0]} (row {top}, column {left}) on the {n} × {n} grid"
            )
        return
    if isinstance(box, tuple) and len(box) == 4 and all(_is_float(v) for v in box):
        try:
            box_to_patch_indices(box, num_patches_per_side(num_patch_index_tokens))
        except ValueError as err:
            raise ValueError(f"bboxes{where}: {err}") from None
        return
    raise ValueError(
        f"bboxes{where}: each box must be a tuple of 2 ints (patch indices) or of 4 floats (x1, y1, x2, y2), "
        f"got {box!r}"
    )


def check_bboxes_for_single_text(bboxes, where: str = "", num_patch_index_tokens: int = NUM_PATCH_INDEX_TOKENS) -> None:
    """Validate the boxes of one text: None, or a list with one entry per ``<phrase>…</phrase>``, each entry None,
    a box tuple, or a list of box tuples (a ``None`` inside such a list is an error). docs/numerics.md §10.3."""
    if bboxes is None:
        return
    if not isinstance(bboxes, list):
        raise ValueError(
            f"bboxes{where} must be None or a list (one entry per <phrase>…</phrase>), got {type(bboxes).__name__}"
        )
    for i, entry in enumerate(bboxes):
        if entry is None:
            continue
        boxes = entry if isinstance(entry, list) else [entry]
        for j, box in enumerate(boxes):
            if box is None:
                raise ValueError(
                    f"bboxes{where}[{i}]: the list of boxes for one phrase must not contain None (item {j})"
                )
            _check_box(box, f"{where}[{i}]" + (f"[{j}]" if isinstance(entry, list) else ""), num_patch_index_tokens)


def _box_tokens(box: tuple, num_patch_index_tokens: int) -> str:
    """ "<patch_index_A> <patch_index_B>" for one box (indices given, or computed from coordinates)."""
    if len(box) == 2:
        upper_left, lower_right = box
    else:
        upper_left, lower_right = box_to_patch_indices(box, num_patches_per_side(num_patch_index_tokens))
    return f"{patch_index_token(upper_left)} {patch_index_token(lower_right)}"


def insert_patch_index_tokens(text: str, bboxes, num_patch_index_tokens: int = NUM_PATCH_INDEX_TOKENS) -> str:
    """Append ``<object> A B </object>`` after each ``<phrase>…</phrase>`` of ``text`` (docs/numerics.md §10.3).

    Several boxes for one phrase are joined by ``</delimiter_of_multi_objects/>``; a phrase whose entry is None or
    [] gets nothing. The spaces between the tokens are absorbed by the tags' lstrip when tokenising.
    """
    if not bboxes:
        return text
    phrases = list(_PHRASE_SPAN.finditer(text))
    if len(phrases) != len(bboxes):
        raise ValueError(
            f"bboxes has {len(bboxes)} entries but the text has {len(phrases)} <phrase>…</phrase> pairs; "
            f"they must be equal (text: {text!r})"
        )
    pieces = []
    position = 0
    for match, entry in zip(phrases, bboxes):
        pieces.append(text[position : match.end()])
        position = match.end()
        boxes = [] if entry is None else entry if isinstance(entry, list) else [entry]
        if any(box is None for box in boxes):
            raise ValueError("the list of boxes for one phrase must not contain None")
        if boxes:
            joined = f" {DOM_TOKEN} ".join(_box_tokens(box, num_patch_index_tokens) for box in boxes)
            pieces.append(f"{BOO_TOKEN} {joined} {EOO_TOKEN}")
    pieces.append(text[position:])
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------- post-processing
def tag_spans(text: str) -> list[tuple[int, int]]:
    """The (start, end) of every tag of ``text``: the matches of ``re.finditer("<.*?>", text)``, in one pass.

    The regex, at a "<", takes the first ">" after it unless a newline comes first. If a newline (or the end)
    does come first, every "<" before that newline fails the same way, so the scan jumps past the newline; the
    regex instead retries at each of them, which makes "x<" * n cost n² steps.
    """
    spans, i = [], text.find("<")
    while i != -1:
        close, newline = text.find(">", i), text.find("\n", i)
        if close != -1 and (newline == -1 or close < newline):
            spans.append((i, close + 1))
            i = text.find("<", close + 1)
        elif newline != -1:
            i = text.find("<", newline + 1)
        else:
            break
    return spans


def strip_tags(text: str) -> str:
    """Remove every ``<…>`` (non-greedy, not across newlines), as ``re.sub("<.*?>", "", text)`` does."""
    pieces, position = [], 0
    for start, end in tag_spans(text):
        pieces.append(text[position:start])
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def extract_entities_with_patch_indices(text: str) -> list[tuple]:
    """Entities of ``text`` with their boxes as (ul, lr) index pairs and spans in the raw ``text``
    (docs/numerics.md §11.1).

    With a phrase: (phrase, span of the phrase, [pairs]). Without: one entity per pair, named
    ``<patch_index_{a}><patch_index_{b}>`` with unpadded integers and the empty span at ``<object>``.
    """
    entities = []
    for match in _ENTITY.finditer(text):
        pairs = []
        for chunk in match.group(3).split(DOM_TOKEN):
            numbers_ = [int(m) for m in _PATCH_NUMBER.findall(chunk)]
            pairs.append((numbers_[0], numbers_[1]))
        if match.group(1):
            entities.append((match.group(2), match.span(2), pairs))
        else:
            start = match.start(0)
            entities.extend((f"<patch_index_{a}><patch_index_{b}>", (start, start), [(a, b)]) for a, b in pairs)
    return entities


class _PositionsWithoutTags:
    """Where an index of ``text`` lands once the tags are removed: ``len(strip_tags(text[:index]))``
    (docs/numerics.md §11.2), for many indices without stripping each prefix (which is quadratic in the number of
    entities).

    The tags of a prefix are the tags of ``text`` that end inside it (the scan is the same up to there, and a tag
    cut by the prefix end has lost its ">"), so the answer is ``index`` less the length of those tags.
    """

    def __init__(self, text: str):
        spans = tag_spans(text)
        self.ends = [end for _, end in spans]
        self.removed = [0] + list(itertools.accumulate(end - start for start, end in spans))  # before tag k

    def __call__(self, index: int) -> int:
        return index - self.removed[bisect.bisect_right(self.ends, index)]


def _cleanup_spaces(text: str, entities: list[tuple]) -> tuple[str, list[tuple]]:
    """Strip the caption, shift spans by its leading whitespace, and trim each name with its span
    (docs/numerics.md §11.3)."""
    leading = len(text) - len(text.lstrip())
    cleaned = []
    for name, (start, end), boxes in entities:
        name_leading = len(name) - len(name.lstrip())
        name_trailing = len(name) - len(name.rstrip())
        span = (start - leading + name_leading, end - leading - name_trailing)
        cleaned.append((name.strip(), span, boxes))
    return text.strip(), cleaned


def clean_text_and_extract_entities_with_bboxes(text: str, num_patches_per_side: int = 32):
    """(caption without tags, [(name, (start, end), [(x1, y1, x2, y2), …]), …]) for the text after ``</image>``.

    Spans index the returned caption (docs/numerics.md §11, worked example in §11.4). Never raises. A box naming a cell
    outside the n × n grid (``<patch_index_9999>``) is left out, and so is an entity left without boxes:
    transformers turns it into a box outside the image (docs/parity.md).
    """
    entities = []
    position_without_tags = _PositionsWithoutTags(text)
    cells = num_patches_per_side * num_patches_per_side
    for name, (start, end), pairs in extract_entities_with_patch_indices(text):
        boxes = [patch_indices_to_box(a, b, num_patches_per_side) for a, b in pairs if a < cells and b < cells]
        if boxes:
            entities.append((name, (position_without_tags(start), position_without_tags(end)), boxes))
    return _cleanup_spaces(strip_tags(text), entities)


def post_process_generation(text: str, cleanup_and_extract: bool = True, num_patches_per_side: int = 32):
    """The caption after the last ``</image>``; with ``cleanup_and_extract`` also cleaned and its entities
    (Kosmos2Processor.post_process_generation, docs/numerics.md §11)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if not isinstance(cleanup_and_extract, bool):  # the string "false" would count as True
        raise ValueError(f"cleanup_and_extract must be True or False, got {cleanup_and_extract!r}")
    caption = text.split(EOI_TOKEN)[-1]
    if not cleanup_and_extract:
        return caption
    return clean_text_and_extract_entities_with_bboxes(caption, num_patches_per_side)


@dataclass
class Entity:
    """A phrase of the caption and the boxes the model gave it: the one entity type of kosmos2_ref past
    post-processing (tasks, jobs, the web service and drawing use it); made by :func:`entities_to_pixel_boxes`."""

    phrase: str
    span: tuple[int, int]  # [start, end) of the phrase in the caption
    boxes: list[tuple[float, float, float, float]]  # normalised (x1, y1, x2, y2)
    pixel_boxes: list[tuple[int, int, int, int]]  # the same in pixels of the image (box_to_pixels)
    # How probable its tokens were (kosmos2_ref.confidence.EntityConfidence), when the run's scores were kept
    confidence: object = None

    def to_dict(self) -> dict:
        return {
            "phrase": self.phrase,
            "span": list(self.span),
            "boxes": [list(b) for b in self.boxes],
            "pixel_boxes": [list(b) for b in self.pixel_boxes],
            "confidence": self.confidence.to_dict() if self.confidence is not None else None,
        }


def _check_image_size(image_size) -> tuple[int, int]:
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(is_int(v) and v > 0 for v in image_size)
    ):
        raise ValueError(f"image_size must be (width, height) as positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def box_to_pixels(box: Sequence[float], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A normalised (x1, y1, x2, y2) -> pixels of an image of ``image_size = (width, height)``: each coordinate
    becomes ``int(coordinate · side)`` (the original demo's rule), clamped to ``[0, side]``.

    This is the one box-to-pixels rule of kosmos2_ref (tasks, jobs, the web service and drawing use it, so the
    ``pixel_boxes`` of every output agree). Pixel coordinates name pixel edges, as ``PIL.Image.crop`` and
    slicing ``array[y1:y2, x1:x2]`` take them: the whole image is ``(0, 0, width, height)``, so a box reaching
    the right edge ends at ``width``. Boxes decoded from patch indices or given in [0, 1] never need the clamp;
    it keeps a coordinate a hair outside [0, 1] (float rounding) on the image. A ValueError names a box that is
    not four finite numbers.
    """
    width, height = _check_image_size(image_size)
    finite = isinstance(box, (tuple, list)) and all(is_real(v) and math.isfinite(v) for v in box)
    if not finite or len(box) != 4:
        raise ValueError(f"box must be (x1, y1, x2, y2), four finite numbers normalised to [0, 1], got {box!r}"[:300])
    sides = (width, height, width, height)
    return tuple(min(max(int(float(v) * side), 0), side) for v, side in zip(box, sides))


def entities_to_pixel_boxes(entities: Sequence[tuple], image_size: tuple[int, int]) -> list[Entity]:
    """Post-processing's ``(name, (start, end), [boxes])`` tuples -> :class:`Entity` objects for an image of
    ``image_size = (width, height)``: normalised boxes kept, pixel boxes added (:func:`box_to_pixels`)."""
    size = _check_image_size(image_size)
    out = []
    for i, entity in enumerate(entities):
        _check_entity(entity, i)
        name, span, boxes = entity
        normalised = [tuple(float(v) for v in b) for b in boxes]
        out.append(Entity(name, tuple(span), normalised, [box_to_pixels(b, size) for b in normalised]))
    return out


def _check_entity(entity, i: int) -> None:
    """An entity as post-processing returns it: (name, (start, end), [(x1, y1, x2, y2), …]), finite coordinates."""
    if not isinstance(entity, (tuple, list)) or len(entity) != 3 or not isinstance(entity[2], (list, tuple)):
        raise ValueError(f"entities[{i}] must be (name, (start, end), [(x1, y1, x2, y2), ...]), got {entity!r}"[:300])
    for j, box in enumerate(entity[2]):
        finite = isinstance(box, (tuple, list)) and all(is_real(v) and math.isfinite(v) for v in box)
        if not finite or len(box) != 4:
            raise ValueError(
                f"entities[{i}] ({entity[0]!r}): box {j} must be (x1, y1, x2, y2), four finite numbers, got {box!r}"
            )
