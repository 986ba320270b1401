"""Image preprocessing (kosmos2_ref.processing.image). docs/numerics.md §12.

Bit-exact parity with transformers' ``CLIPImageProcessorPil`` over modes, sizes and input kinds is in
tests/parity/test_processor_parity.py; here the configuration, the input contract and every error.
"""

import json

import fixtures_tokenizer as ft
import numpy as np
import PIL.Image
import pytest

from kosmos2_ref.processing.image import (
    ImageProcessorConfig,
    center_crop,
    load_image,
    preprocess_images,
    to_rgb_uint8,
)

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "HSV", "LAB", "RGBX"]  # 8 bits per sample
HIGH_BIT_MODES = ["I;16", "I;16B", "I;16L", "I", "F"]  # Pillow's convert would clip these to 8 bits


def _image(mode, size=(13, 7), seed=0):
    rng = np.random.default_rng(seed)
    base = PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    return base.convert(mode)


def test_spec_preprocessor_config_is_534_bytes():
    # docs/numerics.md §12.1: the Hub file is 534 bytes, json indent=2 with sorted keys and a trailing newline.
    text = json.dumps(ImageProcessorConfig().to_dict(), indent=2, sort_keys=True) + "\n"
    assert len(text.encode()) == 534
    assert ImageProcessorConfig().to_dict() == ft.PREPROCESSOR_CONFIG


def test_config_round_trip_and_use_square_size():
    config = ImageProcessorConfig.from_dict(ft.PREPROCESSOR_CONFIG)
    assert config == ImageProcessorConfig()
    assert config.resize_target(600, 1200) == (224, 224)  # aspect ratio ignored
    # 5.x quirk (docs/numerics.md §12.4): with use_square_size the resize is to 224 whatever size says.
    assert ImageProcessorConfig.from_dict({**ft.PREPROCESSOR_CONFIG, "size": {"shortest_edge": 180}}).resize_target(
        9, 9
    ) == (224, 224)
    plain = ImageProcessorConfig.from_dict({**ft.PREPROCESSOR_CONFIG, "use_square_size": False})
    assert plain.resize_target(600, 1200) == (224, 448) and plain.resize_target(1000, 300) == (746, 224)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"resample": 9}, r"resample must be a PIL resampling filter id \(0-5\), got 9"),
        ({"resample": "3"}, r"resample must be a PIL resampling filter id \(0-5\), got '3'"),
        ({"image_mean": [0.5, 0.5]}, r"image_mean must have 3 values .* got \[0.5, 0.5\]"),
        ({"size": {"longest_edge": 3}}, r"size must be an int, a \(height, width\) pair"),
        ({"crop_size": {"shortest_edge": 3}}, r"crop_size must give height and width, got {.shortest_edge.: 3}"),
        # JSON types: bool("false") would be True, float("abc") a bare "could not convert"
        ({"do_resize": "false"}, r"do_resize must be true or false \(a JSON boolean\), got 'false'"),
        ({"do_normalize": 0}, r"do_normalize must be true or false \(a JSON boolean\), got 0"),
        ({"rescale_factor": "abc"}, r"rescale_factor must be a finite number > 0, got 'abc'"),
        ({"rescale_factor": 0}, r"rescale_factor must be a finite number > 0, got 0"),
        ({"rescale_factor": float("inf")}, r"rescale_factor must be a finite number > 0, got inf"),
        ({"image_mean": "abc"}, r"image_mean must be a number or a list of 3 numbers .* got 'abc'"),
        ({"image_mean": [0.5, "a", 0.5]}, r"image_mean must be a number or a list of 3 numbers"),
        ({"image_mean": [0.5, float("nan"), 0.5]}, r"image_mean must hold finite numbers, got \[0.5, nan, 0.5\]"),
        ({"image_std": [0, 0, 0]}, r"image_std must hold finite numbers > 0, got \[0, 0, 0\]"),
        ({"image_std": -0.5}, r"image_std must hold finite numbers > 0, got \[-0.5, -0.5, -0.5\]"),
        # sizes: Pillow would fail deep inside on a negative edge; a zero crop gave pixel_values of shape (1, 3, 0, 0)
        ({"size": {"shortest_edge": -5}}, r"size.shortest_edge must be a positive int, got -5"),
        ({"size": {"shortest_edge": 22.5}}, r"size.shortest_edge must be a positive int, got 22.5"),
        ({"size": 0}, r"size must be a positive int, got 0"),
        ({"size": [224, "224"]}, r"size\[1\] must be a positive int, got '224'"),
        ({"crop_size": {"height": 0, "width": 0}}, r"crop_size.height must be a positive int, got 0"),
        ({"crop_size": {"height": 224, "width": True}}, r"crop_size.width must be a positive int, got True"),
    ],
)
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        ImageProcessorConfig.from_dict({**ft.PREPROCESSOR_CONFIG, **change})


