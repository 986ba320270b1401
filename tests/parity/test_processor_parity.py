"""Parity of kosmos2_ref.processing with transformers 5.23 (``AutoProcessor`` → ``Kosmos2Processor`` with
``CLIPImageProcessorPil``), both loading the same folders.
docs/numerics.md §9, §10, §11 and §12.

Every expected value comes from transformers run in the same test (or from docs/numerics.md, checked
against transformers too). Exact equality everywhere: ids and masks equal, pixel_values equal bit for bit.
"""

from __future__ import annotations

import io
import json
import re

import fixtures_tokenizer as ft
import numpy as np
import PIL.Image
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kosmos2_ref.processing import Kosmos2Processor, grounding
from kosmos2_ref.processing.image import preprocess_images
from kosmos2_ref.processing.tokenizer import Kosmos2Tokenizer

transformers = pytest.importorskip("transformers")
from transformers import AutoProcessor  # noqa: E402
from transformers.models.kosmos2 import processing_kosmos2 as hf_kosmos2  # noqa: E402

KINDS = ["synthetic", "real"]


def hypothesis_settings(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _hf(folder, **kwargs):
    processor = AutoProcessor.from_pretrained(folder, backend="pil", **kwargs)
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    return processor


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kind: ft.write_tokenizer_files(tmp_path_factory.mktemp(kind), kind) for kind in KINDS}


@pytest.fixture(scope="module")
def loaded(folders):
    """(ours, theirs) per (kind, padding side), loaded once per module."""
    cache = {}

    def get(kind, side="right"):
        if (kind, side) not in cache:
            kwargs = {} if side == "right" else {"padding_side": side}
            cache[kind, side] = (
                Kosmos2Processor.from_pretrained(folders[kind], **kwargs),
                _hf(folders[kind], **kwargs),
            )
        return cache[kind, side]

    return get


def _assert_same(ours: dict, theirs) -> None:
    """Same keys; ids and masks equal with the same dtype; pixel_values equal bit for bit."""
    theirs = dict(theirs)
    assert list(ours) == list(theirs)
    for key, expected in theirs.items():
        got = ours[key]
        if isinstance(expected, np.ndarray):
            assert got.dtype == expected.dtype and got.shape == expected.shape, key
            if expected.dtype == np.float32:
                assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), key
            else:
                assert np.array_equal(got, expected), key
        elif key == "pixel_values":  # return_tensors=None: a list of [3, H, W] arrays
            assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))
        else:
            assert got == expected, key


def _small_image(seed=0, size=(17, 11), mode="RGB"):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


IMG_A, IMG_B, IMG_C = _small_image(0), _small_image(1, (5, 40)), _small_image(2, (224, 224))
SNOWMAN = "<grounding><phrase> a snowman</phrase> warming himself by<phrase> a fire</phrase>."
TEXTS = [
    "<grounding> An image of",
    "<grounding> Two puppies sit in a field of grass.",
    SNOWMAN,
    "   leading and trailing spaces   ",
    "",
    "Describe this image in detail:",
    "<phrase>a</phrase><phrase>b</phrase> two  spaces\tand\nnewline",
    "unicode café 日本 😀 <grounding>",
]

