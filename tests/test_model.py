"""Forward-pass behaviour that is ours alone: float32 everywhere, and bad inputs rejected at the boundary."""

from __future__ import annotations

import fixtures_model as fm
import numpy as np
import pytest

from kosmos2_ref import Kosmos2


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Kosmos2.from_pretrained(tiny_checkpoint[0])


def _inputs(B=1):
    ids, img = fm.image_prompt_ids([712, 1648, 9], 64)
    pv = np.random.default_rng(0).standard_normal((B, 3, 224, 224)).astype(np.float32)
    return pv, np.array([ids] * B), np.array([img] * B)


def test_every_intermediate_is_float32(model):
    pv, ids, img = _inputs(2)
    out = model(
        pixel_values=pv.astype(np.float64),
        input_ids=ids,
        image_embeds_position_mask=img,
        labels=ids,
        output_hidden_states=True,
        output_attentions=True,
    )
    arrays = {
        "logits": out.logits,
        "loss": out.loss,
        "last_hidden_state": out.last_hidden_state,
        "image_embeds": out.image_embeds,
        "projection_attentions": out.projection_attentions,
        "vision.last_hidden_state": out.vision_model_output.last_hidden_state,
        "vision.pooler_output": out.vision_model_output.pooler_output,
    }
    for i, h in enumerate(out.hidden_states):
        arrays[f"hidden_states[{i}]"] = h
    for i, a in enumerate(out.attentions):
        arrays[f"attentions[{i}]"] = a
    for i, h in enumerate(out.vision_model_output.hidden_states):
        arrays[f"vision.hidden_states[{i}]"] = h
    for i, a in enumerate(out.vision_model_output.attentions):
        arrays[f"vision.attentions[{i}]"] = a
    bad = {k: str(v.dtype) for k, v in arrays.items() if v.dtype != np.float32}
    assert bad == {}
    assert len(out.hidden_states) == 3 and len(out.vision_model_output.hidden_states) == 3


def test_image_embeds_shape(model):
    pv, _, _ = _inputs(2)
    emb = model.get_image_features(pv)
    assert emb.shape == (2, 64, 32) and emb.dtype == np.float32


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(pixel_values=None), r"specify either pixel_values or image_embeds"),
        (dict(pixel_values=np.zeros((1, 224, 224), np.float32)), r"pixel_values must have shape \[batch, 3, height"),
        (dict(pixel_values=np.zeros((1, 3, 224, 224), np.uint8)), r"pixel_values must be a float array"),
        (dict(pixel_values=np.zeros((1, 3, 10, 10), np.float32)), r"smaller than one 14x14 patch"),
        (dict(input_ids=np.array([1.5, 2.0])), r"input_ids must be a 2-D integer array"),
        (dict(input_ids=np.zeros((1, 0), np.int64)), r"input_ids is empty"),
        (dict(input_ids=np.array([[0, 65037]])), r"input_ids holds ids outside \[0, 65036\] \(min 0, max 65037\)"),
        (dict(attention_mask=np.ones((1, 5), np.int64)), r"attention_mask has shape \(1, 5\), expected \(1, 70\)"),
        (dict(attention_mask=np.full((1, 70), 2)), r"attention_mask must hold only 0 and 1"),
        (
            dict(image_embeds_position_mask=np.zeros((1, 70), np.int64)),
            r"image_embeds_position_mask marks \[0\] image positions per row, but each row needs exactly 64",
        ),
        (dict(image_embeds_position_mask=None), r"image_embeds_position_mask is required"),
        (dict(labels=np.zeros((1, 3), np.int64)), r"labels has shape \(1, 3\), expected \(1, 70\)"),
        (dict(labels=np.full((1, 70), 70000)), r"labels holds values outside"),
    ],
)
def test_bad_inputs_raise_clear_errors(model, kwargs, msg):
    pv, ids, img = _inputs()
    args = dict(pixel_values=pv, input_ids=ids, image_embeds_position_mask=img)
    args.update(kwargs)
    if "input_ids" in kwargs:
        args["image_embeds_position_mask"] = None
        args["pixel_values"] = pv
    with pytest.raises(ValueError, match=msg):
        model(**args)


