"""The synthetic world (kosmos2_ref.world): scenes from seeds, their pictures, their Kosmos-2 texts."""

from __future__ import annotations

import numpy as np
import pytest

from kosmos2_ref import world
from kosmos2_ref.processing.grounding import clean_text_and_extract_entities_with_bboxes, patch_indices_to_box


def test_a_seed_gives_the_same_scene_and_picture():
    a, b = world.make_scene(11), world.make_scene(11)
    assert a == b
    assert np.array_equal(np.asarray(world.render(a)), np.asarray(world.render(b)))
    assert world.make_scene(12) != a


@pytest.mark.parametrize("seed", range(40))
def test_scenes_keep_their_promises(seed):
    scene = world.make_scene(seed)
    assert 1 <= len(scene.objects) <= 4
    for i, obj in enumerate(scene.objects):
        x1, y1, x2, y2 = obj.box
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        assert world.MIN_SIZE - 1e-9 <= x2 - x1 <= world.MAX_SIZE + 1e-9
        assert obj.shape in world.SHAPES and obj.colour in world.COLOURS
        for other in scene.objects[i + 1 :]:  # occlusion-free: boxes apart
            assert world.iou(obj.box, other.box) == 0.0


def test_the_picture_shows_each_object_in_its_colour():
    scene = world.make_scene(5, num_objects=3, image_size=224)
    pixels = np.asarray(world.render(scene)).astype(int)  # [224, 224, 3]
    assert pixels.shape == (224, 224, 3)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        # the centre of the box's lower half lies inside every shape (the triangle's apex is at the top)
        cx, cy = int((x1 + x2) / 2 * 224), int((y1 + 3 * y2) / 4 * 224)
        assert np.abs(pixels[cy, cx] - np.array(world.COLOURS[obj.colour])).max() <= 2, obj


def test_caption_text_is_the_kosmos2_format_and_reads_back():
    scene = world.make_scene(2)  # a green circle, two green triangles, a blue square
    text = world.caption_text(scene)
    assert text.startswith("<grounding> An image of<phrase> a green circle</phrase><object><patch_index_")
    assert "<phrase> two green triangles</phrase>" in text and "</delimiter_of_multi_objects/>" in text
    caption, entities = clean_text_and_extract_entities_with_bboxes(text.split("<grounding>")[1])
    assert caption == "An image of a green circle and two green triangles and a blue square"
    assert [name for name, _, _ in entities] == ["a green circle", "two green triangles", "a blue square"]
    for (_, _, boxes), (_, truth) in zip(entities, world.caption_phrases(scene)):
        assert len(boxes) == len(truth)
        assert all(world.iou(b, t) > 0.75 for b, t in zip(boxes, truth))  # exact tokens, cell-centre decoding


def test_referring_and_describe_texts():
    scene = world.make_scene(2)
    refs = dict(world.referring_examples(scene))
    assert set(refs) == {"the green circle", "the green triangles", "the blue square"}
    text = world.ground_text("the blue square", refs["the blue square"])
    assert text.startswith("<grounding><phrase> the blue square</phrase><object><patch_index_")
    assert text.endswith("</object>")
    obj = scene.objects[0]
    assert world.describe_text(obj).endswith(f"</object> is a {obj.colour} {obj.shape}.")


def test_objects_are_large_enough_for_exact_tokens_to_score():
    """The size floor: a box's own patch-index tokens decode (cell centres) to IoU >= 0.5 with it."""
    from kosmos2_ref.processing.grounding import box_to_patch_indices

    side = world.MIN_SIZE
    for x in np.linspace(0, 1 - side, 23):
        box = (x, x, x + side, x + side)
        assert world.iou(patch_indices_to_box(*box_to_patch_indices(box)), box) >= 0.5


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(seed=True), "seed"),
        (dict(seed=0, num_objects=0), "num_objects"),
        (dict(seed=0, num_objects=5), "num_objects"),
        (dict(seed=0, image_size=16), "image_size"),
        (dict(seed=0, min_size=0.0), "min_size"),
        (dict(seed=0, max_size=2), "max_size"),
        (dict(seed=0, min_size=0.4, max_size=0.3), "min_size"),
    ],
)
def test_bad_options_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        world.make_scene(**kwargs)