# (text, images, bboxes, kwargs) for single examples and batches
CASES = [
    *[(t, IMG_A, None, {}) for t in TEXTS],
    (TEXTS, [IMG_A, IMG_B, IMG_C] * 2 + [IMG_A, IMG_B], None, {}),
    (TEXTS[:3], [IMG_A, IMG_B, IMG_C], None, {"padding": True}),
    (TEXTS[:3], [IMG_A, IMG_B, IMG_C], None, {"padding": "longest", "add_eos_token": True}),
    (TEXTS[:3], [IMG_A, IMG_B, IMG_C], None, {"padding": "max_length", "max_length": 90}),
    (TEXTS[:3], [IMG_A, IMG_B, IMG_C], None, {"truncation": True, "max_length": 70}),
    (TEXTS[:3], [IMG_A, IMG_B, IMG_C], None, {"max_length": 69}),
    (TEXTS[:2], [IMG_A, IMG_B], None, {"add_special_tokens": False}),
    (TEXTS[:2], [IMG_A, IMG_B], None, {"add_special_tokens": False, "add_eos_token": True}),
    (TEXTS[2], IMG_A, [(44, 863), (0.171875, 0.015625, 0.484375, 0.890625)], {}),
    (TEXTS[2], IMG_A, [[(44, 863), (1, 2)], None], {"add_eos_token": True}),
    (TEXTS[2], IMG_A, [[], [(0.0, 0.0, 1.0, 1.0), (0.5, 0.5, 0.51, 0.52)]], {}),
    (
        [TEXTS[2], TEXTS[6], TEXTS[0]],
        [IMG_A, IMG_B, IMG_C],
        [[(5, 911), None], [(0, 1023), [(1, 1)]], None],
        {"padding": True},
    ),
    ([TEXTS[2], TEXTS[0]], [IMG_A, IMG_B], None, {"num_image_tokens": 5, "first_image_token_id": 100}),
    (TEXTS[0], IMG_A, None, {"return_tensors": None}),
    (TEXTS[:3], [IMG_A, IMG_B, IMG_C], None, {"return_tensors": None}),
    # text only (no image mask) and images only
    (TEXTS[0], None, None, {}),
    (TEXTS, None, None, {"padding": True}),
    (TEXTS, None, None, {"padding": True, "padding_side": "left", "add_eos_token": True}),
    (TEXTS, None, None, {"padding": "max_length", "max_length": 12, "truncation": True}),
    (TEXTS[2], None, [(44, 863), (5, 911)], {"return_tensors": None}),
    (TEXTS[:2], None, None, {"return_tensors": None}),
    (None, [IMG_A, IMG_B], None, {}),
]