def test_config_errors_name_the_file(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({**ft.PREPROCESSOR_CONFIG, "image_std": [0.2, 0.0, 0.2]}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json': image_std must hold finite numbers > 0"):
        ImageProcessorConfig.from_json_file(path)
    # transformers 5.x processor_config.json nests the settings under "image_processor"
    path = tmp_path / "processor_config.json"
    path.write_text(json.dumps({"image_processor": {**ft.PREPROCESSOR_CONFIG, "do_rescale": "yes"}}))
    with pytest.raises(ValueError, match=r"processor_config.json' \(its 'image_processor' entry\): do_rescale must"):
        ImageProcessorConfig.from_json_file(path)


def test_config_accepts_what_real_configs_carry():
    # null means the default; a single number is a mean/std for all three channels; an int size is an edge
    config = ImageProcessorConfig.from_dict(
        {**ft.PREPROCESSOR_CONFIG, "do_resize": None, "image_mean": 0.5, "image_std": 1, "size": 224, "crop_size": 100}
    )
    assert config.do_resize is True and config.image_mean == (0.5, 0.5, 0.5) and config.image_std == (1.0, 1.0, 1.0)
    assert config.size == {"shortest_edge": 224} and config.crop_size == {"height": 100, "width": 100}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_finite_float32(mode):
    pixels = preprocess_images(_image(mode))
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all()


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (5, 1), (224, 224), (300, 2)])
def test_any_size_down_to_one_pixel(size):
    assert preprocess_images(_image("RGB", size)).shape == (1, 3, 224, 224)


@pytest.mark.parametrize("mode", HIGH_BIT_MODES)
def test_high_bit_depth_images_are_refused(mode):
    # Pillow's convert("RGB") clips to [0, 255]: 16-bit pixels came out nearly white, floats in [0, 1] black.
    image = PIL.Image.new(mode, (6, 4))
    with pytest.raises(
        ValueError,
        match=rf"images: the PIL image of size \(6, 4\) has mode {mode} .* clipped to "
        r"8 bits; expected an 8-bit image",
    ):
        preprocess_images(image)


def test_high_bit_depth_files_are_refused(tmp_path):
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(np.full((4, 6), 40000, np.uint16)).save(path)  # a 16-bit greyscale PNG
    assert PIL.Image.open(path).mode.startswith("I")
    with pytest.raises(ValueError, match=r"images: the image file '.*deep\.png' has mode I.*16-bit integer pixels"):
        preprocess_images(path)
    # the suggested conversion works
    scaled = np.asarray(PIL.Image.open(path)) / 65535
    assert preprocess_images(scaled).shape == (1, 3, 224, 224)


def test_transparency_is_composited_onto_white():
    clear = PIL.Image.new("RGBA", (4, 4), (10, 200, 30, 0))
    assert (to_rgb_uint8(clear) == 255).all()
    assert (to_rgb_uint8(np.asarray(clear)) == 255).all()


def test_grey_arrays_equal_grey_images():
    grey = np.random.default_rng(1).integers(0, 256, (9, 11), dtype=np.uint8)
    expected = preprocess_images(PIL.Image.fromarray(grey, "L"))
    np.testing.assert_array_equal(preprocess_images(grey), expected)
    np.testing.assert_array_equal(preprocess_images(grey[:, :, None]), expected)


def test_float_arrays_are_intensities():
    rgb = np.random.default_rng(2).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    as_uint8 = preprocess_images(rgb)
    np.testing.assert_array_equal(preprocess_images(rgb.astype(np.float32)), as_uint8)  # integer-valued floats
    np.testing.assert_array_equal(preprocess_images(rgb.astype(np.int32)), as_uint8)
    # floats in [0, 1] are scaled by 255 and truncated, as transformers' to_pil_image does
    scaled = (rgb / 255.0).astype(np.float64)
    truncated = (scaled * 255.0).astype(np.float32).astype(np.uint8)
    np.testing.assert_array_equal(preprocess_images(scaled), preprocess_images(truncated))


