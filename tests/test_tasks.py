"""The Python conveniences: caption, ground, describe, embed on a tiny random checkpoint.

Random weights write random text, so the end-to-end tests check structure; the parsing of boxes is checked with a
scripted generator that "writes" a known continuation (``scripted`` below).
"""

from __future__ import annotations

import re
import types

import numpy as np
import PIL.Image
import pytest
from fixtures_tokenizer import IMAGES

from kosmos2_ref import Kosmos2, tasks
from kosmos2_ref.processing import Kosmos2Processor
from kosmos2_ref.processing.image import load_image

DOGS = IMAGES / "two_dogs.jpg"  # 1200 x 602
SNOWMAN = IMAGES / "snowman.png"  # 1024 x 1024


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    return Kosmos2.from_pretrained(folder), Kosmos2Processor.from_pretrained(folder)


def scripted(monkeypatch, processor, continuation: str):
    """Make generation return the prompt followed by the tokens of ``continuation``."""
    new = processor.tokenizer.encode(continuation, add_special_tokens=False)
    calls = []

    def fake(model, inputs, max_new_tokens, streamer=None, **kwargs):
        calls.append(inputs)
        ids = np.concatenate([inputs["input_ids"], np.array([new + [2]], dtype=np.int64)], axis=1)
        return types.SimpleNamespace(sequences=ids, scores=[])  # no scores: no confidences

    monkeypatch.setattr(tasks, "_generate", fake)
    return calls


# ---------------------------------------------------------------------------------------------- end to end


def test_caption_structure(tiny):
    model, processor = tiny
    r = tasks.caption(model, DOGS, max_new_tokens=6, processor=processor)
    assert isinstance(r, tasks.CaptionResult)
    assert r.image_size == (1200, 602) and r.prompt == "<grounding> An image of"
    assert r.text.startswith("<grounding>") and "<image>" not in r.text
    assert isinstance(r.caption, str) and "<" not in r.caption.replace("<patch_index", "")
    for e in r.entities:
        assert len(e.boxes) == len(e.pixel_boxes) >= 1
    d = r.to_dict()
    assert set(d) >= {"text", "caption", "entities"}


def test_caption_streams_the_same_caption(tiny):
    model, processor = tiny
    pieces = []
    r = tasks.caption(model, DOGS, max_new_tokens=8, on_text=pieces.append, processor=processor)
    assert pieces and pieces[0].startswith("An image of")
    assert "".join(pieces).strip() == r.caption


def test_caption_accepts_pil_and_array(tiny):
    model, processor = tiny
    img = PIL.Image.open(DOGS)
    a = tasks.caption(model, img, max_new_tokens=4, processor=processor)
    b = tasks.caption(model, np.asarray(img.convert("RGB")), max_new_tokens=4, processor=processor)
    c = tasks.caption(model, str(DOGS), max_new_tokens=4, processor=processor)
    assert a.text == b.text == c.text


def test_ground_and_describe_structure(tiny):
    model, processor = tiny
    g = tasks.ground(model, SNOWMAN, "a snowman", max_new_tokens=4, processor=processor)
    assert g.phrase == "a snowman" and g.text.startswith("<grounding><phrase> a snowman</phrase>")
    assert len(g.boxes) == len(g.pixel_boxes)
    d = tasks.describe(model, SNOWMAN, (0.25, 0.1, 0.75, 0.9), max_new_tokens=4, processor=processor)
    assert d.box == (0.25, 0.1, 0.75, 0.9) and d.pixel_box == (256, 102, 768, 921)
    # the processor put the box after the phrase, so post-processing finds "It" with it
    assert d.entities[0].phrase == "It" and len(d.entities[0].boxes) == 1
    assert d.description.startswith("It")


def test_embed_matches_get_image_features(tiny):
    model, processor = tiny
    r = tasks.embed(model, [DOGS, SNOWMAN, DOGS], batch_size=2, processor=processor)
    C = model.config.text_config.embed_dim
    assert r.image_embeds.shape == (3, 64, C) and r.image_embeds.dtype == np.float32
    assert r.pooled.shape == (3, model.config.vision_config.hidden_size)
    pv = processor(images=[PIL.Image.open(DOGS), PIL.Image.open(SNOWMAN)])["pixel_values"]
    ref = model.get_image_features(pv)
    np.testing.assert_allclose(r.image_embeds[:2], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.image_embeds[2], r.image_embeds[0], rtol=1e-6, atol=1e-7)
    seen = []
    tasks.embed(model, DOGS, progress=lambda i, n, name: seen.append((i, n)), processor=processor)
    assert seen == [(0, 1), (1, 1)]