def _call(processor, text, images, bboxes, kwargs, ours: bool):
    kwargs = dict(kwargs)
    if not ours:
        kwargs.setdefault("return_tensors", "np")
    return processor(text=text, images=images, bboxes=bboxes, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_processor_outputs_equal_transformers(loaded, kind, side, case):
    ours, theirs = loaded(kind, side)
    text, images, bboxes, kwargs = CASES[case]
    _assert_same(_call(ours, text, images, bboxes, kwargs, True), _call(theirs, text, images, bboxes, kwargs, False))


def test_spec_prompt_ids_with_transformers(loaded):
    # docs/numerics.md §10.1 and §9: the real tokenizer
    ours, theirs = loaded("real")
    expected = [0, 64003] + list(range(4, 68)) + [64004, 64012, 712, 1648, 9]
    for processor, is_ours in ((ours, True), (theirs, False)):
        assert _call(processor, "<grounding> An image of", IMG_A, None, {}, is_ours)["input_ids"].tolist() == [expected]
    text = "<grounding> Two puppies sit in a field of grass."
    a, b = (
        _call(p, text, IMG_A, None, {}, o)["input_ids"][0, 67:].tolist() for p, o in ((ours, True), (theirs, False))
    )
    assert a == b == [64012, 1264, 17772, 1357, 12, 10, 770, 9, 4464, 4]
    assert ours.decode(a) == theirs.decode(b) == text
    assert (
        ours.tokenizer.encode("An image of a snowman")
        == theirs.tokenizer("An image of a snowman").input_ids
        == [0, 712, 1648, 9, 10, 43867, 2]
    )


def test_padding_side_given_to_the_call_with_images(loaded):
    """transformers 5.23 pads image rows on the tokenizer's side and ignores a padding_side given to the call;
    we honour it. Ours(padding_side="left") equals transformers loaded with padding_side="left"."""
    ours, theirs = loaded("synthetic")
    _, theirs_left = loaded("synthetic", "left")
    args = (TEXTS[:3], [IMG_A, IMG_B, IMG_C], None)
    call_left = _call(ours, *args, {"padding_side": "left"}, True)
    _assert_same(call_left, _call(theirs_left, *args, {}, False))
    ignored = _call(theirs, *args, {"padding_side": "left"}, False)
    _assert_same(_call(ours, *args, {}, True), ignored)  # right-padded: transformers ignored the argument


# --------------------------------------------------------------------------------------------- hypothesis
WORD_FRAGMENTS = ["an", " image", " of", " a", " snowman", " dog", "Two", " puppies", ".", ",", " ", "  ", "\t",
                  "\n", "é", "日本", "😀", "x", "Look", "<grounding>", "</object>", "<patch_index_0007>", "<s>",
                  "</s>", "<pad>", "<unk>", "<mask>", "</image>", "<image>", "<", ">"]  # fmt: skip
PHRASES = st.lists(st.sampled_from(WORD_FRAGMENTS), min_size=1, max_size=4).map("".join).filter(lambda s: "<" not in s)


@st.composite
def grounded_text(draw):
    """A text with 0-3 <phrase>…</phrase> and a matching bboxes entry of any accepted form."""
    parts, boxes = [], []
    for _ in range(draw(st.integers(0, 3))):
        parts.append(draw(st.lists(st.sampled_from(WORD_FRAGMENTS), max_size=4).map("".join)))
        parts.append(f"<phrase>{draw(PHRASES)}</phrase>")
        boxes.append(draw(box_entries))
    parts.append(draw(st.lists(st.sampled_from(WORD_FRAGMENTS), max_size=4).map("".join)))
    text = "".join(parts)
    # the phrase regex of transformers is ".+?" between the tags; stray tags in the filler could shift matches
    if len(grounding._PHRASE_SPAN.findall(text)) != len(boxes):
        boxes = None
    return text, draw(st.sampled_from([None, boxes, []])) if boxes else None


coord = st.floats(0.0, 1.0, allow_nan=False)
float_box = st.tuples(coord, coord, coord, coord).filter(lambda b: b[2] > b[0] + 1e-9 and b[3] > b[1] + 1e-9)
# (upper-left cell, lower-right cell): the lower-right one is not above or left of the upper-left one (ours refuses a
# reversed pair, which transformers would encode as given; docs/parity.md)
index_box = st.tuples(st.integers(0, 1023), st.integers(0, 1023)).filter(
    lambda b: b[0] // 32 <= b[1] // 32 and b[0] % 32 <= b[1] % 32
)
one_box = float_box | index_box
box_entries = st.one_of(st.none(), one_box, st.lists(one_box, max_size=3))


@hypothesis_settings(30)
@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
def test_processor_on_drawn_inputs_equals_transformers(loaded, kind, data):
    ours, theirs = loaded(kind, data.draw(st.sampled_from(["right", "left"])))
    batch = data.draw(st.lists(grounded_text(), min_size=1, max_size=3))
    texts = [t for t, _ in batch]
    bboxes = [b for _, b in batch]
    with_images = data.draw(st.booleans())
    kwargs = data.draw(st.fixed_dictionaries({}, optional={
        "add_eos_token": st.booleans(), "add_special_tokens": st.booleans(),
        "padding": st.sampled_from([True, "longest"]),
    }))  # fmt: skip
    if not with_images:
        kwargs["padding"] = True
    images = [IMG_A] * len(texts) if with_images else None
    single = len(texts) == 1 and data.draw(st.booleans())
    args = (texts[0], images[0] if images else None, bboxes[0]) if single else (texts, images, bboxes)
    _assert_same(_call(ours, *args, kwargs, True), _call(theirs, *args, kwargs, False))


# --------------------------------------------------------------------------------------------------- images
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "HSV", "LAB", "RGBX", "RGBa"]
HIGH_BIT_MODES = ["I;16", "I", "F"]  # refused by ours; transformers clips them to 8 bits (docs/parity.md)
SIZES = [(1, 1), (1, 7), (9, 1), (13, 7), (223, 225), (224, 224), (225, 224), (500, 13), (640, 480)]


def _mode_image(mode, size, seed=0):
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        return PIL.Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    if mode == "F":
        return PIL.Image.fromarray(rng.uniform(-20.0, 300.0, (height, width)).astype(np.float32))
    if mode == "I":
        return PIL.Image.fromarray(rng.integers(-50, 400, (height, width), dtype=np.int32))
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA").convert(mode)