def test_batches_paths_and_4d_arrays():
    batch = np.random.default_rng(3).integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    pixels = preprocess_images(batch)
    assert pixels.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(pixels[1], preprocess_images(batch[1])[0])
    path = ft.IMAGES / "two_dogs.jpg"
    np.testing.assert_array_equal(preprocess_images(str(path)), preprocess_images(path))


def test_center_crop_pads_small_images_with_zeros():
    image = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) + 1
    cropped = center_crop(image, 5, 2)
    assert cropped.shape == (2, 5, 2)
    np.testing.assert_array_equal(cropped[:, 0], 0)
    np.testing.assert_array_equal(cropped[:, 1:4], image[:, :, 1:3])


# ------------------------------------------------------------------------------------------------------ errors
def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"images: image file not found: '.*missing\.png'"):
        preprocess_images(str(tmp_path / "missing.png"))


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.txt' is not a readable image file \(UnidentifiedImageError"):
        preprocess_images(path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes((ft.IMAGES / "two_dogs.jpg").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cut\.jpg' is not a readable image file \(OSError"):
        preprocess_images(path)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((0, 4, 3), np.uint8), r"images: the array is empty \(an array of shape \(0, 4, 3\)"),
        (
            np.zeros((4, 4, 2), np.uint8),
            r"expected an array of shape \(H, W\), \(H, W, 1\), \(H, W, 3\) or \(H, W, 4\)",
        ),
        (np.zeros((3, 4, 5), np.uint8), r"\(channels last\), got an array of shape \(3, 4, 5\)"),
        (np.zeros((4,), np.uint8), r"expected an array of shape \(H, W\)"),
        (np.zeros((4, 4, 3), bool), "expected a uint8 or float array, got an array of shape .* dtype bool"),
        (np.full((4, 4, 3), np.nan), "the array holds NaN or infinite values"),
        (np.full((4, 4, 3), 1.5), r"float pixels must lie in \[0, 1\] \(or be integers in \[0, 255\]\)"),
        (np.full((4, 4, 3), 300.0), r"integer-valued pixels must lie in \[0, 255\], got values in \[300.0, 300.0\]"),
        (np.full((4, 4, 4), 2.5), r"a float RGBA array must lie in \[0, 1\]"),
    ],
)
def test_bad_arrays(array, message):
    with pytest.raises(ValueError, match=message):
        preprocess_images(array)


@pytest.mark.parametrize(
    "image, message",
    [
        (3, r"images: expected a PIL image, a path \(str or pathlib.Path\) or a uint8/float array .* got int 3"),
        ([], "images: got an empty list; expected at least one image"),
        (PIL.Image.new("RGB", (0, 0)), r"the image is empty \(a PIL image of mode RGB and size \(0, 0\)\)"),
    ],
)
def test_bad_inputs(image, message):
    with pytest.raises(ValueError, match=message):
        preprocess_images(image)


def test_error_names_the_item_in_a_batch():
    good = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match=r"images\[1\]: expected a PIL image"):
        preprocess_images([good, None])


# ---------------------------------------------------------------------------------------- the one image loader
def test_load_image_takes_every_image_the_processor_takes(tmp_path):
    """processing.image.load_image is the loader of the tasks, the jobs, the web service and drawing: a path
    (str or Path, EXIF-rotated), a PIL image of any 8-bit mode or an array -> the RGB image whose pixels the
    processor would use."""
    rgb = PIL.Image.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))
    assert load_image(rgb) is rgb  # nothing to convert: the same image
    path = tmp_path / "a.png"
    rgb.save(path)
    for given in (path, str(path), np.asarray(rgb), np.asarray(rgb) / 255.0, rgb.convert("RGBA"), rgb.convert("P")):
        image = load_image(given)
        assert isinstance(image, PIL.Image.Image) and image.mode == "RGB" and image.size == (6, 4)
        np.testing.assert_array_equal(np.asarray(image), to_rgb_uint8(given))
    clear = PIL.Image.new("RGBA", (4, 4), (10, 200, 30, 0))
    assert (np.asarray(load_image(clear)) == 255).all() and (np.asarray(load_image(np.asarray(clear))) == 255).all()
    grey = np.full((3, 5), 7, np.uint8)
    assert (np.asarray(load_image(grey)) == 7).all() and load_image(grey).size == (5, 3)
    rotated = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    PIL.Image.new("RGB", (8, 4), (200, 10, 10)).save(rotated, exif=exif)
    assert load_image(rotated).size == (4, 8)


