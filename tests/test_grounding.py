"""Boxes ↔ patch-index tokens and post-processing (kosmos2_ref.processing.grounding).
docs/numerics.md §10.3, §11.

Parity with transformers on the same functions lives in tests/parity/test_processor_parity.py; here the worked
examples of docs/numerics.md §10.3 and §11.4, properties (hypothesis) and every error message.
"""

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kosmos2_ref.processing import grounding
from kosmos2_ref.processing.grounding import (
    Entity,
    box_to_patch_indices,
    box_to_pixels,
    check_bboxes_for_single_text,
    entities_to_pixel_boxes,
    insert_patch_index_tokens,
    patch_indices_to_box,
    post_process_generation,
)

CELL = 1.0 / 32


# ----------------------------------------------------------------------------------- docs/numerics.md examples
def test_spec_box_to_indices_example():
    # docs/numerics.md §10.3: (0.390625, 0.046875, 0.984375, 0.828125) -> (44, 863)
    assert box_to_patch_indices((0.390625, 0.046875, 0.984375, 0.828125)) == (44, 863)


def test_spec_indices_to_box_example():
    # docs/numerics.md §11.4: (44, 863) -> cell centres (12/32+1/64, 1/32+1/64, 31/32+1/64, 26/32+1/64)
    assert patch_indices_to_box(44, 863) == (0.390625, 0.046875, 0.984375, 0.828125)


def test_indices_to_box_uses_cell_edges_for_a_row_a_column_or_a_cell():
    assert patch_indices_to_box(5, 5) == (5 * CELL, 0.0, 6 * CELL, CELL)  # one cell
    assert patch_indices_to_box(10, 42) == (10 * CELL, 0.0, 11 * CELL, 2 * CELL)  # one column
    assert patch_indices_to_box(33, 63) == (CELL, CELL, 1.0, 2 * CELL)  # one row


def test_docstring_example_of_transformers():
    text = (
        "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>"
        " warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
    )
    caption, entities = post_process_generation(text)
    assert caption == "An image of a snowman warming himself by a fire."
    assert entities == [
        ("a snowman", (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)]),
        ("a fire", (41, 47), [(0.171875, 0.015625, 0.484375, 0.890625)]),
    ]


def test_post_process_splits_on_last_end_of_image_and_keeps_tags_without_cleanup():
    text = "<image>x</image>junk</image><grounding> An image of<phrase> a dog</phrase>"
    assert post_process_generation(text, cleanup_and_extract=False) == "<grounding> An image of<phrase> a dog</phrase>"


def test_tiny_boxes_keep_the_lower_right_cell_in_the_grid():
    # ceil(x2·32 − 1) rounds to −1 for x2 < ~1e-17 in float64; the lower-right cell is kept at the upper-left's.
    assert box_to_patch_indices((0.0, 0.0, 1e-20, 1e-20)) == (0, 0)
    assert box_to_patch_indices((0.0, 0.5, 1e-20, 0.75)) == (16 * 32, 23 * 32)


def test_insert_tokens_single_multi_none_and_empty():
    text = "<phrase>a</phrase> and <phrase>b</phrase> or <phrase>c</phrase> with <phrase>d</phrase>!"
    boxes = [(44, 863), [(1, 2), (0.0, 0.0, 1.0, 1.0)], None, []]
    assert insert_patch_index_tokens(text, boxes) == (
        "<phrase>a</phrase><object> <patch_index_0044> <patch_index_0863> </object> and "
        "<phrase>b</phrase><object> <patch_index_0001> <patch_index_0002> </delimiter_of_multi_objects/> "
        "<patch_index_0000> <patch_index_1023> </object> or <phrase>c</phrase> with <phrase>d</phrase>!"
    )


