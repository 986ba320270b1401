"""Forward-pass behaviour that is ours alone: float32 everywhere, and bad inputs rejected at the boundary."""
from __future__ import annotations

import numpy as np
import pytest

import fixtures_model as fm
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
    out = model(pixel_values=pv.astype(np.float64), input_ids=ids, image_embeds_position_mask=img,
                labels=ids, output_hidden_states=True, output_attentions=True)
    arrays = {"logits": out.logits, "loss": out.loss, "last_hidden_state": out.last_hidden_state,
              "image_embeds": out.image_embeds, "projection_attentions": out.projection_attentions,
              "vision.last_hidden_state": out.vision_model_output.last_hidden_state,
              "vision.pooler_output": out.vision_model_output.pooler_output}
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


@pytest.mark.parametrize("kwargs, msg", [
    (dict(pixel_values=None), r"specify either pixel_values or image_embeds"),
    (dict(pixel_values=np.zeros((1, 224, 224), np.float32)), r"pixel_values must have shape \[batch, 3, height"),
    (dict(pixel_values=np.zeros((1, 3, 224, 224), np.uint8)), r"pixel_values must be a float array"),
    (dict(pixel_values=np.zeros((1, 3, 10, 10), np.float32)), r"smaller than one 14x14 patch"),
    (dict(input_ids=np.array([1.5, 2.0])), r"input_ids must be a 2-D integer array"),
    (dict(input_ids=np.zeros((1, 0), np.int64)), r"input_ids is empty"),
    (dict(input_ids=np.array([[0, 65037]])), r"input_ids holds ids outside \[0, 65036\] \(min 0, max 65037\)"),
    (dict(attention_mask=np.ones((1, 5), np.int64)), r"attention_mask has shape \(1, 5\), expected \(1, 70\)"),
    (dict(attention_mask=np.full((1, 70), 2)), r"attention_mask must hold only 0 and 1"),
    (dict(image_embeds_position_mask=np.zeros((1, 70), np.int64)),
     r"image_embeds_position_mask marks \[0\] image positions per row, but each row needs exactly 64"),
    (dict(image_embeds_position_mask=None), r"image_embeds_position_mask is required"),
    (dict(labels=np.zeros((1, 3), np.int64)), r"labels has shape \(1, 3\), expected \(1, 70\)"),
    (dict(labels=np.full((1, 70), 70000)), r"labels holds values outside"),
])
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
    assert np.isnan(out.loss)       # the mean over no target, as torch gives