@pytest.mark.parametrize(
    "image, message",
    [
        (
            np.zeros((4, 4, 2), np.uint8),
            r"photo: expected an array of shape \(H, W\), \(H, W, 1\), \(H, W, 3\) or "
            r"\(H, W, 4\) \(channels last\), got an array of shape \(4, 4, 2\)",
        ),
        (np.zeros((0, 4, 3), np.uint8), r"photo: the array is empty"),
        (np.full((2, 2, 3), np.nan), r"photo: the array holds NaN or infinite values"),
        (np.full((2, 2, 3), 1.5), r"photo: float pixels must lie in \[0, 1\] \(or be integers in \[0, 255\]\)"),
        (np.full((2, 2, 3), 300), r"photo: integer-valued pixels must lie in \[0, 255\]"),
        (np.zeros((2, 2, 3), bool), r"photo: expected a uint8 or float array"),
        (PIL.Image.new("I;16", (4, 4), 40000), r"photo: the PIL image of size \(4, 4\) has mode I;16 .* 8-bit image"),
        (PIL.Image.new("RGB", (0, 0)), r"photo: the image is empty"),
        (3, r"photo: expected a PIL image, a path \(str or pathlib.Path\) or a uint8/float array .* got int 3"),
        (None, r"photo: expected a PIL image, a path .* got NoneType None"),
    ],
)
def test_load_image_refuses_what_the_processor_refuses(image, message):
    with pytest.raises(ValueError, match=message):
        load_image(image, "photo")


def test_load_image_names_a_bad_file(tmp_path):
    with pytest.raises(ValueError, match=r"photo: image file not found: '.*nope\.jpg'"):
        load_image(tmp_path / "nope.jpg", "photo")
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match=r"photo: '.*bad\.jpg' is not a readable image file"):
        load_image(bad, "photo")
    with pytest.raises(ValueError, match=r"photo: "):
        load_image(tmp_path, "photo")  # a folder
    deep = tmp_path / "deep.png"
    PIL.Image.fromarray(np.full((4, 6), 40000, np.uint16)).save(deep)
    with pytest.raises(ValueError, match=r"photo: the image file '.*deep\.png' has mode I.*16-bit"):
        load_image(deep, "photo")


# ------------------------------------------------------------------ the picture as the model reads it
def test_seen_image_undoes_the_normalisation():
    # At the model's own size the resize is the identity, so undoing rescale and normalise gives the input back.
    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    config = ImageProcessorConfig()
    pixel_values = preprocess_images(PIL.Image.fromarray(array), config)  # [1, 3, 224, 224]
    assert np.array_equal(config.seen_image(pixel_values[0]), array)
    with pytest.raises(ValueError, match=r"pixel_values: expected one image's \[3, H, W\], got shape \(1, 3, 224"):
        config.seen_image(pixel_values)


def test_seen_box_follows_the_resize_and_the_centre_crop():
    # A 400 × 200 picture, shortest edge to 100 (so 200 × 100), centre crop 100 × 100: the middle half of the width
    # is read. A red rectangle over pixels x 150-250, y 50-150 must land where seen_box says, in the pixels read.
    array = np.full((200, 400, 3), 255, np.uint8)
    array[50:150, 150:250] = (255, 0, 0)
    config = ImageProcessorConfig.from_dict(
        {
            **ft.PREPROCESSOR_CONFIG,
            "use_square_size": False,
            "size": {"shortest_edge": 100},
            "crop_size": {"height": 100, "width": 100},
        }
    )
    box = (150 / 400, 50 / 200, 250 / 400, 150 / 200)
    seen = config.seen_box(box, (400, 200))
    assert seen == pytest.approx((0.25, 0.25, 0.75, 0.75))
    picture = config.seen_image(preprocess_images(PIL.Image.fromarray(array), config)[0])  # [100, 100, 3]
    red = (picture[..., 0] > 200) & (picture[..., 1] < 60) & (picture[..., 2] < 60)
    rows, cols = np.nonzero(red)
    assert abs(cols.min() - 25) <= 1 and abs(cols.max() + 1 - 75) <= 1
    assert abs(rows.min() - 25) <= 1 and abs(rows.max() + 1 - 75) <= 1
    assert config.seen_box((0.0, 0.0, 0.2, 1.0), (400, 200)) is None  # all of it in the cropped-off left quarter
    assert config.seen_box((0.1, 0.0, 0.5, 1.0), (400, 200)) == pytest.approx((0.0, 0.0, 0.5, 1.0))  # clipped
    # Kosmos-2's square resize reads the whole picture: boxes are unchanged.
    assert ImageProcessorConfig().seen_box(box, (400, 200)) == pytest.approx(box)
