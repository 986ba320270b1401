"""One processor and one model shared by several threads give each thread what it would get alone.

Stress tests, bounded by a number of rounds (a few seconds), without timing assertions: every thread's every
result is compared with the result of the same call made alone, before the threads start.
"""

import threading

import numpy as np
import PIL.Image
import pytest

from kosmos2_ref import Kosmos2, generate
from kosmos2_ref.processing import Kosmos2Processor

ROUNDS = 200
IMAGE = PIL.Image.new("RGB", (30, 20), (120, 30, 200))


def run_in_threads(jobs: list, rounds: int) -> list:
    """Run each job (a function of no arguments) ``rounds`` times in its own thread, all threads started together;
    return, per job, the list of its results (an exception is kept as the result)."""
    results = [[] for _ in jobs]
    start = threading.Barrier(len(jobs))

    def worker(i):
        start.wait()
        for _ in range(rounds):
            try:
                results[i].append(jobs[i]())
            except Exception as exc:  # kept, and reported by the comparison below
                results[i].append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def as_lists(encoding: dict) -> dict:
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in encoding.items() if k != "pixel_values"}


def test_one_processor_shared_by_threads_keeps_each_call_its_settings():
    processor = Kosmos2Processor.default()
    long_texts = ["a snowman warming himself by a fire in the snow", "a dog"]
    jobs = [
        # truncation and padding on: ids cut to 6 and padded to the longest row
        lambda: as_lists(processor(text=long_texts, truncation=True, max_length=6, padding=True)),
        # neither: rows of different lengths, as lists
        lambda: as_lists(processor(text=long_texts, return_tensors=None)),
        # padding to a fixed length, with an image
        lambda: as_lists(processor(text=long_texts, images=[IMAGE, IMAGE], padding="max_length", max_length=90)),
        # a single prompt with an image: no padding, no truncation
        lambda: as_lists(processor(text="<grounding> An image of", images=IMAGE)),
    ]
    alone = [job() for job in jobs]
    results = run_in_threads(jobs, ROUNDS)
    for i, (expected, got) in enumerate(zip(alone, results)):
        wrong = [r for r in got if isinstance(r, Exception) or r != expected]
        assert not wrong, f"job {i}: {len(wrong)} of {ROUNDS} calls differ from the call alone, e.g. {wrong[0]!r}"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    return Kosmos2.from_pretrained(folder)


def _inputs(model, seed: int, T: int = 70):
    rng = np.random.default_rng(seed)
    Q = model.config.latent_query_num
    ids = rng.integers(5, model.config.text_config.vocab_size, size=(1, T))
    img = np.zeros((1, T), np.int64)
    img[0, 2 : 2 + Q] = 1
    pixels = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    return dict(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_model_shared_by_threads_gives_the_results_of_each_call_alone(tiny_checkpoint, dtype):
    folder, _ = tiny_checkpoint
    model = Kosmos2.from_pretrained(folder, dtype=dtype)
    a, b = _inputs(model, 1), _inputs(model, 2, T=75)
    jobs = [
        lambda: model.forward(**a).logits,
        lambda: generate(model, **b, max_new_tokens=6, no_repeat_ngram_size=0),
        lambda: generate(model, **a, max_new_tokens=4, num_beams=2),
        lambda: model.get_image_features(b["pixel_values"]),
    ]
    alone = [job() for job in jobs]
    results = run_in_threads(jobs, 3)
    for i, (expected, got) in enumerate(zip(alone, results)):
        for r in got:
            assert not isinstance(r, Exception), f"job {i} raised {r!r}"
            np.testing.assert_array_equal(r, expected, err_msg=f"job {i}")