def test_entities_to_pixel_boxes():
    entities = [("a dog", (0, 5), [(0.5, 0.25, 1.0, 0.75)]), ("no box", (6, 12), [])]
    assert entities_to_pixel_boxes(entities, (200, 100)) == [
        Entity("a dog", (0, 5), [(0.5, 0.25, 1.0, 0.75)], [(100, 25, 200, 75)]),
        Entity("no box", (6, 12), [], []),
    ]
    assert entities_to_pixel_boxes(entities, (200, 100))[0].to_dict() == {
        "phrase": "a dog",
        "span": [0, 5],
        "boxes": [[0.5, 0.25, 1.0, 0.75]],
        "pixel_boxes": [[100, 25, 200, 75]],
        "confidence": None,
    }


@pytest.mark.parametrize(
    "box, size, pixels",
    [
        ((0.1, 0.2, 0.5, 0.75), (1200, 602), (120, 120, 600, 451)),  # int(coordinate · side): truncated
        ((0.0, 0.0, 1.0, 1.0), (100, 50), (0, 0, 100, 50)),  # the whole image: its pixel edges
        ((0.999, 0.999, 1.0, 1.0), (100, 50), (99, 49, 100, 50)),  # the last pixel
        ((0.390625, 0.046875, 0.984375, 0.828125), (1024, 1024), (400, 48, 1008, 848)),
        ((1 / 3, 1 / 3, 2 / 3, 2 / 3), (3, 3), (1, 1, 2, 2)),
        ((-1e-12, 0.0, 1 + 1e-12, 1.0), (640, 480), (0, 0, 640, 480)),  # a hair outside [0, 1]: clamped to the image
        ((-0.5, -2, 3.0, 1.5), (10, 20), (0, 0, 10, 20)),
        ([0, 0, 1, 1], (7, 5), (0, 0, 7, 5)),  # ints and lists too
        ((np.float32(0.5), 0.5, 1.0, 1.0), (2, 2), (1, 1, 2, 2)),
        ((0.5, 0.5, 0.5, 0.5), (1, 1), (0, 0, 0, 0)),  # an empty box stays empty
    ],
)
def test_box_to_pixels_is_the_one_rule(box, size, pixels):
    assert box_to_pixels(box, size) == pixels
    assert all(type(v) is int for v in box_to_pixels(box, size))


@pytest.mark.parametrize(
    "box, size, message",
    [
        ((0.1, 0.2, 0.3), (10, 10), r"box must be \(x1, y1, x2, y2\), four finite numbers .* got \(0.1, 0.2, 0.3\)"),
        ((0.1, 0.2, 0.3, float("nan")), (10, 10), r"box must be .* four finite numbers"),
        ((0.1, 0.2, 0.3, float("inf")), (10, 10), r"four finite numbers"),
        ((0.1, None, 0.3, 0.4), (10, 10), r"four finite numbers"),
        ((True, 0.2, 0.3, 0.4), (10, 10), r"four finite numbers"),
        ("0.1,0.2,0.3,0.4", (10, 10), r"four finite numbers"),
        ((0.1, 0.2, 0.3, 0.4), (0, 10), r"image_size must be \(width, height\) as positive ints, got \(0, 10\)"),
        ((0.1, 0.2, 0.3, 0.4), (10.0, 10), r"image_size must be"),
        ((0.1, 0.2, 0.3, 0.4), (10,), r"image_size must be"),
    ],
)
def test_box_to_pixels_errors(box, size, message):
    with pytest.raises(ValueError, match=message):
        box_to_pixels(box, size)


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "box, message",
    [
        ((0.5, 0.1, 0.5, 0.9), "x2 > x1 and y2 > y1"),
        ((0.1, 0.6, 0.9, 0.2), "x2 > x1 and y2 > y1"),
        ((-0.1, 0.1, 0.5, 0.9), r"normalised to \[0, 1\]"),
        ((0.1, 0.1, 1.5, 0.9), r"normalised to \[0, 1\]"),
        ((0.1, 0.2, 0.3), r"must be \(x1, y1, x2, y2\)"),
    ],
)
def test_box_to_indices_errors(box, message):
    with pytest.raises(ValueError, match=message):
        box_to_patch_indices(box)


