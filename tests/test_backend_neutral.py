"""The model code uses no NumPy-only call and no hidden host array on the array path (issue: CuPy backend).

The forward pass (and generation, where present) runs on the strict stand-in namespace of ``strict_xp``, which
raises on any host array or ``np.*`` call that would break — or silently copy — on CuPy. Its results must equal
the NumPy backend's bit for bit, since the arithmetic is NumPy's underneath.
"""

from __future__ import annotations

import fixtures_model as fm
import numpy as np
import pytest
from strict_xp import STRICT, STRICT_BACKEND, TRANSFERS, DeviceArray, HostArrayError

from kosmos2_ref import Kosmos2, fast, generate


def test_strict_namespace_catches_host_arrays_and_numpy_calls():
    d = STRICT.asarray(np.ones(3, np.float32))
    assert isinstance(d, DeviceArray)
    with pytest.raises(HostArrayError, match="host numpy array"):
        d + np.ones(3, np.float32)
    with pytest.raises(HostArrayError, match="NumPy-only call np.concatenate"):
        np.concatenate([d, d])
    assert isinstance(STRICT.concatenate([d, d]), DeviceArray)
    with pytest.raises(HostArrayError, match="implicit device->host"):
        float(d.sum())
    with pytest.raises(HostArrayError, match="implicit device->host"):
        bool(d.any())
    with pytest.raises(HostArrayError, match="implicit device->host"):
        d.tolist()
    before = TRANSFERS.count
    assert type(d.get()) is np.ndarray and TRANSFERS.count == before + 1


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    return Kosmos2.from_pretrained(folder), Kosmos2.from_pretrained(folder, backend=STRICT_BACKEND)


def _inputs():
    rows = [fm.image_prompt_ids([712, 1648, 9, 10], 64), fm.image_prompt_ids([64012, 712], 64)]
    ids, att, img = fm.padded_batch(rows, "left")
    pv = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    return pv, ids, att, img


@pytest.fixture(autouse=True)
def weight_first(monkeypatch):
    """Bit for bit: NumPy takes the many-row products weight first too, as every namespace but NumPy always does
    (on NumPy the form is otherwise measured per shape, fast.product_form, and x first sums in another order),
    and its attention's heads from the split product, as the others do (NumPy's are otherwise views of the
    weight-first product, which OpenBLAS's AVX-512 kernels multiply in another order: fast.head_projection),
    and NumPy's own LayerNorm rather than Numba's compiled one (kosmos2_ref.fused), which sums in float64."""
    monkeypatch.setenv(fast.PRODUCT_FORM_ENV, fast.WEIGHT_FIRST)
    monkeypatch.setattr(fast, "HEADS_AS_VIEWS", False)
    monkeypatch.setenv("KOSMOS2_FUSED", "off")


def test_forward_runs_on_the_strict_namespace(models):
    ref_model, strict = models
    assert isinstance(strict.params["text_model"]["model"]["layers"][0]["ffn"]["fc1"]["weight"], DeviceArray)
    pv, ids, att, img = _inputs()
    kw = dict(
        input_ids=ids,
        attention_mask=att,
        image_embeds_position_mask=img,
        labels=ids,
        output_hidden_states=True,
        output_attentions=True,
    )
    out = strict(pixel_values=pv, **kw)
    ref = ref_model(pixel_values=pv, **kw)
    assert isinstance(out.logits, DeviceArray) and isinstance(out.image_embeds, DeviceArray)
    assert np.array_equal(np.asarray(out.logits), ref.logits)
    assert np.array_equal(np.asarray(out.loss), ref.loss)


def test_cached_step_and_interpolation_on_the_strict_namespace(models):
    ref_model, strict = models
    pv, ids, att, img = _inputs()
    outs = []
    for m in (strict, ref_model):
        cache = m.new_cache(2, ids.shape[1] + 2)
        m(pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img, past_key_values=cache)
        step = m(
            input_ids=np.array([[5], [6]]),
            attention_mask=np.concatenate([att, np.ones((2, 1), int)], 1),
            past_key_values=cache,
            logits_to_keep=1,
        )
        emb = m.get_image_features(np.zeros((1, 3, 168, 252), np.float32), interpolate_pos_encoding=True)
        outs.append((np.asarray(step.logits), np.asarray(emb)))
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_two_byte_storage_on_the_strict_namespace(tiny_checkpoint, storage):
    folder, _ = tiny_checkpoint
    strict = Kosmos2.from_pretrained(folder, backend=STRICT_BACKEND, dtype=storage)
    pv, ids, att, img = _inputs()
    out = strict(pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img)
    assert isinstance(out.logits, DeviceArray) and np.isfinite(np.asarray(out.logits)).all()


def test_generate_on_the_strict_namespace(models):
    ref_model, strict = models
    pv, ids, att, img = _inputs()
    kw = dict(
        pixel_values=pv,
        input_ids=ids,
        attention_mask=att,
        image_embeds_position_mask=img,
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        num_beams=1,
        no_repeat_ngram_size=0,
    )
    a = generate(strict, **kw)
    b = generate(ref_model, **kw)
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_one_small_download_per_generated_token(models, mode):
    """On a device, generation brings home only what the host must decide on: each step's chosen ids (beam search:
    its 2·num_beams candidates with their scores), in one explicit download per new token. The forward passes
    download nothing, and no implicit transfer (int/float/bool of a device array) happens anywhere. The tokens
    equal the NumPy backend's."""
    ref_model, strict = models
    pv, ids, att, img = _inputs()
    B, n = ids.shape[0], 6
    kw = {
        "greedy": dict(num_beams=1, do_sample=False),
        "sample": dict(num_beams=1, do_sample=True, top_k=5),
        "beam": dict(num_beams=3, do_sample=False),
    }[mode]
    kw.update(
        pixel_values=pv,
        input_ids=ids,
        attention_mask=att,
        image_embeds_position_mask=img,
        max_new_tokens=n,
        min_new_tokens=n,
        no_repeat_ngram_size=0,
    )
    TRANSFERS.count = TRANSFERS.elements = 0
    out = generate(strict, **kw, **({"seed": 3} if mode == "sample" else {}))
    per_step = {"greedy": B, "sample": B, "beam": 3 * B * 2 * 3}[mode]  # beam: [indices, keys, scores] x B x 2·3
    print(f"\n  {mode}: {TRANSFERS.count} downloads, {TRANSFERS.elements} elements for {n} tokens x {B} rows")
    assert TRANSFERS.count == n and TRANSFERS.elements == n * per_step
    ref = generate(ref_model, **kw, **({"seed": 3} if mode == "sample" else {}))
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_forward_downloads_nothing(models):
    _, strict = models
    pv, ids, att, img = _inputs()
    TRANSFERS.count = 0
    out = strict(
        pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img, output_hidden_states=True
    )
    assert TRANSFERS.count == 0 and isinstance(out.logits, DeviceArray)