@pytest.fixture(scope="module")
def image_processors(loaded):
    ours, theirs = loaded("synthetic")
    return ours.image_processor_config, theirs.image_processor


def _theirs_pixels(processor, images, **kwargs):
    return processor(images, return_tensors="np", **kwargs)["pixel_values"]


def _assert_bits(ours, theirs):
    assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("mode", MODES)
def test_pixels_every_mode(image_processors, mode):
    config, theirs = image_processors
    images = [_mode_image(mode, size, seed) for seed, size in enumerate(SIZES[:5])]
    _assert_bits(preprocess_images(images, config), _theirs_pixels(theirs, images))


@pytest.mark.parametrize("mode", HIGH_BIT_MODES)
def test_high_bit_depth_images_are_refused_where_transformers_clips_them(image_processors, mode):
    """The one deliberate difference for images: transformers converts a 16-bit or float image to 8-bit RGB by
    clipping (a 16-bit photo comes out nearly white, a [0, 1] float one black); ours says so instead."""
    config, theirs = image_processors
    image = _mode_image(mode, (13, 7))
    clipped = _theirs_pixels(theirs, image)
    assert clipped.shape == (1, 3, 224, 224)  # transformers takes it
    with pytest.raises(ValueError, match=rf"mode {re.escape(mode)} \(.*clipped to 8 bits"):
        preprocess_images(image, config)


@pytest.mark.parametrize("size", SIZES)
def test_pixels_every_size(image_processors, size):
    config, theirs = image_processors
    image = _mode_image("RGB", size, 7)
    _assert_bits(preprocess_images(image, config), _theirs_pixels(theirs, image))


def test_pixels_transparency_info(image_processors):
    config, theirs = image_processors
    palette = _mode_image("P", (30, 20))
    palette.info["transparency"] = 3
    grey = _mode_image("L", (30, 20))
    grey.info["transparency"] = 128
    rgb = _mode_image("RGB", (30, 20))
    rgb.info["transparency"] = (1, 2, 3)
    for image in (palette, grey, rgb):
        _assert_bits(preprocess_images(image, config), _theirs_pixels(theirs, image))


@pytest.mark.parametrize("name", ["snowman.png", "two_dogs.jpg", "corgi.jpg", "quadrocopter.jpg"])
def test_pixels_real_photos_as_images_and_paths(image_processors, name):
    config, theirs = image_processors
    path = ft.IMAGES / name
    with PIL.Image.open(path) as image:
        _assert_bits(preprocess_images(image, config), _theirs_pixels(theirs, image))
    _assert_bits(preprocess_images(str(path), config), _theirs_pixels(theirs, str(path)))


def test_pixels_paths_apply_exif_rotation_and_drop_alpha(image_processors, tmp_path):
    """transformers' load_image rotates by EXIF and converts paths with convert("RGB") (alpha dropped, not
    composited); we do the same for paths."""
    config, theirs = image_processors
    rotated = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise
    _mode_image("RGB", (40, 16)).save(rotated, exif=exif)
    ours = preprocess_images(str(rotated), config)
    _assert_bits(ours, _theirs_pixels(theirs, str(rotated)))
    with PIL.Image.open(rotated) as unrotated:
        assert not np.array_equal(ours, preprocess_images(unrotated, config))
    clear = tmp_path / "clear.png"
    _mode_image("RGBA", (20, 30)).save(clear)
    _assert_bits(preprocess_images(str(clear), config), _theirs_pixels(theirs, str(clear)))


