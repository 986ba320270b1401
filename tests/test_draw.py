"""Drawing: boxes and labels where the entities say, in distinct colours; attention heat maps of the connector."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from fixtures_tokenizer import IMAGES

from kosmos2_ref import draw
from kosmos2_ref.processing import Entity, box_to_pixels, entities_to_pixel_boxes


def grey(w=400, h=300):
    return PIL.Image.new("RGB", (w, h), (128, 128, 128))


def test_boxes_where_the_entities_say():
    img = grey()
    entities = [
        ("a dog", (0, 5), [(0.1, 0.2, 0.4, 0.9)]),
        ("a cat", (6, 11), [(0.5, 0.1, 0.9, 0.5), (0.6, 0.6, 0.95, 0.95)]),
    ]
    out = draw.draw_entities(img, entities_to_pixel_boxes(entities, img.size))
    assert out.size == img.size and out is not img
    assert img.getpixel((40, 150)) == (128, 128, 128)  # the input is not drawn on
    a = np.asarray(out)
    for i, (_, _, boxes) in enumerate(entities):
        for box in boxes:
            x1, y1, x2, y2 = box_to_pixels(box, img.size)
            ym, xm = (y1 + y2) // 2, (x1 + x2) // 2
            for x, y in ((x1, ym), (x2, ym), (xm, y2)):  # left, right, bottom edges
                assert tuple(a[y, x]) == draw.colour(i), (i, box, x, y)
            assert tuple(a[ym, xm]) == (128, 128, 128)  # the inside is untouched


def test_a_box_to_the_image_edges_is_drawn_on_the_last_pixels():
    """box_to_pixels gives (0, 0, 100, 50) for the whole image (pixel edges); the outline's far sides are drawn
    on the image's last column and row."""
    img = grey(100, 50)
    out = np.asarray(
        draw.draw_entities(img, entities_to_pixel_boxes([("all", (0, 3), [(0.0, 0.0, 1.0, 1.0)])], img.size))
    )
    assert tuple(out[25, 99]) == draw.colour(0) and tuple(out[49, 50]) == draw.colour(0)
    assert tuple(out[25, 0]) == draw.colour(0) and tuple(out[0, 50]) == draw.colour(0)
    assert tuple(out[25, 50]) == (128, 128, 128)


def test_labels_are_drawn_with_filled_background():
    img = grey(400, 300)
    box = (0.25, 0.5, 0.75, 0.9)
    out = np.asarray(draw.draw_entities(img, entities_to_pixel_boxes([("a snowman", (0, 9), [box])], img.size)))
    x1, y1, _, _ = box_to_pixels(box, img.size)
    label_area = out[max(0, y1 - draw.font_size(img.size)) : y1, x1 : x1 + 40].reshape(-1, 3)
    colours = {tuple(c) for c in label_area}
    assert draw.colour(0) in colours  # the label's fill
    assert any(c not in (draw.colour(0), (128, 128, 128)) for c in colours)  # and its text
    # no room above a box at the top: the label goes inside it
    top = entities_to_pixel_boxes([("top", (0, 3), [(0.25, 0.0, 0.75, 0.5)])], img.size)
    out2 = np.asarray(draw.draw_entities(img, top))
    assert tuple(out2[5, 110]) == draw.colour(0)


def test_phrase_less_entities_have_no_label_and_colours_differ():
    out = np.asarray(
        draw.draw_entities(
            grey(),
            entities_to_pixel_boxes([("<patch_index_5><patch_index_9>", (0, 0), [(0.5, 0.5, 0.9, 0.9)])], (400, 300)),
        )
    )
    assert tuple(out[140, 200]) == (128, 128, 128)  # nothing above the box
    assert len(set(draw.PALETTE)) == len(draw.PALETTE)
    assert draw.colour(0) != draw.colour(1) and draw.colour(len(draw.PALETTE)) == draw.colour(0)


def test_scaling_with_image_size():
    assert draw.line_width((100, 100)) == 2 and draw.line_width((2000, 1500)) == 6
    assert draw.font_size((100, 100)) == 10 and draw.font_size((1024, 1024)) == 32


def test_entity_objects_and_arrays(tmp_path):
    from kosmos2_ref import tasks

    assert tasks.Entity is Entity  # one entity type
    e = Entity("dog", (0, 3), [(0.1, 0.1, 0.5, 0.5)], [(10, 10, 50, 50)])
    arr = np.full((100, 100, 3), 200, np.uint8)
    out = draw.draw_entities(arr, [e])
    assert out.size == (100, 100) and out.getpixel((10, 30)) == draw.colour(0)
    out = draw.draw_entities(IMAGES / "two_dogs.jpg", [e])
    assert out.size == (1200, 602)
    with pytest.raises(
        ValueError,
        match=r"entities\[0\] must be a kosmos2_ref.processing.grounding.Entity; got "
        r"'nonsense'",
    ):
        draw.draw_entities(arr, ["nonsense"])
    with pytest.raises(
        ValueError,
        match=r"entities\[1\] must be .*Entity: a \(phrase, span, boxes\) tuple of "
        r"post_process_generation becomes one with processing.entities_to_pixel",
    ):
        draw.draw_entities(arr, [e, ("dog", (0, 3), [(0.1, 0.1, 0.5, 0.5)])])
    # the images the processor refuses, refused with its messages (processing.image.load_image)
    with pytest.raises(ValueError, match=r"image: float pixels must lie in \[0, 1\]"):
        draw.draw_entities(np.full((10, 10, 3), 1.5, np.float32), [e])
    with pytest.raises(ValueError, match=r"image: image file not found"):
        draw.draw_entities(tmp_path / "nope.png", [e])