def test_bad_image_embeds_shape(model):
    _, ids, img = _inputs()
    with pytest.raises(ValueError, match=r"image_embeds must have shape \[1, 64, 32\], got \(1, 63, 32\)"):
        model(input_ids=ids, image_embeds=np.zeros((1, 63, 32), np.float32), image_embeds_position_mask=img)


def test_loss_ignores_minus_100(model):
    pv, ids, img = _inputs()
    all_ignored = np.full_like(ids, -100)
    out = model(pixel_values=pv, input_ids=ids, image_embeds_position_mask=img, labels=all_ignored)
    assert np.isnan(out.loss)  # the mean over no target, as torch gives


# --------------------------------------------------------------------------------------------------------------
# NaN/inf, nested lists, logits_to_keep: each refused (or converted) at the boundary, naming the input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_image_inputs_are_refused(model, bad):
    """One NaN would make every logit NaN (and generate return token 0 at every step): refused, naming the input."""
    pv, ids, img = _inputs()
    pv_bad = pv.copy()
    pv_bad[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"pixel_values holds 1 non-finite value\(s\) \(NaN or inf\)"):
        model(pixel_values=pv_bad, input_ids=ids, image_embeds_position_mask=img)
    with pytest.raises(ValueError, match=r"pixel_values holds 1 non-finite"):
        model.get_image_features(pv_bad)
    emb = model.get_image_features(pv)
    emb[0, 5, 6] = bad
    with pytest.raises(ValueError, match=r"image_embeds holds 1 non-finite"):
        model(input_ids=ids, image_embeds=emb, image_embeds_position_mask=img)
    emb = model.get_image_features(pv)
    tokens = np.zeros((1, ids.shape[1], 32), np.float32)
    tokens[0, -1, 0] = bad
    with pytest.raises(ValueError, match=r"inputs_embeds holds 1 non-finite"):
        model(inputs_embeds=tokens, image_embeds=emb, image_embeds_position_mask=img)


def test_float64_pixels_beyond_float32_range_are_refused(model):
    pv, ids, img = _inputs()
    pv = pv.astype(np.float64)
    pv[0, 0, 0, 0] = 1e300  # finite in float64, inf once cast to the float32 the model computes in
    with pytest.raises(ValueError, match=r"pixel_values holds 1 non-finite"):
        model.get_image_features(pv)


def test_ragged_lists_name_the_input(model):
    pv, ids, img = _inputs(2)
    with pytest.raises(ValueError, match=r"input_ids must be an integer array .*rows of different lengths"):
        model(pixel_values=pv, input_ids=[[0, 1, 2], [0, 1]])
    with pytest.raises(ValueError, match=r"attention_mask must be an integer array .*rows of different lengths"):
        model(pixel_values=pv, input_ids=ids, image_embeds_position_mask=img, attention_mask=[[1] * 70, [1]])
    with pytest.raises(ValueError, match=r"pixel_values must be an array of shape .*rows of different lengths"):
        model.get_image_features([[[[0.0] * 14] * 14] * 3, [[[0.0]]]])
    with pytest.raises(ValueError, match=r"image_embeds must be an array of shape .*rows of different lengths"):
        model(input_ids=ids, image_embeds=[[[0.0] * 32] * 64, [[0.0]]], image_embeds_position_mask=img)


def test_embeddings_as_nested_lists_are_accepted(model):
    pv, ids, img = _inputs()
    emb = model.get_image_features(pv)
    want = model(input_ids=ids, image_embeds=emb, image_embeds_position_mask=img).logits
    got = model(input_ids=ids, image_embeds=emb.tolist(), image_embeds_position_mask=img).logits
    np.testing.assert_array_equal(got, want)
    tokens = np.random.default_rng(1).standard_normal((1, ids.shape[1], 32)).astype(np.float32)
    want = model(inputs_embeds=tokens, image_embeds=emb, image_embeds_position_mask=img).logits
    got = model(inputs_embeds=tokens.tolist(), image_embeds=emb, image_embeds_position_mask=img).logits
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"image_embeds must be a float array of shape \[batch, 64, 32\], got dtype"):
        model(input_ids=ids, image_embeds=np.zeros((1, 64, 32), np.int64).tolist(), image_embeds_position_mask=img)