def test_pixels_arrays(image_processors):
    config, theirs = image_processors
    rng = np.random.default_rng(5)
    last = {"input_data_format": "channels_last"}
    for shape in [(20, 30, 3), (20, 30, 4), (20, 30, 1), (5, 6, 3), (1, 1, 3), (1, 5, 4), (300, 7, 3)]:
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        _assert_bits(preprocess_images(array, config), _theirs_pixels(theirs, array, **last))
        if shape[2] != 4:  # integer-valued floats: the same as uint8 (RGBA floats must lie in [0, 1])
            as_float = array.astype(np.float32)
            _assert_bits(preprocess_images(as_float, config), _theirs_pixels(theirs, as_float, **last))
        # floats in [0, 1]: transformers rescales them twice; without its second rescale it equals ours
        unit = array / 255.0
        _assert_bits(preprocess_images(unit, config), _theirs_pixels(theirs, unit, do_rescale=False, **last))
    for bad in (np.full((4, 5, 4), 255.0), np.full((4, 5, 3), 1.5)):  # both sides refuse these
        with pytest.raises(ValueError):
            _theirs_pixels(theirs, bad, **last)
        with pytest.raises(ValueError):
            preprocess_images(bad, config)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    _assert_bits(preprocess_images(grey, config), _theirs_pixels(theirs, grey[:, :, None], **last))
    batch = rng.integers(0, 256, (3, 8, 9, 3), dtype=np.uint8)
    _assert_bits(preprocess_images(batch, config), _theirs_pixels(theirs, list(batch), **last))


@hypothesis_settings(25)
@given(
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_pixels_on_drawn_images(image_processors, width, height, mode, seed):
    config, theirs = image_processors
    image = _mode_image(mode, (width, height), seed)
    _assert_bits(preprocess_images(image, config), _theirs_pixels(theirs, image))


def test_pixels_without_square_size(tmp_path):
    """A preprocessor config without use_square_size resizes the shortest edge and crops the centre."""
    folder = ft.write_tokenizer_files(tmp_path, "synthetic")
    config = dict(ft.PREPROCESSOR_CONFIG, use_square_size=False, size={"shortest_edge": 100},
                  crop_size={"height": 90, "width": 120})  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    ours, theirs = Kosmos2Processor.from_pretrained(folder), _hf(folder)
    images = [_mode_image("RGB", size, 3) for size in [(300, 200), (50, 80), (100, 100)]]
    _assert_bits(preprocess_images(images, ours.image_processor_config), _theirs_pixels(theirs.image_processor, images))


# ---------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    return ft.write_sentencepiece_folder(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def spm_pair(spm_folder):
    # transformers' SentencePiece converter reads the .model file with protobuf (a dev dependency)
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to convert sentencepiece.bpe.model")
    return Kosmos2Processor.from_pretrained(spm_folder), _hf(spm_folder)


def test_sentencepiece_build_equals_transformers_converter(spm_pair):
    """Our tokenizer built from sentencepiece.bpe.model is, as tokenizers JSON, the one transformers' converter
    builds (XLMRobertaTokenizer from the .model file) plus the processor's added tokens."""
    ours, theirs = spm_pair
    assert type(theirs.tokenizer).__name__ == "XLMRobertaTokenizer"
    assert json.loads(ours.tokenizer.backend_tokenizer.to_str()) == json.loads(
        theirs.tokenizer.backend_tokenizer.to_str()
    )
    assert len(ours.tokenizer) == len(theirs.tokenizer) == 65037


@hypothesis_settings(150)
@given(st.one_of(st.text(max_size=60), st.lists(st.sampled_from(WORD_FRAGMENTS), max_size=12).map("".join)))
def test_sentencepiece_folder_ids_equal_transformers(spm_pair, text):
    ours, theirs = spm_pair
    for special in (True, False):
        expected = theirs.tokenizer(text, add_special_tokens=special).input_ids
        assert ours.tokenizer.encode(text, add_special_tokens=special) == expected


def test_sentencepiece_folder_processor_equals_transformers(spm_pair):
    ours, theirs = spm_pair
    for text, images, bboxes, kwargs in CASES[8:14]:
        _assert_same(
            _call(ours, text, images, bboxes, kwargs, True), _call(theirs, text, images, bboxes, kwargs, False)
        )


def test_folder_with_a_kosmos2_config_json(tmp_path, loaded):
    """With a kosmos-2 config.json, transformers loads tokenizer.json as it is (TokenizersBackend); the outputs
    stay equal to ours."""
    from transformers import Kosmos2Config

    for kind in KINDS:
        folder = ft.write_tokenizer_files(tmp_path / kind, kind)
        Kosmos2Config().save_pretrained(folder)
        theirs = _hf(folder)
        assert type(theirs.tokenizer).__name__ == "TokenizersBackend"
        ours = Kosmos2Processor.from_pretrained(folder)
        for text, images, bboxes, kwargs in CASES[8:12]:
            _assert_same(
                _call(ours, text, images, bboxes, kwargs, True), _call(theirs, text, images, bboxes, kwargs, False)
            )


@hypothesis_settings(100)
@pytest.mark.parametrize("kind", KINDS)
@given(
    ids=st.lists(
        st.integers(0, 65036) | st.sampled_from([0, 1, 2, 3, 64001, 64003, 64004, 64007, 64008, 64012]), max_size=30
    ),
    skip=st.booleans(),
    cleanup=st.sampled_from([None, True, False]),
)
def test_decode_equals_transformers(loaded, kind, ids, skip, cleanup):
    ours, theirs = loaded(kind)
    expected = theirs.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=cleanup)
    assert ours.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=cleanup) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_batch_decode_and_post_process_image_text_to_text(loaded, kind):
    ours, theirs = loaded(kind)
    inputs = _call(ours, TEXTS[:3], [IMG_A, IMG_B, IMG_C], None, {"padding": True}, True)
    generated = np.concatenate(
        [inputs["input_ids"], np.asarray([[64007, 10, 64008, 64009, 64057, 64876, 64010, 2]] * 3)], axis=1
    )
    for skip in (True, False):
        assert ours.batch_decode(generated, skip_special_tokens=skip) == theirs.batch_decode(
            generated, skip_special_tokens=skip
        )
    assert ours.post_process_image_text_to_text(generated) == theirs.post_process_image_text_to_text(generated)
    texts = theirs.batch_decode(generated, skip_special_tokens=True)
    assert [ours.post_process_generation(t) for t in texts] == [theirs.post_process_generation(t) for t in texts]


