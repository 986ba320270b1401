"""Kosmos2Processor: prompt layout, batching, boxes and errors at the boundary. docs/numerics.md §10.

Parity with transformers' AutoProcessor on the same folders is in tests/parity/test_processor_parity.py.
"""

import json
import re

import fixtures_tokenizer as ft
import numpy as np
import PIL.Image
import pytest

from kosmos2_ref.processing import Kosmos2Processor

IMAGE = PIL.Image.new("RGB", (30, 20), (120, 30, 200))
SLOTS = list(range(4, 68))  # docs/numerics.md §10.1: the 64 image slots hold ids 4…67


@pytest.fixture(scope="module")
def real():
    return Kosmos2Processor.default()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return Kosmos2Processor.from_pretrained(ft.write_tokenizer_files(tmp_path_factory.mktemp("syn"), "synthetic"))


def test_spec_prompt_layout(real):
    # docs/numerics.md §10.1: [0, 64003, 4…67, 64004, <text ids>], text from index 67;
    # mask [0, 0, 1×64, 0, 0…]
    out = real(text="<grounding> An image of", images=IMAGE)
    assert out["input_ids"].tolist() == [[0, 64003] + SLOTS + [64004, 64012, 712, 1648, 9]]
    assert out["image_embeds_position_mask"].tolist() == [[0, 0] + [1] * 64 + [0] * 5]
    assert out["attention_mask"].tolist() == [[1] * 71]
    assert out["pixel_values"].shape == (1, 3, 224, 224) and out["pixel_values"].dtype == np.float32
    assert out["input_ids"].dtype == np.int64


def test_eos_and_no_special_tokens(real):
    eos = real(text="An image of", images=IMAGE, add_eos_token=True)["input_ids"][0].tolist()
    assert eos[:2] == [0, 64003] and eos[-4:] == [712, 1648, 9, 2]
    plain = real(text="An image of", images=IMAGE, add_special_tokens=False)
    assert plain["input_ids"][0].tolist()[:2] == [64003, 4]
    assert plain["image_embeds_position_mask"][0].tolist()[:3] == [0, 1, 1]


