"""The CuPy backend against transformers (and against our NumPy backend). Runs only where CuPy and a GPU are;
elsewhere each test is collected and skipped with the reason shown. The whole parity suite also runs on CuPy
with ``KOSMOS2_BACKEND=cupy pytest tests/parity``; ``benchmarks/gpu_check.sh`` runs all of it on a GPU machine.

Tolerances: 1e-5 × the reference's scale on the tiny configs, 2e-5 at full size (24 layers of float32 sums in
another order); the measured errors are printed (``pytest -s``). transformers runs on CUDA at full size when torch
sees a GPU (TF32 off, so both sides multiply in true float32), else on the CPU.
"""

from __future__ import annotations

import fixtures_model as fm
import numpy as np
import pytest
import torch

from kosmos2_ref import Kosmos2, generate, to_numpy
from kosmos2_ref.backend import cupy_available

HAS_CUPY, WHY = cupy_available()
pytestmark = pytest.mark.skipif(not HAS_CUPY, reason=f"no GPU for the CuPy backend here: {WHY}")
TOL = 1e-5
FULL_TOL = 2e-5
GREEDY = dict(do_sample=False, num_beams=1, no_repeat_ngram_size=0)


def _inputs():
    rows = [fm.image_prompt_ids([712, 1648, 9, 10], 64), fm.image_prompt_ids([64012, 712], 64)]
    ids, att, img = fm.padded_batch(rows, "left")
    pv = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    return pv, ids, att, img


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
def test_cupy_forward_matches_numpy_and_transformers(tiny_checkpoint, storage):
    import cupy

    folder, hf = tiny_checkpoint
    gpu = Kosmos2.from_pretrained(folder, backend="cupy", dtype=storage)
    cpu = Kosmos2.from_pretrained(folder, backend="numpy", dtype=storage)
    pv, ids, att, img = _inputs()
    kw = dict(input_ids=ids, attention_mask=att, image_embeds_position_mask=img)
    out = gpu(pixel_values=pv, **kw)
    assert isinstance(out.logits, cupy.ndarray)
    print()
    fm.check(f"cupy vs numpy logits ({storage})", to_numpy(out.logits), cpu(pixel_values=pv, **kw).logits, TOL)
    if storage == "float32":
        with torch.no_grad():
            ref = hf(pixel_values=torch.from_numpy(pv), **{k: torch.from_numpy(v) for k, v in kw.items()})
        real = att.astype(bool)
        fm.check("cupy vs transformers logits", to_numpy(out.logits)[real], ref.logits.numpy()[real], TOL)


# --------------------------------------------------------------------------------------------------------------
# The KV cache and generation on the device


def test_decode_step_keeps_the_cache_on_the_device(tiny_checkpoint):
    """Prefill and cached steps on CuPy: every key and value buffer is a CuPy array before and after, the step's
    logits are too, and they equal the NumPy backend's step for step."""
    import cupy

    folder, _ = tiny_checkpoint
    pv, ids, att, img = _inputs()
    models = {b: Kosmos2.from_pretrained(folder, backend=b) for b in ("cupy", "numpy")}
    logits = {}
    for name, m in models.items():
        emb = m.get_image_features(pv)
        cache = m.new_cache(2, ids.shape[1] + 4)
        steps = [m.decode_step(ids, cache, attention_mask=att, image_embeds=emb, image_embeds_position_mask=img)]
        for i, tok in enumerate((5950, 597, 32)):
            a = np.concatenate([att, np.ones((2, i + 1), np.int64)], axis=1)
            pos = np.full((2, 1), 0, np.int64) + (att.sum(axis=1, keepdims=True) + 2 + i)
            steps.append(m.decode_step(np.full((2, 1), tok, np.int64), cache, attention_mask=a, position_ids=pos))
        if name == "cupy":
            assert all(isinstance(s, cupy.ndarray) for s in steps)
            assert all(isinstance(b, cupy.ndarray) for b in cache.keys + cache.values)
        assert cache.length == ids.shape[1] + 3
        logits[name] = [to_numpy(s) for s in steps]
    print()
    for i, (a, b) in enumerate(zip(logits["cupy"], logits["numpy"], strict=True)):
        fm.check(f"step {i} logits, cupy vs numpy", a, b, TOL)


def _hf_generate(hf, pv, ids, att, img, device="cpu", **kw):
    to = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    with torch.no_grad():
        out = hf.generate(
            pixel_values=to(pv),
            input_ids=to(ids),
            attention_mask=to(att),
            image_embeds_position_mask=to(img),
            return_dict_in_generate=True,
            output_scores=True,
            **kw,
        )
    return out.sequences.cpu().numpy(), [s.float().cpu().numpy() for s in out.scores]


def _compare_generation(label, ours, ref, tol):
    (seq, scores), (rseq, rscores) = ours, ref
    print(f"\n[{label}] new tokens of row 0: {rseq[0, -len(rscores) :].tolist()}")
    assert seq.shape == rseq.shape and np.array_equal(seq, rseq), (
        f"{label}: sequences differ\n ours {seq[:, -len(scores) :].tolist()}\n ref  {rseq[:, -len(rscores) :].tolist()}"
    )
    a, b = np.stack(scores), np.stack(rscores)
    assert a.shape == b.shape and np.array_equal(np.isneginf(a), np.isneginf(b))
    finite = ~np.isneginf(b)
    return fm.check(f"{label}: scores ({len(a)} steps)", a[finite], b[finite], tol)