@pytest.mark.parametrize(
    "bboxes, message",
    [
        ((1, 2), r"bboxes must be None or a list .* got tuple"),
        ([[(1, 2), None]], r"bboxes\[0\]: the list of boxes for one phrase must not contain None"),
        ([(1024, 5)], r"bboxes\[0\]: patch indices must lie in \[0, 1023\], got \(1024, 5\)"),
        ([(-1, 5)], r"patch indices must lie in \[0, 1023\]"),
        # the lower-right cell above (row) or left of (column) the upper-left one
        (
            [(1000, 5)],
            r"bboxes\[0\]: \(1000, 5\) is not \(upper_left, lower_right\) patch indices: cell 5 \(row 0, "
            r"column 5\) lies above or left of cell 1000 \(row 31, column 8\) on the 32 × 32 grid",
        ),
        ([(37, 36)], r"cell 36 \(row 1, column 4\) lies above or left of cell 37 \(row 1, column 5\)"),
        ([(64, 31)], r"cell 31 \(row 0, column 31\) lies above or left of cell 64 \(row 2, column 0\)"),
        ([None, [(0, 1023), (31, 32)]], r"bboxes\[1\]\[1\]: \(31, 32\) is not \(upper_left, lower_right\)"),
        ([(0.5, 0.5, 0.4, 0.9)], r"bboxes\[0\]: a box must have x2 > x1 and y2 > y1"),
        ([(0.1, 0.1, 1.2, 0.9)], r"bboxes\[0\]: box coordinates must be normalised to \[0, 1\]"),
        ([(0, 0, 1, 1)], r"bboxes\[0\]: each box must be a tuple of 2 ints .* or of 4 floats"),
        ([[0.1, 0.2, 0.3, 0.4]], r"bboxes\[0\]\[0\]: each box must be a tuple"),
        ([(1.0, 2.0)], r"each box must be a tuple of 2 ints"),
        ([("a", "b")], r"each box must be a tuple of 2 ints"),
        ([(True, False)], r"each box must be a tuple of 2 ints"),
    ],
)
def test_check_bboxes_errors(bboxes, message):
    with pytest.raises(ValueError, match=message):
        check_bboxes_for_single_text(bboxes)


def test_check_bboxes_accepts_ordered_patch_indices():
    # one cell, one row, one column, the whole grid: the lower-right cell is never above or left of the upper-left
    check_bboxes_for_single_text([(5, 5), [(32, 63), (10, 42)], (0, 1023), (44, 863)])


@pytest.mark.parametrize(
    "entities, message",
    [
        (
            [("a", (0, 1), [(0.1, 0.2)])],
            r"entities\[0\] \('a'\): box 0 must be \(x1, y1, x2, y2\), four finite "
            r"numbers, got \(0.1, 0.2\)",
        ),
        ([("a", (0, 1), []), ("b", (2, 3), [(0, 0, 1, 1), (0.1, None, 0.3, 0.4)])], r"entities\[1\] \('b'\): box 1"),
        ([("a", (0, 1), [(0.1, 0.2, 0.3, float("nan"))])], r"entities\[0\] \('a'\): box 0 must be .* got \(0.1"),
        ([("a", (0, 1))], r"entities\[0\] must be \(name, \(start, end\), \[\(x1, y1, x2, y2\), ...\]\)"),
        (["a dog"], r"entities\[0\] must be \(name, \(start, end\)"),
    ],
)
def test_entities_to_pixel_boxes_names_a_bad_entity(entities, message):
    with pytest.raises(ValueError, match=message):
        entities_to_pixel_boxes(entities, (10, 10))


def test_insert_count_mismatch_names_both_counts():
    with pytest.raises(ValueError, match=r"bboxes has 2 entries but the text has 1 <phrase>…</phrase> pairs"):
        insert_patch_index_tokens("<phrase>a</phrase> b", [(1, 2), (3, 4)])


def test_entities_to_pixel_boxes_error():
    with pytest.raises(ValueError, match=r"image_size must be \(width, height\)"):
        entities_to_pixel_boxes([], (0, 10))


def test_post_process_rejects_non_strings():
    with pytest.raises(ValueError, match="text must be a str, got list"):
        post_process_generation(["a"])