def test_num_image_tokens_and_first_image_token_id(real):
    out = real(text="a", images=IMAGE, num_image_tokens=3, first_image_token_id=100)
    assert out["input_ids"].tolist() == [[0, 64003, 100, 101, 102, 64004, 10]]
    assert out["image_embeds_position_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 0]]


def test_boxes_become_tokens(real):
    out = real(text="<grounding><phrase> a snowman</phrase> warming himself", images=IMAGE,
               bboxes=[(0.390625, 0.046875, 0.984375, 0.828125)])  # fmt: skip
    text_ids = out["input_ids"][0, 67:].tolist()
    assert text_ids == [64012, 64007, 10, 43867, 64008, 64009, 64057, 64876, 64010, 5950, 597]


def test_images_pad_rows_even_without_padding(real):
    # docs/numerics.md §10.2: with images, rows of unequal length are padded to the longest even with padding=False
    out = real(text=["a", "an image of a snowman"], images=[IMAGE, IMAGE])
    assert out["input_ids"].shape == (2, 72)
    assert out["input_ids"][0, -4:].tolist() == [1, 1, 1, 1]
    assert out["attention_mask"][0, -4:].tolist() == [0, 0, 0, 0]
    left = real(text=["a", "an image of a snowman"], images=[IMAGE, IMAGE], padding_side="left")
    assert left["input_ids"][0, :4].tolist() == [1, 1, 1, 1] and left["input_ids"][0, 4:6].tolist() == [0, 64003]
    assert left["image_embeds_position_mask"][0, :7].tolist() == [0, 0, 0, 0, 0, 0, 1]


def test_text_only_and_images_only(real):
    out = real(text="An image of")
    assert set(out) == {"input_ids", "attention_mask"} and out["input_ids"].tolist() == [[0, 712, 1648, 9]]
    assert set(real(images=[IMAGE, IMAGE])) == {"pixel_values"}


def test_return_tensors_none_gives_lists(real):
    single = real(text="An image of", images=IMAGE, return_tensors=None)
    assert single["input_ids"][:2] == [0, 64003] and isinstance(single["input_ids"], list)
    assert isinstance(single["pixel_values"], list) and single["pixel_values"][0].shape == (3, 224, 224)
    batch = real(text=["a", "An image of"], return_tensors=None)
    assert batch["input_ids"] == [[0, 10], [0, 712, 1648, 9]]


def test_default_equals_a_folder_with_the_real_tokenizer(tmp_path, real):
    folder = Kosmos2Processor.from_pretrained(ft.write_tokenizer_files(tmp_path, "real"))
    a = folder(text=["<grounding> An image of", "x"], images=[IMAGE, IMAGE], padding=True)
    b = real(text=["<grounding> An image of", "x"], images=[IMAGE, IMAGE], padding=True)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_save_pretrained_round_trip(tmp_path, synthetic):
    synthetic.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert json.loads((tmp_path / "preprocessor_config.json").read_text()) == ft.PREPROCESSOR_CONFIG
    again = Kosmos2Processor.from_pretrained(tmp_path)
    a = again(text=["<grounding> an image of", "a"], images=[IMAGE, IMAGE])
    b = synthetic(text=["<grounding> an image of", "a"], images=[IMAGE, IMAGE])
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_decode_and_post_processing(real):
    ids = real(text="<grounding> An image of", images=IMAGE)["input_ids"]
    generated = np.concatenate([ids, [[64007, 10, 43867, 64008, 64009, 64057, 64876, 64010, 2]]], axis=1)
    text = real.batch_decode(generated, skip_special_tokens=True)[0]
    assert text.endswith(
        "</image><grounding> An image of<phrase> a snowman</phrase>"
        "<object><patch_index_0044><patch_index_0863></object>"
    )
    assert real.post_process_generation(text) == (
        "An image of a snowman",
        [("a snowman", (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)])],
    )
    assert real.post_process_image_text_to_text(generated) == [text.split("</image>")[-1]]
    assert real.entities_to_pixel_boxes(real.post_process_generation(text)[1], (64, 32))[0].pixel_boxes == [
        (25, 1, 63, 26)
    ]


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "pass text, images or both; got neither"),
        (dict(text="a", return_tensors="pt"), "return_tensors must be 'np' or None, got 'pt'"),
        (dict(text=["a", 5]), r"text\[1\] must be a str, got int"),
        (dict(text=[]), "text must be a str or a non-empty list of str"),
        (dict(text=["a", "b"], images=[IMAGE]), "got 2 texts and 1 images"),
        (dict(text="a", images=IMAGE, num_image_tokens=0), "num_image_tokens must be a positive int, got 0"),
        (
            dict(text="a", images=IMAGE, first_image_token_id=65000),
            r"first_image_token_id must be an int with first_image_token_id \+ num_image_tokens <= 65037",
        ),
        (dict(text="a", add_eos_token="yes"), "add_eos_token must be True or False, got 'yes'"),
        (dict(text="<phrase>a</phrase>", bboxes=[(1, 2), (3, 4)]), "bboxes has 2 entries but the text has 1"),
        (dict(text="<phrase>a</phrase>", bboxes=[[(1, 2), None]]), "must not contain None"),
        (dict(text="<phrase>a</phrase>", bboxes=[(0.5, 0.1, 0.2, 0.9)]), "x2 > x1 and y2 > y1"),
        (dict(text="<phrase>a</phrase>", bboxes=[(0.5, 0.1, 1.2, 0.9)]), r"normalised to \[0, 1\]"),
        (
            dict(text="<phrase>a</phrase>", bboxes=[(2000, 3)]),
            r"patch indices must lie in \[0, 1023\], got \(2000, 3\)",
        ),
        (
            dict(text="<phrase> a dog</phrase>", images=IMAGE, bboxes=[(1000, 5)]),
            r"bboxes\[0\]: \(1000, 5\) is not \(upper_left, lower_right\) patch indices: cell 5 \(row 0, column 5\) "
            r"lies above or left of cell 1000 \(row 31, column 8\)",
        ),
        (dict(text=["<phrase>a</phrase>"], bboxes=[[[(1, 2), (40, 33)]]]), r"bboxes\[0\]\[0\]\[1\]: \(40, 33\) is not"),
        (dict(text=["<phrase>a</phrase>"], bboxes=(1, 2)), "bboxes must be None or a list with one entry per text"),
        (dict(text=["<phrase>a</phrase>"], bboxes=[[(1, 2)], None]), "bboxes has 2 entries but text has 1"),
        (dict(text=["<phrase>a</phrase>"], bboxes=[[(1, 2), (3, 4)]]), "bboxes has 2 entries but the text has 1"),
        (dict(text=["a", "b c d"], padding="nope"), "padding must be True, False, 'longest', 'max_length'"),
        (dict(text=["a", "b c d"]), r"input_ids: the rows have different lengths \[2, 4\]"),
        (dict(text="a", images="/no/such/image.png"), "images: image file not found: '/no/such/image.png'"),
        (dict(text="a", images=np.zeros((2, 2, 7), np.uint8)), r"images: expected an array of shape \(H, W\)"),
        (
            dict(text="a", images=PIL.Image.new("I;16", (4, 4))),
            r"images: the PIL image .* has mode I;16 .* 8-bit image",
        ),
        (
            dict(text="a", images=IMAGE, max_length=20),
            "max_length=20 truncates the image tokens: a prompt with an image needs at least 67",
        ),
    ],
)
def test_call_errors(real, kwargs, message):
    with pytest.raises(ValueError, match=message):
        real(**kwargs)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rescale_factor": "abc"}, r"rescale_factor must be a finite number > 0, got 'abc'"),
        ({"image_std": [0, 0, 0]}, r"image_std must hold finite numbers > 0, got \[0, 0, 0\]"),
        ({"crop_size": {"height": 0, "width": 0}}, r"crop_size.height must be a positive int, got 0"),
        ({"do_resize": "false"}, r"do_resize must be true or false \(a JSON boolean\), got 'false'"),
        ({"use_square_size": False, "size": {"shortest_edge": -5}}, r"size.shortest_edge must be a positive int"),
    ],
)
def test_bad_preprocessor_config_names_the_file_and_key(tmp_path, change, message):
    folder = ft.write_tokenizer_files(tmp_path, "synthetic")
    (folder / "preprocessor_config.json").write_text(json.dumps({**ft.PREPROCESSOR_CONFIG, **change}))
    path = re.escape(repr(str(folder / "preprocessor_config.json")))
    with pytest.raises(ValueError, match=rf"{path}: {message}"):
        Kosmos2Processor.from_pretrained(folder)


