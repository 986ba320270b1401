"""generate's memory follows what a call uses, not what ``max_new_tokens`` allows.

A huge ``max_new_tokens`` with an early EOS returns at once, as in transformers (whose cache grows per token);
buffers start at the positions the model was trained on and double as tokens come. Requests whose buffers cannot
be allocated get a MemoryError saying what was asked for.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tracemalloc

import fixtures_model as fm
import numpy as np
import pytest

from kosmos2_ref import Kosmos2, generate
from kosmos2_ref import generation as gen

MiB = 2**20


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Kosmos2.from_pretrained(tiny_checkpoint[0])


def prompt(seed=0):
    ids, att, img = fm.padded_batch([fm.image_prompt_ids([712, 1648, 9, 10, 43867], 64)], "left")
    pv = np.random.default_rng(seed).standard_normal((1, 3, 224, 224)).astype(np.float32)
    return dict(pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img)


def first_token(model, inputs, **kwargs) -> int:
    return int(generate(model, **inputs, max_new_tokens=1, **kwargs)[0, -1])


def test_a_huge_max_new_tokens_with_an_early_eos_allocates_what_is_used(model):
    inputs = prompt()
    T = inputs["input_ids"].shape[1]
    eos = first_token(model, inputs)
    tracemalloc.start()  # NumPy reports its array buffers to tracemalloc
    try:
        out = generate(model, **inputs, max_new_tokens=10**6, eos_token_id=eos)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"peak {peak / MiB:.1f} MiB for a {T}-token prompt and one new token")
    assert out.shape == (1, T + 1) and out[0, -1] == eos
    # buffers for 10**6 tokens would be 2 × 8 MB of ids and mask and 512 MB of KV cache
    assert peak < 64 * MiB


def test_buffers_start_at_the_trained_positions_and_double(model):
    trained = model.config.text_config.max_position_embeddings  # 64 in the tiny config
    assert gen.initial_length(model, 10, 30) == 30  # fits: the whole generation
    assert gen.initial_length(model, 10, 10**9) == trained  # the trained positions
    assert gen.initial_length(model, 70, 10**9) == 71  # a longer prompt: prompt + 1
    a = np.arange(6).reshape(2, 3)
    assert gen.with_room(a, 3, -1) is a
    grown = gen.with_room(a, 4, -1)
    assert grown.tolist() == [[0, 1, 2, -1, -1, -1], [3, 4, 5, -1, -1, -1]]
    assert gen.with_room(a, 9, 0).shape == (2, 9)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_growing_buffers_give_the_ids_and_scores_of_one_forward_each_step(model, num_beams):
    # The tiny model was trained on 64 positions and the prompt has more, so its buffers start at prompt + 1 and
    # double three times in 20 tokens; an uncached forward on the result gives the same greedy tokens.
    inputs = prompt(seed=3)
    T = inputs["input_ids"].shape[1]
    assert gen.initial_length(model, T, T + 20) == T + 1
    out = generate(
        model,
        **inputs,
        max_new_tokens=20,
        num_beams=num_beams,
        no_repeat_ngram_size=0,
        eos_token_id=[],
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert out.sequences.shape == (1, T + 20)
    if num_beams == 1:
        seq = out.sequences
        full = model.forward(
            pixel_values=inputs["pixel_values"],
            input_ids=seq,
            image_embeds_position_mask=np.pad(inputs["image_embeds_position_mask"], ((0, 0), (0, 20))),
        )
        np.testing.assert_array_equal(full.logits[0, T - 1 : -1].argmax(-1), seq[0, T:])
        steps = np.stack([s[0] for s in out.scores])  # [20, V]
        err = float(np.abs(steps - full.logits[0, T - 1 : -1]).max())
        print(f"cached vs uncached logits over 20 steps: max |Δ| {err:.1e}")
        assert err <= 1e-5 * max(1.0, float(np.abs(steps).max()))


CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import fixtures_model as fm
    from kosmos2_ref import Kosmos2, generate

    model = Kosmos2.from_pretrained({folder!r})
    ids, att, img = fm.padded_batch([fm.image_prompt_ids([712, 1648, 9, 10, 43867], 64)], "left")
    pv = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    inputs = dict(pixel_values=pv, input_ids=ids, attention_mask=att, image_embeds_position_mask=img)
    eos = int(generate(model, **inputs, max_new_tokens=1)[0, -1])
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    result = {{}}
    out = generate(model, **inputs, max_new_tokens=10 ** 9, eos_token_id=eos)
    result["greedy"] = out.shape[1] - ids.shape[1]
    try:
        generate(model, **inputs, max_new_tokens=8, num_beams=300000)
        result["beams"] = "no error"
    except MemoryError as exc:
        result["beams"] = str(exc)
    print(json.dumps(result))
""")


def test_max_new_tokens_1e9_under_a_memory_limit(tiny_checkpoint):
    # In a child process whose address space is limited to 6 GiB (a 10**9-token buffer is 8 GB of ids alone).
    import pathlib

    here = pathlib.Path(__file__).parent
    limit = 6 * 2**30
    code = CHILD.format(tests=str(here), folder=str(tiny_checkpoint[0]), limit=limit)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["greedy"] == 1  # the EOS came first
    assert result["beams"].startswith(
        "generate ran out of memory: 1 prompt(s) × 300000 beam(s) = 300000 rows with room for"
    )