# ---------------------------------------------------------------------------------------- post-processing
def test_spec_section_11_example_with_transformers(loaded):
    ours, theirs = loaded("synthetic")
    text = (
        "<grounding> Look<object><patch_index_0005><patch_index_0005></delimiter_of_multi_objects/>"
        "<patch_index_0010><patch_index_0042></object> here<phrase>x</phrase><object><patch_index_0033>"
        "<patch_index_0063></object>"
    )
    expected = (
        "Look herex",
        [
            ("<patch_index_5><patch_index_5>", (4, 4), [(0.15625, 0.0, 0.1875, 0.03125)]),
            ("<patch_index_10><patch_index_42>", (4, 4), [(0.3125, 0.0, 0.34375, 0.0625)]),
            ("x", (9, 10), [(0.03125, 0.03125, 1.0, 0.0625)]),
        ],
    )
    assert ours.post_process_generation(text) == theirs.post_process_generation(text) == expected


POST_FRAGMENTS = [
    "<phrase>", "</phrase>", "<object>", "</object>", "</delimiter_of_multi_objects/>", "<grounding>", "<image>",
    "</image>", "<patch_index_0005>", "<patch_index_1023>", "<patch_index_0044>", "<patch_index_12>", "<s>",
    "<patch_index_99999>", "<patch_index_٣>", "<", ">", " ", "  ", "\n", "\t", "a", " dog", "x", "é", "日本", "😀",
    "<phrase> a cat</phrase><object><patch_index_0001><patch_index_0100></object>", "<phrase> </phrase>",
]  # fmt: skip


@hypothesis_settings(500)
@given(
    st.one_of(
        st.text(max_size=60), st.lists(st.sampled_from(POST_FRAGMENTS) | st.text(max_size=3), max_size=30).map("".join)
    )
)
def test_post_processing_equals_transformers(loaded, text):
    ours, theirs = loaded("synthetic")
    assert ours.post_process_generation(text, cleanup_and_extract=False) == theirs.post_process_generation(
        text, cleanup_and_extract=False
    )
    assert ours.post_process_generation(text) == theirs.post_process_generation(text)