@pytest.mark.parametrize(
    "flag", ["interpolate_pos_encoding", "output_hidden_states", "output_attentions", "compute_logits"]
)
def test_switches_must_be_booleans(model, flag):
    """A string like "false" is truthy: refused by name instead of silently switching the option on."""
    pv = np.zeros((1, 3, 224, 224), np.float32)
    ids = np.array([[0, 10, 11]])
    with pytest.raises(ValueError, match=rf"{flag} must be True or False, got 'false'"):
        model(pixel_values=pv, input_ids=ids, image_embeds_position_mask=np.zeros_like(ids), **{flag: "false"})
    if flag != "compute_logits":
        with pytest.raises(ValueError, match=rf"{flag} must be True or False, got 'no'"):
            model.encode_image(pv, **{flag: "no"})


@pytest.mark.parametrize(
    "batch, capacity, name", [(1, -5, "capacity"), (0, 8, "batch"), (1, 2.5, "capacity"), ("2", 8, "batch")]
)
def test_new_cache_needs_positive_sizes(model, batch, capacity, name):
    with pytest.raises(ValueError, match=rf"new_cache: {name} must be a positive integer, got"):
        model.new_cache(batch, capacity)
    assert model.new_cache(2, 3).capacity == 3


@pytest.mark.parametrize("bad", ["1", -1, 1.5, True, None])
def test_logits_to_keep_must_be_a_non_negative_int(model, bad):
    pv, ids, img = _inputs()
    with pytest.raises(ValueError, match=r"logits_to_keep must be an integer >= 0 \(0 keeps every position\)"):
        model(pixel_values=pv, input_ids=ids, image_embeds_position_mask=img, logits_to_keep=bad)


def test_logits_to_keep_zero_keeps_all_and_k_the_last_k(model):
    pv, ids, img = _inputs()
    emb = model.get_image_features(pv)
    full = model(input_ids=ids, image_embeds=emb, image_embeds_position_mask=img, logits_to_keep=0).logits
    last2 = model(input_ids=ids, image_embeds=emb, image_embeds_position_mask=img, logits_to_keep=np.int64(2)).logits
    assert full.shape == (1, ids.shape[1], 65037) and last2.shape == (1, 2, 65037)
    np.testing.assert_allclose(last2, full[:, -2:], rtol=0, atol=1e-5)


def test_a_moved_method_says_where_it_went(model):
    """``model.generate`` moved to ``kosmos2_ref.generate(model, ...)``: the model no longer depends on generation."""
    from kosmos2_ref.model import MOVED

    assert MOVED["generate"] == "kosmos2_ref.generate(model, ...)"
    with pytest.raises(
        AttributeError,
        match=r"^Kosmos2\.generate has moved: use kosmos2_ref\.generate\(model, "
        r"\.\.\.\)$",
    ):
        model.generate(input_ids=[[0]])
    assert not hasattr(model, "generate")
    with pytest.raises(AttributeError, match=r"'Kosmos2' object has no attribute 'no_such_thing'"):
        model.no_such_thing  # noqa: B018 (the attribute lookup is what raises)


def test_decode_step_is_forward_without_the_checks(model):
    """The decoding loop's unchecked step gives the checked forward's last logits, prefill and step alike."""
    pv, ids, img = _inputs(2)
    emb = model.get_image_features(pv)
    a, b = model.new_cache(2, ids.shape[1] + 1), model.new_cache(2, ids.shape[1] + 1)
    want = model(
        input_ids=ids, image_embeds=emb, image_embeds_position_mask=img, past_key_values=a, logits_to_keep=1
    ).logits[:, -1]
    got = model.decode_step(ids, b, image_embeds=emb, image_embeds_position_mask=img)
    np.testing.assert_array_equal(got, want)
    nxt = np.array([[9], [712]])
    want = model(input_ids=nxt, past_key_values=a, logits_to_keep=1).logits[:, -1]
    np.testing.assert_array_equal(model.decode_step(nxt, b), want)
    assert a.length == b.length == ids.shape[1] + 1
