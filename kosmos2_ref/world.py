"""A synthetic grounded world: scenes of coloured shapes, drawn with Pillow, and their Kosmos-2 texts.

Everything follows from one integer seed (NumPy's ``default_rng``), so a scene is reproducible anywhere::

    scene = make_scene(7)                       # 1-4 objects, occlusion-free, on a plain or lightly textured ground
    image = render(scene)                       # a PIL RGB image, scene.image_size pixels square
    caption_text(scene)                         # '<grounding> An image of<phrase> a red circle</phrase><object>…'

The miniature Kosmos-2 (``Kosmos2.from_pretrained("mini")``) is trained on these scenes, on three kinds of text,
the three jobs of ``kosmos2_ref.tasks``:

* **caption** -- ``<grounding> An image of<phrase> a red circle</phrase><object><patch_index_…><patch_index_…>
  </object> and<phrase> two blue squares</phrase><object>… </delimiter_of_multi_objects/> …</object>`` The
  phrases come in a fixed order (colours red, green, blue, yellow; then shapes circle, square, triangle), the
  boxes of one phrase from left to right.
* **ground** -- ``<grounding><phrase> the green triangle</phrase>`` → ``<object>`` its box(es) ``</object>``.
* **describe** -- ``<grounding><phrase> It</phrase><object>box</object>`` → `` is a green triangle.``

Boxes are normalised ``(x1, y1, x2, y2)``, tight around the drawn shape. Objects are 15-50 % of the image side:
below ~11 % even the exact patch-index tokens of a box decode (cell centres) to a box of IoU < 0.5 with it, so
the smallest objects could not be scored fairly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw

from .checks import is_int, is_real
from .processing.grounding import box_to_patch_indices

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 85, 215), "yellow": (235, 195, 30)}
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
MAX_OBJECTS = 4
MIN_SIZE, MAX_SIZE = 0.15, 0.5  # object side as a fraction of the image side
GAP = 0.02  # the least space between two objects' boxes (fraction of the side)
DRAW_SIDE = 448  # shapes are drawn at least this large, then reduced: smooth edges

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class SceneObject:
    """One shape: its name, its colour's name, its tight box (normalised x1, y1, x2, y2)."""

    shape: str
    colour: str
    box: Box

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """The objects of a scene and how its ground looks; ``render(scene)`` draws it."""

    seed: int
    objects: tuple[SceneObject, ...]
    image_size: int
    background: tuple[int, int, int]  # the ground's base colour
    texture: str  # "plain", "noise", "gradient" or "stripes"
    texture_seed: int


# ----------------------------------------------------------------------------------------------------------------
# Checks at the boundary


def _check_seed(seed) -> int:
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_options(num_objects, image_size, min_size, max_size) -> None:
    if num_objects is not None and (not is_int(num_objects) or not 1 <= num_objects <= MAX_OBJECTS):
        raise ValueError(f"num_objects must be an int from 1 to {MAX_OBJECTS} (or None), got {num_objects!r}")
    if not is_int(image_size) or image_size < 32:
        raise ValueError(f"image_size must be an int of at least 32 pixels, got {image_size!r}")
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        if not is_real(value) or not 0.05 <= value <= 0.9:
            raise ValueError(f"{name} must be a number from 0.05 to 0.9 (a fraction of the side), got {value!r}")
    if min_size > max_size:
        raise ValueError(f"min_size {min_size!r} must not exceed max_size {max_size!r}")


# ----------------------------------------------------------------------------------------------------------------
# Making a scene


def _overlaps(a: Box, b: Box, gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _place(rng: np.random.Generator, count: int, min_size: float, max_size: float) -> list[Box]:
    """``count`` square boxes that do not touch; a box that finds no room after many tries is made smaller."""
    boxes: list[Box] = []
    for _ in range(count):
        hi = max_size
        for attempt in range(200):
            side = float(rng.uniform(min_size, hi))
            x1, y1 = (float(v) for v in rng.uniform(0.0, 1.0 - side, size=2))
            box = (x1, y1, x1 + side, y1 + side)
            if not any(_overlaps(box, other, GAP) for other in boxes):
                boxes.append(box)
                break
            if attempt % 20 == 19:
                hi = max(min_size, hi * 0.8)
    return boxes


def make_scene(
    seed: int,
    num_objects: int | None = None,
    image_size: int = 224,
    min_size: float = MIN_SIZE,
    max_size: float = MAX_SIZE,
) -> Scene:
    """The scene of ``seed``: ``num_objects`` (default: 1-4, drawn from the seed) shapes of random colour, shape,
    size (``min_size``-``max_size`` of the side) and place, none touching another. Raises ValueError for bad
    options, naming them."""
    seed = _check_seed(seed)
    _check_options(num_objects, image_size, min_size, max_size)
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, MAX_OBJECTS + 1)) if num_objects is None else int(num_objects)
    boxes = _place(rng, count, float(min_size), float(max_size))
    objects = []
    for box in boxes:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        objects.append(SceneObject(shape, colour, box))  # every shape fills its square box
    grey = int(rng.integers(200, 246))
    tint = rng.integers(-8, 9, size=3)
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    texture = ("plain", "noise", "gradient", "stripes")[int(rng.integers(4))]
    return Scene(seed, tuple(objects), int(image_size), background, texture, int(rng.integers(2**31)))


# ----------------------------------------------------------------------------------------------------------------
# Drawing