def test_bad_image_processor_entry_names_processor_config(tmp_path):
    folder = ft.write_tokenizer_files(tmp_path, "synthetic")
    (folder / "preprocessor_config.json").unlink()
    config = {"image_processor": {**ft.PREPROCESSOR_CONFIG, "image_mean": "abc"}}
    (folder / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"processor_config.json' \(its 'image_processor' entry\): image_mean must be"):
        Kosmos2Processor.from_pretrained(folder)


def test_entities_to_pixel_boxes_names_a_bad_entity(real):
    with pytest.raises(
        ValueError,
        match=r"entities\[0\] \('a'\): box 0 must be \(x1, y1, x2, y2\), four finite "
        r"numbers, got \(0.1, 0.2\)",
    ):
        real.entities_to_pixel_boxes([("a", (0, 1), [(0.1, 0.2)])], (10, 10))


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="processor folder not found"):
        Kosmos2Processor.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="no image processor settings in .*expected preprocessor_config.json"):
        Kosmos2Processor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizer must be a Kosmos2Tokenizer, got str"):
        Kosmos2Processor("tokenizer")


def test_package_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = (
        "import sys, kosmos2_ref.processing as p; proc = p.Kosmos2Processor.default(); "
        "proc(text='a', images=__import__('numpy').zeros((4, 4, 3), 'uint8')); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_from_pretrained_takes_a_hub_id_found_in_the_cache(tiny_checkpoint, tmp_path, monkeypatch):
    """As Kosmos2.from_pretrained does: a Hub id resolves to its snapshot in the Hugging Face cache (offline here);
    a missing one says it is neither a local folder nor cached."""
    import shutil

    folder, _ = tiny_checkpoint
    repo = "microsoft/kosmos-2-patch14-224"
    cache = tmp_path / "hf"
    snap = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / ("c" * 40)
    shutil.copytree(folder, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_hub = Kosmos2Processor.from_pretrained(repo)
    local = Kosmos2Processor.from_pretrained(folder)
    text = "<grounding> An image of"
    assert from_hub(text=text)["input_ids"].tolist() == local(text=text)["input_ids"].tolist()
    with pytest.raises(ValueError, match="neither a local folder nor in the Hugging Face cache"):
        Kosmos2Processor.from_pretrained("someone/not-cached")