def test_greedy_generation_on_the_device_matches_transformers(lively_checkpoint, monkeypatch):
    """Greedy decoding on CuPy, token for token against transformers (and the NumPy backend): three prompts of
    equal length with their own images, 30 new tokens, the EOS and pad-after-EOS paths. The KV cache stays on the
    device for the whole call (checked at every step) and the host sees only the chosen ids and the scores."""
    import cupy

    folder, hf = lively_checkpoint
    gpu = Kosmos2.from_pretrained(folder, backend="cupy")
    rows = [[712, 1648, 9, 10, 43867], [64012, 712, 1648, 9, 4464], [5950, 597, 32, 646, 17772]]
    ids, att, img = fm.padded_batch([fm.image_prompt_ids(t, 64) for t in rows], "left")
    pv = np.random.default_rng(1).standard_normal((3, 3, 224, 224)).astype(np.float32)
    seen = []
    step = gpu.decode_step

    def watched(input_ids, cache, **kw):
        logits = step(input_ids, cache, **kw)
        seen.append((type(cache.keys[0]), type(cache.values[-1]), type(logits)))
        return logits

    monkeypatch.setattr(gpu, "decode_step", watched)
    kw = dict(max_new_tokens=30, **GREEDY)
    out = fm.generate_with_scores(gpu, pv, ids, att, img, **kw)
    assert seen and all(t == (cupy.ndarray,) * 3 for t in seen), set(seen)
    assert type(out.sequences) is np.ndarray and out.sequences.dtype == np.int64
    ours = (out.sequences, list(out.scores))
    _compare_generation("greedy on cupy vs transformers", ours, _hf_generate(hf, pv, ids, att, img, **kw), TOL)
    cpu = Kosmos2.from_pretrained(folder, backend="numpy")
    ref = fm.generate_with_scores(cpu, pv, ids, att, img, **kw)
    _compare_generation("greedy on cupy vs numpy", ours, (ref.sequences, list(ref.scores)), TOL)


# --------------------------------------------------------------------------------------------------------------
# Full size (1.66 B parameters, random weights): tests/conftest.py's full_checkpoint


@pytest.fixture
def hf_on_gpu(full_checkpoint):
    """(folder, transformers' full-size model on CUDA when torch sees a GPU, else on the CPU, device name).
    TF32 is switched off for the test (torch's convolutions use it by default; CuPy never does), and the model
    goes back to the CPU afterwards: the session's other full-size tests use it there."""
    folder, hf = full_checkpoint
    device = "cuda" if torch.cuda.is_available() else "cpu"
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    hf.to(device)
    try:
        yield folder, hf, device
    finally:
        hf.to("cpu")
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        if device == "cuda":
            torch.cuda.empty_cache()


@pytest.mark.slow
def test_full_size_cupy_logits_match_transformers(hf_on_gpu):
    """The released architecture on CuPy: image embeddings and the logits of a left-padded batch of two against
    transformers on the same inputs (on the GPU where there is one), and the same greedy tokens for 8 steps on an
    unpadded prompt (where transformers 5.x's positions agree with ours)."""
    import cupy

    folder, hf, device = hf_on_gpu
    ours = Kosmos2.from_pretrained(folder, backend="cupy")
    texts = [[64012, 712, 1648, 9], [64012, 1264, 17772, 1357, 12, 10, 770, 9, 4464, 4]]
    ids, att, img = fm.padded_batch([fm.image_prompt_ids(t, 64) for t in texts], "left")
    pv = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    to = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    with torch.no_grad():
        ref = hf(pixel_values=to(pv), input_ids=to(ids), attention_mask=to(att), image_embeds_position_mask=to(img))
    out = ours(pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img)
    assert isinstance(out.logits, cupy.ndarray)
    print(f"\n[full size on cupy, batch 2 left-padded; transformers on {device}]")
    fm.check("image_embeds", out.image_embeds, ref.image_embeds, FULL_TOL)
    real = att.astype(bool)
    logits, ref_logits = to_numpy(out.logits)[real], ref.logits.float().cpu().numpy()[real]
    fm.check("logits (real tokens)", logits, ref_logits, FULL_TOL)
    assert np.array_equal(logits.argmax(-1), ref_logits.argmax(-1))
    del out, ref
    one = [a[1:] for a in (ids, att, img)]
    assert one[1].all()  # row 1 has no padding
    kw = dict(max_new_tokens=8, **GREEDY)
    run = generate(
        ours,
        pixel_values=pv[1:],
        input_ids=one[0],
        attention_mask=one[1],
        image_embeds_position_mask=one[2],
        return_dict_in_generate=True,
        output_scores=True,
        **kw,
    )
    expected = _hf_generate(hf, pv[1:], *one, device=device, **kw)
    _compare_generation("full size greedy on cupy, 8 tokens", (run.sequences, list(run.scores)), expected, FULL_TOL)