def test_processor_from_model_folder(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    model = Kosmos2.from_pretrained(folder)
    proc = tasks.processor_for(model)
    assert proc.tokenizer.token_to_id("<grounding>") == 64012
    # a folder without tokenizer files falls back to the packaged real tokenizer
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(folder / name, bare / name)
    proc = tasks.processor_for(Kosmos2.from_pretrained(bare))
    assert proc.tokenizer.encode("An image of a snowman") == [0, 712, 1648, 9, 10, 43867, 2]


# ---------------------------------------------------------------------------------------------- parsing


def test_caption_entities_from_generated_tags(tiny, monkeypatch):
    model, processor = tiny
    scripted(
        monkeypatch,
        processor,
        "<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863>"
        "</object> by<phrase> a fire</phrase><object><patch_index_0005>"
        "<patch_index_0005></delimiter_of_multi_objects/><patch_index_0010>"
        "<patch_index_0042></object>",
    )
    r = tasks.caption(model, SNOWMAN, processor=processor)
    assert r.caption == "An image of a snowman by a fire"
    snowman, fire = r.entities
    assert (snowman.phrase, snowman.span) == ("a snowman", (12, 21))
    assert snowman.boxes == [(0.390625, 0.046875, 0.984375, 0.828125)]
    assert snowman.pixel_boxes == [(400, 48, 1008, 848)]
    assert fire.phrase == "a fire" and len(fire.boxes) == 2
    assert fire.pixel_boxes[0] == (160, 0, 192, 32)


def test_ground_reads_the_object_of_the_phrase(tiny, monkeypatch):
    model, processor = tiny
    calls = scripted(monkeypatch, processor, "<object><patch_index_0044><patch_index_0863></object>")
    g = tasks.ground(model, DOGS, "  a   dog ", processor=processor)
    assert g.phrase == "a dog"
    assert g.boxes == [(0.390625, 0.046875, 0.984375, 0.828125)]
    assert g.pixel_boxes == [(468, 28, 1181, 498)]
    prompt_text = processor.decode(calls[0]["input_ids"][0], skip_special_tokens=True)
    assert prompt_text.endswith("</image><grounding><phrase> a dog</phrase>")
    # no <object> after the phrase: no boxes, no error
    scripted(monkeypatch, processor, " is here")
    assert tasks.ground(model, DOGS, "a dog", processor=processor).boxes == []


def test_describe_puts_the_box_in_the_prompt(tiny, monkeypatch):
    model, processor = tiny
    calls = scripted(monkeypatch, processor, " is a dog")
    d = tasks.describe(model, DOGS, "120,60.2,600,602", processor=processor)  # pixels
    assert d.box == pytest.approx((0.1, 0.1, 0.5, 1.0))
    assert d.description == "It is a dog"
    prompt_text = processor.decode(calls[0]["input_ids"][0], skip_special_tokens=True)
    assert prompt_text.endswith("<phrase> It</phrase><object><patch_index_0099><patch_index_1007></object>")


# ---------------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    "box, expect",
    [
        ((0.1, 0.2, 0.3, 0.4), (0.1, 0.2, 0.3, 0.4)),
        ("0.1,0.2,0.3,0.4", (0.1, 0.2, 0.3, 0.4)),
        ("100, 50, 200, 100", (0.5, 0.5, 1.0, 1.0)),
        ([0, 0, 1, 1], (0.0, 0.0, 1.0, 1.0)),
        ((0, 0, 200, 100), (0.0, 0.0, 1.0, 1.0)),
    ],
)
def test_normalise_box(box, expect):
    assert tasks.normalise_box(box, (200, 100)) == pytest.approx(expect)


@pytest.mark.parametrize(
    "box, match",
    [
        ("a,b,c,d", "four numbers"),
        ("0.1,0.2,0.3", "four"),
        ((0.5, 0.2, 0.3, 0.4), "x2 > x1"),
        ((10, 20, 300, 40), "outside the 200x100 image"),
        ((-1, 0, 0.5, 0.5), "negative"),
        ((0, 0, float("nan"), 1), "finite"),
        (None, "four numbers"),
    ],
)
def test_bad_boxes(box, match):
    with pytest.raises(ValueError, match=match):
        tasks.normalise_box(box, (200, 100))


def test_transparent_images_are_composited_onto_white_as_the_processor_does(tiny, monkeypatch):
    # The tasks once dropped alpha (convert("RGB")) while the processor composites onto white: the model saw the
    # colours hidden under transparent pixels.
    model, processor = tiny
    rgba = np.random.default_rng(0).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    rgba[:10, :, 3] = 0  # the top half fully transparent
    assert (np.asarray(load_image(rgba))[:10] == 255).all()
    assert (np.asarray(load_image(PIL.Image.fromarray(rgba, "RGBA")))[:10] == 255).all()
    calls = scripted(monkeypatch, processor, " a dog")
    for image in (rgba, PIL.Image.fromarray(rgba, "RGBA"), PIL.Image.fromarray(rgba, "RGBA").convert("LA")):
        tasks.caption(model, image, processor=processor)
        tasks.describe(model, image, (0.1, 0.1, 0.5, 0.5), processor=processor)
        expected = processor(images=image)["pixel_values"]
        np.testing.assert_array_equal(calls[-2]["pixel_values"], expected)
        np.testing.assert_array_equal(calls[-1]["pixel_values"], expected)
        embeds = tasks.embed(model, [image], processor=processor).image_embeds
        np.testing.assert_array_equal(embeds, model.get_image_features(expected))