@hypothesis_settings(300)
@given(one_box)
def test_box_conversions_equal_transformers(box):
    if len(box) == 4:
        assert grounding.box_to_patch_indices(box) == hf_kosmos2.coordinate_to_patch_index(box, 32)
    else:
        assert grounding.patch_indices_to_box(*box) == hf_kosmos2.patch_index_to_coordinate(*box, 32)


@hypothesis_settings(200)
@given(grounded_text())
def test_box_insertion_equals_transformers(loaded, drawn):
    ours, theirs = loaded("synthetic")
    text, bboxes = drawn
    assert grounding.insert_patch_index_tokens(text, bboxes) == theirs._insert_patch_index_tokens(text, bboxes)


# ---------------------------------------------------------------------------------------------- save/load
def test_our_save_pretrained_loads_in_transformers(tmp_path, loaded):
    ours, _ = loaded("real")
    ours.save_pretrained(tmp_path)
    theirs = _hf(tmp_path)
    for text, images, bboxes, kwargs in CASES[8:14] + CASES[-6:]:
        _assert_same(
            _call(ours, text, images, bboxes, kwargs, True), _call(theirs, text, images, bboxes, kwargs, False)
        )


def test_transformers_save_pretrained_loads_in_ours(tmp_path, loaded):
    """transformers 5.x saves processor_config.json (image settings nested) instead of preprocessor_config.json."""
    _, theirs = loaded("synthetic")
    theirs.save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    ours = Kosmos2Processor.from_pretrained(tmp_path)
    for text, images, bboxes, kwargs in CASES[8:14]:
        _assert_same(
            _call(ours, text, images, bboxes, kwargs, True), _call(theirs, text, images, bboxes, kwargs, False)
        )


def test_default_processor_equals_transformers_on_the_real_tokenizer(loaded):
    _, theirs = loaded("real")
    ours = Kosmos2Processor.default()
    for text, images, bboxes, kwargs in CASES[8:14]:
        _assert_same(
            _call(ours, text, images, bboxes, kwargs, True), _call(theirs, text, images, bboxes, kwargs, False)
        )


def test_image_bytes_round_trip_through_png(image_processors):
    """An image written to PNG and read back gives the same pixel values on both sides."""
    config, theirs = image_processors
    buffer = io.BytesIO()
    _mode_image("RGBA", (33, 21)).save(buffer, format="PNG")
    with PIL.Image.open(io.BytesIO(buffer.getvalue())) as image:
        _assert_bits(preprocess_images(image, config), _theirs_pixels(theirs, image))


def test_tokenizer_class_is_kosmos2_tokenizer(loaded):
    ours, _ = loaded("synthetic")
    assert isinstance(ours.tokenizer, Kosmos2Tokenizer)


def test_clean_up_tokenization_spaces_from_tokenizer_config(tmp_path):
    folder = ft.write_tokenizer_files(tmp_path, "synthetic", clean_up_tokenization_spaces=True)
    ours, theirs = Kosmos2Processor.from_pretrained(folder), _hf(folder)
    ids = theirs.tokenizer("a dog , a cat . is it ? n't 's", add_special_tokens=False).input_ids
    assert ours.decode(ids) == theirs.decode(ids) == "a dog, a cat. is it?n't's"


def test_processor_config_with_fewer_patch_tokens(tmp_path):
    """num_patch_index_tokens from processor_config.json: the grid side and the added tokens follow it."""
    folder = ft.write_tokenizer_files(tmp_path, "synthetic")
    (folder / "processor_config.json").write_text(
        json.dumps({"num_patch_index_tokens": 256, "processor_class": "Kosmos2Processor"})
    )
    ours, theirs = Kosmos2Processor.from_pretrained(folder), _hf(folder)
    assert ours.num_patch_index_tokens == theirs.num_patch_index_tokens == 256
    args = (SNOWMAN, IMG_A, [(0.1, 0.2, 0.9, 0.95), (3, 200)])
    _assert_same(_call(ours, *args, {}, True), _call(theirs, *args, {}, False))
    # transformers' post_process_generation always decodes on the 32×32 grid; we do the same.
    text = "<phrase> a</phrase><object><patch_index_0017><patch_index_0200></object>"
    assert ours.post_process_generation(text) == theirs.post_process_generation(text)
