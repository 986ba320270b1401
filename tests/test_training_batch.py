"""The miniature's training batches put the loss where Kosmos-2 puts it: on every token after the prompt, the
closing </s> included, and on no pad.

Kosmos2Processor pads a batch of texts to its longest row whatever ``padding`` says, so a row's length must be
read from its attention mask. The runs up to v5 read ``len(row)`` and lost each row's first target tokens (the
caption's opening ``<phrase>`` among them); this test fails on that code.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import train_mini  # noqa: E402

PROMPT_ENDS = {  # the last prompt token of each job, and the first token the model must write after it
    "caption": ("▁of", "<phrase>"),
    "ground": ("</phrase>", "<object>"),
    "describe": ("</object>", "▁is"),
}


@pytest.fixture(scope="module")
def batch_and_tokenizer():
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(train_mini.TOKENIZER_DIR)
    tok = processor.tokenizer
    args = types.SimpleNamespace(curriculum=600, phases=300, task_weights="1,1,1")
    seeds = list(range(16_000, 16_024))  # 24 rows of 1-4 objects: all three jobs, prompts of several lengths
    batch = train_mini.make_batch(processor, seeds, 2_000, args, tok.eos_token_id, tok.pad_token_id)
    return batch, tok


def test_targets_start_right_after_each_prompt(batch_and_tokenizer):
    batch, tok = batch_and_tokenizer
    seen = set()
    for ids, target in zip(batch["input_ids"], batch["target"]):
        first = int(target.nonzero()[0])
        before, after = tok.convert_ids_to_tokens([int(ids[first - 1]), int(ids[first])])
        job = next(name for name, pair in PROMPT_ENDS.items() if pair == (before, after))
        seen.add(job)
    assert seen == set(PROMPT_ENDS), f"jobs whose first target is right: {sorted(seen)}"


def test_targets_end_at_eos_and_skip_padding(batch_and_tokenizer):
    batch, tok = batch_and_tokenizer
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1, "the batch should mix row lengths"
    for ids, target, n in zip(batch["input_ids"], batch["target"], lengths.tolist()):
        last = int(target.nonzero()[-1])
        assert last == n - 1 and int(ids[last]) == tok.eos_token_id
        assert not (target & (ids == tok.pad_token_id)).any(), "a pad is a target"
        assert int((ids[:n] == tok.eos_token_id).sum()) == 1