# -------------------------------------------------------------------------------------------------- properties
coords = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def boxes(draw):
    x1, x2 = sorted(draw(st.lists(coords, min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(draw(st.lists(coords, min_size=2, max_size=2, unique=True)))
    return x1, y1, x2, y2


@settings(max_examples=300, deadline=None)
@given(boxes())
def test_box_tokens_box_round_trip_stays_within_one_cell(box):
    upper_left, lower_right = box_to_patch_indices(box)
    assert 0 <= upper_left <= lower_right <= 1023
    x1, y1, x2, y2 = patch_indices_to_box(upper_left, lower_right)
    for original, decoded in zip(box, (x1, y1, x2, y2)):
        assert abs(original - decoded) <= CELL + 1e-12
    assert upper_left % 32 <= lower_right % 32 and upper_left // 32 <= lower_right // 32


@settings(max_examples=300, deadline=None)
@given(boxes())
def test_box_through_tokens_text_and_post_processing(box):
    """box → tokens in a prompt → post_process_generation → a box within one cell of the original."""
    text = insert_patch_index_tokens("<grounding><phrase> a dog</phrase> runs", [box])
    text = text.replace(" <patch", "<patch").replace(" </", "</")  # as lstrip tokenisation would glue them
    caption, entities = post_process_generation(text)
    assert caption == "a dog runs"
    ((name, span, (decoded,)),) = entities
    assert name == "a dog" and caption[span[0] : span[1]] == name
    assert all(abs(a - b) <= CELL + 1e-12 for a, b in zip(box, decoded))


FRAGMENTS = [
    "<phrase>", "</phrase>", "<object>", "</object>", "</delimiter_of_multi_objects/>", "<grounding>", "<image>",
    "</image>", "<patch_index_0005>", "<patch_index_1023>", "<patch_index_0044>", "<patch_index_12>",
    "<patch_index_99999>", "<", ">", " ", "  ", "\n", "\t", "a", " dog", "x", "é", "日本", "😀", "٣", "<p", "</",
    "<phrase> a cat</phrase><object><patch_index_0001><patch_index_0100></object>",
]  # fmt: skip
fragment_text = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=25).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=80), fragment_text))
def test_post_processing_never_raises_and_spans_index_the_caption(text):
    raw = post_process_generation(text, cleanup_and_extract=False)
    assert raw == text.split("</image>")[-1]
    caption, entities = post_process_generation(text)
    assert isinstance(caption, str) and "<phrase>" not in caption
    for name, (start, end), box_list in entities:
        assert isinstance(box_list, list) and len(box_list) >= 1
        if name.startswith("<patch_index_"):  # an entity without a phrase: an empty span
            assert start == end
        elif name:  # a phrase with something besides whitespace (see the note on whitespace-only phrases)
            assert caption[start:end] == name


def test_whitespace_only_phrase_gives_an_empty_name_as_transformers_does():
    # A phrase of only spaces strips to "" and its span may not index the caption (transformers' arithmetic,
    # kept for parity; checked against transformers in tests/parity).
    caption, entities = post_process_generation(
        "<phrase> </phrase><object><patch_index_0001><patch_index_0002></object> b"
    )
    assert caption == "b"
    assert entities[0][0] == ""


def test_tag_regex_does_not_cross_newlines():
    # "<a\nb>" is not a tag (Python's "." stops at a newline), so it stays in the caption.
    assert post_process_generation("<a\nb> c")[0] == "<a\nb> c"
    assert grounding.strip_tags("x<y>z") == "xz"
    assert re.fullmatch(r".*", post_process_generation("")[0])


def test_post_process_generation_needs_a_boolean_switch():
    from kosmos2_ref.processing.grounding import post_process_generation

    with pytest.raises(ValueError, match="cleanup_and_extract must be True or False, got 'false'"):
        post_process_generation("</image> a cat", cleanup_and_extract="false")
    assert post_process_generation("</image> a cat", cleanup_and_extract=False) == " a cat"