def _ground(scene: Scene) -> np.ndarray:
    """The background [S, S, 3] uint8: the base colour, plain or with a faint texture (±10 levels at most)."""
    s = scene.image_size
    rng = np.random.default_rng(scene.texture_seed)
    base = np.array(scene.background, dtype=np.float32)  # [3]
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s  # [S, S] each
    if scene.texture == "noise":
        delta = rng.normal(0.0, 4.0, size=(s, s, 1))
    elif scene.texture == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        delta = (10.0 * (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)))[..., None]
    elif scene.texture == "stripes":
        period = rng.uniform(0.05, 0.15)
        delta = (6.0 * np.sign(np.sin(2 * np.pi * (x + y) / period)))[..., None]
    else:
        delta = np.zeros((s, s, 1), dtype=np.float32)
    return np.clip(base + delta, 0, 255).astype(np.uint8)  # [S, S, 3]


def _draw_shape(draw: PIL.ImageDraw.ImageDraw, shape: str, box: Box, side: int, fill) -> None:
    x1, y1, x2, y2 = (v * side for v in box)
    if shape == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=fill)
    elif shape == "square":
        draw.rectangle((x1, y1, x2, y2), fill=fill)
    else:
        draw.polygon([(x1, y2), (x2, y2), ((x1 + x2) / 2, y1)], fill=fill)


def render(scene: Scene) -> PIL.Image.Image:
    """The scene as an RGB image of ``scene.image_size`` pixels square.

    The shapes are drawn an integer factor larger (at least ``DRAW_SIDE`` pixels; colour, and coverage in a
    mask), box-reduced, then laid on the ground by their coverage: edges are smooth at any size.
    """
    s = scene.image_size
    big = s * max(1, -(-DRAW_SIDE // s))
    colour = PIL.Image.new("RGB", (big, big), (0, 0, 0))
    cover = PIL.Image.new("L", (big, big), 0)
    draw_colour, draw_cover = PIL.ImageDraw.Draw(colour), PIL.ImageDraw.Draw(cover)
    for obj in scene.objects:
        _draw_shape(draw_colour, obj.shape, obj.box, big, COLOURS[obj.colour])
        _draw_shape(draw_cover, obj.shape, obj.box, big, 255)
    shapes = np.asarray(colour.resize((s, s), PIL.Image.Resampling.BOX), dtype=np.float32)  # [S, S, 3]
    alpha = np.asarray(cover.resize((s, s), PIL.Image.Resampling.BOX), dtype=np.float32)[..., None] / 255
    # shapes holds colour × coverage (the rest averaged in as black): add the ground's share
    pixels = shapes + (1.0 - alpha) * _ground(scene).astype(np.float32)  # [S, S, 3]
    return PIL.Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# Texts


def object_tokens(boxes: list[Box]) -> str:
    """``<object><patch_index_A><patch_index_B></delimiter_of_multi_objects/>…</object>`` for ``boxes``."""
    pairs = [box_to_patch_indices(box) for box in boxes]
    inner = "</delimiter_of_multi_objects/>".join(f"<patch_index_{a:04d}><patch_index_{b:04d}>" for a, b in pairs)
    return f"<object>{inner}</object>"


def plural(shape: str) -> str:
    return shape + "s"


def groups(scene: Scene) -> list[tuple[str, str, list[Box]]]:
    """(colour, shape, boxes left to right) for each kind of object present, colours then shapes in their fixed
    order (red, green, blue, yellow; circle, square, triangle)."""
    out = []
    for colour in COLOURS:
        for shape in SHAPES:
            boxes = sorted(
                (o.box for o in scene.objects if o.colour == colour and o.shape == shape),
                key=lambda b: (b[0] + b[2], b[1] + b[3]),
            )
            if boxes:
                out.append((colour, shape, boxes))
    return out


def noun_phrase(colour: str, shape: str, count: int, article: str | None = None) -> str:
    """``"a red circle"``, ``"two blue squares"``; ``article="the"`` gives ``"the red circle(s)"``."""
    noun = shape if count == 1 else plural(shape)
    first = article if article is not None else COUNT_WORDS[count]
    return f"{first} {colour} {noun}"


def caption_phrases(scene: Scene) -> list[tuple[str, list[Box]]]:
    """The phrases of the scene's caption and their boxes, in caption order."""
    return [(noun_phrase(colour, shape, len(boxes)), boxes) for colour, shape, boxes in groups(scene)]


def caption_text(scene: Scene) -> str:
    """The grounded caption: ``<grounding> An image of<phrase> a red circle</phrase><object>…</object> and…``."""
    parts = [f"<phrase> {phrase}</phrase>{object_tokens(boxes)}" for phrase, boxes in caption_phrases(scene)]
    # No final "." after </object>: the tokenizer would make it "▁." and the caption would end "square ."
    return "<grounding> An image of" + " and".join(parts)


def referring_examples(scene: Scene) -> list[tuple[str, list[Box]]]:
    """(phrase, boxes) pairs for the ground job: ``"the red circle"`` → its box; a kind seen several times,
    ``"the red circles"`` → all of them, left to right."""
    return [(noun_phrase(colour, shape, len(boxes), "the"), boxes) for colour, shape, boxes in groups(scene)]


def ground_text(phrase: str, boxes: list[Box]) -> str:
    """``<grounding><phrase> the red circle</phrase><object>…</object>`` (the prompt ends at ``</phrase>``)."""
    return f"<grounding><phrase> {phrase}</phrase>{object_tokens(boxes)}"


def describe_text(obj: SceneObject) -> str:
    """``<grounding><phrase> It</phrase><object>…</object> is a red circle.`` (the prompt ends at ``</object>``)."""
    return f"<grounding><phrase> It</phrase>{object_tokens([obj.box])} is {noun_phrase(obj.colour, obj.shape, 1)}."


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