def test_load_image_refuses_what_the_processor_refuses():
    with pytest.raises(
        ValueError,
        match=r"image: expected an array of shape \(H, W\), \(H, W, 1\), \(H, W, 3\) or "
        r"\(H, W, 4\) \(channels last\), got an array of shape \(4, 4, 2\)",
    ):
        load_image(np.zeros((4, 4, 2), np.uint8))
    # 16-bit images were clipped to 8 bits (nearly white) by convert("RGB")
    with pytest.raises(ValueError, match=r"images\[0\]: the PIL image of size \(4, 4\) has mode I;16 .* 8-bit image"):
        load_image(PIL.Image.new("I;16", (4, 4), 40000), "images[0]")
    with pytest.raises(ValueError, match=r"image: expected a PIL image, a path .* got int 3"):
        load_image(3)


def test_bad_inputs_name_the_input(tiny, tmp_path):
    model, processor = tiny
    with pytest.raises(ValueError, match="not found.*nope.jpg"):
        tasks.caption(model, tmp_path / "nope.jpg", processor=processor)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="bad.jpg.*not a readable image"):
        tasks.caption(model, bad, processor=processor)
    with pytest.raises(ValueError, match="phrase"):
        tasks.ground(model, DOGS, "  ", processor=processor)
    with pytest.raises(ValueError, match="'<'"):
        tasks.ground(model, DOGS, "<phrase>x", processor=processor)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tasks.caption(model, DOGS, max_new_tokens=0, processor=processor)
    with pytest.raises(ValueError, match="at least one image"):
        tasks.embed(model, [], processor=processor)
    with pytest.raises(ValueError, match="nope.jpg"):
        tasks.embed(model, [DOGS, tmp_path / "nope.jpg"], processor=processor)


def test_generate_kwargs_pass_through(tiny):
    model, processor = tiny
    greedy = tasks.caption(model, DOGS, max_new_tokens=3, processor=processor)
    beams = tasks.caption(model, DOGS, max_new_tokens=3, num_beams=2, processor=processor)
    assert isinstance(beams.caption, str) and beams.text.startswith("<grounding> An image of")
    with pytest.raises(ValueError, match="num_beams=1"):
        tasks.caption(model, DOGS, max_new_tokens=3, num_beams=2, on_text=print, processor=processor)
    assert greedy.caption.startswith("An image of")


def test_model_processor_is_built_once_per_model_and_shared_by_threads(tiny_checkpoint):
    import threading

    folder, _ = tiny_checkpoint
    model = Kosmos2.from_pretrained(folder)
    given = Kosmos2Processor.from_pretrained(folder)
    assert tasks.model_processor(model, given) is given  # a processor given is used as it is
    seen, start = [], threading.Barrier(4)

    def ask():
        start.wait()
        seen.append(tasks.model_processor(model))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4 and all(p is seen[0] for p in seen)
    assert tasks.model_processor(model) is seen[0]
    assert tasks.model_processor(Kosmos2.from_pretrained(folder)) is not seen[0]  # another model, its own
    assert seen[0].tokenizer.token_to_id("<grounding>") == 64012


def test_the_tasks_left_the_model_class_and_say_where_they_went(tiny):
    from kosmos2_ref import model as model_module

    model, _ = tiny
    for name, where in [
        ("caption", "kosmos2_ref.tasks.caption(model, image, ...)"),
        ("ground", "kosmos2_ref.tasks.ground(model, image, phrase, ...)"),
        ("describe", "kosmos2_ref.tasks.describe(model, image, box, ...)"),
        ("embed", "kosmos2_ref.tasks.embed(model, images, ...)"),
        ("processor", "kosmos2_ref.tasks.model_processor(model)"),
    ]:
        assert model_module.MOVED[name] == where
        assert name not in vars(Kosmos2)
        with pytest.raises(AttributeError, match=rf"^Kosmos2\.{name} has moved: use {re.escape(where)}$"):
            getattr(model, name)
        assert not hasattr(model, name)
    with pytest.raises(AttributeError, match=r"'Kosmos2' object has no attribute 'nonsense'"):
        model.nonsense  # noqa: B018 (the attribute lookup is what raises)
    assert getattr(model, "folder", None) is not None and getattr(model, "nonsense", 7) == 7


def test_tasks_take_the_model_then_the_image(tiny):
    """The processor is a keyword: the old call tasks.caption(model, processor, image) fails loudly."""
    model, processor = tiny
    with pytest.raises(TypeError):
        tasks.caption(model, processor, DOGS)
    with pytest.raises(TypeError):
        tasks.ground(model, processor, DOGS, "a dog")