def test_drawing_never_changes_the_image_given():
    img = grey(50, 40)
    out = draw.draw_entities(img, entities_to_pixel_boxes([("a", (0, 1), [(0.1, 0.1, 0.9, 0.9)])], img.size))
    assert out is not img and np.asarray(img).max() == 128 and np.asarray(out).max() > 128


def test_save_image_atomic_and_checked(tmp_path):
    path = tmp_path / "out.png"
    draw.save_image(grey(20, 10), path)
    assert PIL.Image.open(path).size == (20, 10)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    with pytest.raises(ValueError, match="unknown extension"):
        draw.save_image(grey(), tmp_path / "out.xyz")
    with pytest.raises(ValueError, match="does not exist"):
        draw.save_image(grey(), tmp_path / "nope" / "out.png")


# ---------------------------------------------------------------------------------------------- attention


def fake_attn(B=2, H=3, Q=64, side=16, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random((B, H, Q, 1 + side * side + Q)).astype(np.float32)
    return a / a.sum(-1, keepdims=True)


def test_attention_map_drops_cls_and_latent_keys():
    a = fake_attn()
    m = draw.attention_map(a, query=5, batch=1)
    assert m.shape == (16, 16) and m.dtype == np.float32
    np.testing.assert_allclose(m, a[1, :, 5, 1:257].mean(0).reshape(16, 16), rtol=1e-6)
    assert draw.attention_map(a, None).shape == (64, 16, 16)
    a[0, :, 7, 0] = 100.0
    a[0, :, 7, 257:] = 100.0  # CLS and latent keys do not show
    assert draw.attention_map(a, 7).max() < 1.0
    with pytest.raises(ValueError, match="query=64"):
        draw.attention_map(a, 64)
    with pytest.raises(ValueError, match="keys"):
        draw.attention_map(a[..., :300], 0)
    with pytest.raises(ValueError, match="batch"):
        draw.attention_map(a, 0, batch=2)


def test_attention_heatmap_puts_heat_where_the_query_looks():
    a = np.zeros((1, 2, 64, 257 + 64), np.float32)
    a[0, :, 3, 1 + 0] = 1.0  # query 3 looks at the top-left patch only
    img = grey(320, 320)
    out = np.asarray(draw.attention_heatmap(a, img, query=3), dtype=np.int32)
    assert out.shape == (320, 320, 3)
    top_left, bottom_right = out[5, 5], out[300, 300]
    assert top_left.sum() > bottom_right.sum() + 150  # bright vs dark end of the ramp
    # a non-square image is shown square, as the model saw it
    assert draw.attention_heatmap(a, grey(200, 100), query=3).size == (200, 200)


def test_attention_grid_shape():
    sheet = draw.attention_grid(fake_attn(B=1), grey(), columns=8, cell=32)
    assert sheet.size == (8 * 34 - 2, 8 * 34 - 2)


def test_attention_from_the_model(tiny_checkpoint):
    from kosmos2_ref import Kosmos2
    from kosmos2_ref.processing import Kosmos2Processor

    folder, _ = tiny_checkpoint
    model = Kosmos2.from_pretrained(folder)
    pv = Kosmos2Processor.from_pretrained(folder)(images=PIL.Image.open(IMAGES / "two_dogs.jpg"))["pixel_values"]
    _, probs, _ = model.encode_image(pv)
    m = draw.attention_map(probs, None)
    assert m.shape == (64, 16, 16) and np.all(m >= 0)
    assert draw.attention_heatmap(probs, IMAGES / "two_dogs.jpg", query=0).size == (1200, 1200)


def test_confidence_labels_name_each_boxs_probability():
    """``confidence=True`` labels a box "phrase p" with p the product of its two location tokens' probabilities;
    boxes without one keep the bare phrase, and the default draws no numbers."""
    from kosmos2_ref.confidence import BoxConfidence, EntityConfidence

    img = grey()
    boxes = [(0.1, 0.2, 0.4, 0.9), (0.5, 0.1, 0.9, 0.5), (0.6, 0.6, 0.95, 0.95)]
    known = EntityConfidence(0.9, 0.8, [BoxConfidence(0.5, 0.25), BoxConfidence(None, 0.7)])
    dog = Entity("a dog", (0, 5), boxes[:2], [box_to_pixels(b, img.size) for b in boxes[:2]], known)
    bare = Entity("<patch_index_0000>", (6, 8), boxes[2:], [box_to_pixels(boxes[2], img.size)], known)
    drawn = np.asarray(draw.draw_entities(img, [dog, bare], confidence=True))
    expected = draw.draw_boxes(img, boxes, ["a dog 0.12", "a dog", "0.12"], [draw.colour(0)] * 2 + [draw.colour(1)])
    assert (drawn == np.asarray(expected)).all()
    assert draw.box_label("a cat", 0.876) == "a cat 0.88" and draw.box_label(None, None) is None
    plain = np.asarray(draw.draw_entities(img, [dog, bare]))
    assert (
        plain
        == np.asarray(draw.draw_boxes(img, boxes, ["a dog", "a dog", None], [draw.colour(0)] * 2 + [draw.colour(1)]))
    ).all()
    assert (plain != drawn).any()
