"""Each entity of a batch job's records carries its confidence; checked against transformers' ``output_scores``
on the same images, on the trained miniature (whose boxes are real choices, not the noise of random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kosmos2_ref import Kosmos2, Kosmos2Processor, jobs, tasks, world
from kosmos2_ref.confidence import TagIds, entity_confidences, row_confidences
from kosmos2_ref.hub import MINI_FOLDER

TOL = 1e-5  # absolute, on probabilities in [0, 1]


def scenes_with(phrase: str, count: int, folder):
    """``count`` held-out scenes (seeds above the training range) in which ``phrase`` names an object, as PNGs."""
    paths = []
    for seed in range(1_700_000_000, 1_700_000_400):
        scene = world.make_scene(seed, image_size=224)
        if phrase in [p for p, _ in world.referring_examples(scene)]:
            path = folder / f"scene_{seed}.png"
            world.render(scene).save(path)
            paths.append(str(path))
            if len(paths) == count:
                return paths
    raise AssertionError(f"fewer than {count} scenes with {phrase!r}")


def flat(conf: dict | None) -> list:
    """A confidence record as a flat list (None where the prompt gave the token)."""
    if conf is None:
        return [None]
    return [conf["phrase"], conf["object"]] + [v for b in conf["boxes"] for v in b.values()]


def test_ground_job_confidences_match_transformers_scores(tmp_path):
    from transformers import Kosmos2ForConditionalGeneration

    phrase, n_new = "the red circle", 16
    paths = scenes_with(phrase, 3, tmp_path)
    model, processor = Kosmos2.from_pretrained("mini"), Kosmos2Processor.from_pretrained("mini")
    job = jobs.TextJob.ground(phrase, n_new)
    records = jobs.text_batch_records(model, processor, job, paths)
    assert [r["status"] for r in records] == ["ok"] * 3

    hf = Kosmos2ForConditionalGeneration.from_pretrained(MINI_FOLDER, dtype=torch.float32).eval()
    images = [world.render(world.make_scene(int(p.rsplit("_", 1)[1][:-4]), image_size=224)) for p in paths]
    x = processor(text=[job.prompt] * 3, images=images, padding=True, padding_side="left")
    with torch.no_grad():
        ref = hf.generate(
            **{k: torch.from_numpy(v) for k, v in x.items()},
            max_new_tokens=n_new,
            output_scores=True,
            return_dict_in_generate=True,
        )
    seqs = ref.sequences.numpy()
    T = x["input_ids"].shape[1]
    tags = TagIds.from_tokenizer(processor.tokenizer, processor.num_patches_per_side**2)
    eos = [model.config.text_config.eos_token_id]
    worst, boxes_seen = 0.0, 0
    for row, record in enumerate(records):
        # transformers' probability of each chosen token, from its own scores, in float64
        logp = torch.log_softmax(torch.stack(ref.scores)[:, row].double(), dim=-1)  # [steps, V]
        new = seqs[row, T:]
        n = next((k + 1 for k, t in enumerate(new) if t in eos), len(new))
        probs = logp[torch.arange(n), torch.from_numpy(new[:n])].exp().numpy()
        decoded = processor.batch_decode(seqs[row : row + 1], skip_special_tokens=True)[0]
        _, raw = processor.post_process_generation(decoded)
        expected = entity_confidences(list(seqs[row, : T + n]), T, probs, tags, raw, processor.num_patches_per_side)
        got = [e["confidence"] for e in record["entities"]]
        assert len(got) == len(expected) == len(raw), (record["text"], decoded)
        for g, e in zip(got, expected):
            a, b = flat(g), flat(e.to_dict() if e is not None else None)
            assert [v is None for v in a] == [v is None for v in b]
            diffs = [abs(u - v) for u, v in zip(a, b) if u is not None]
            worst = max([worst, *diffs])
            boxes_seen += len(g["boxes"]) if g else 0
        assert record["entities"] == [] or record["entities"][0]["confidence"]["phrase"] is None  # the prompt's
    print(f"\nground job, 3 scenes, {boxes_seen} boxes: confidences vs transformers' scores max |Δ| = {worst:.2e}")
    assert boxes_seen > 0, "the miniature grounded nothing: the test would check no box"
    assert worst <= TOL

    # the one-image task gives each entity the same confidence (its own run, so to float32 rounding)
    alone = tasks.ground(model, paths[0], phrase, max_new_tokens=n_new, processor=processor)
    for entity, record_entity in zip(alone.entities, records[0]["entities"], strict=True):
        a, b = flat(entity.to_dict()["confidence"]), flat(record_entity["confidence"])
        assert [v is None for v in a] == [v is None for v in b]
        assert all(abs(u - v) <= 1e-6 for u, v in zip(a, b) if u is not None)
    beams = tasks.ground(model, paths[0], phrase, max_new_tokens=n_new, processor=processor, num_beams=3)
    assert all(e.confidence is None for e in beams.entities)  # beam scores are the beams', not the tokens' own


def test_row_confidences_stop_at_each_rows_eos():
    """A finished row's padding after its EOS is not part of its run: only the steps up to EOS are read (here the
    step after row 0's EOS bans every token, which token_probabilities refuses if it is read)."""
    V, T, eos, pad = 8, 2, 2, 1
    seqs = np.array([[5, 5, 3, eos, pad], [5, 5, 3, 4, eos]])
    scores = [np.log(np.full((2, V), 1.0 / V)) for _ in range(3)]
    scores[2][0] = np.full(V, -np.inf)
    tags = TagIds(phrase=60, end_phrase=61, object=62, end_object=63, delimiter=64, first_patch=100, num_patches=4)
    assert row_confidences(seqs, scores, 0, T, tags, [], [eos]) == []
    assert row_confidences(seqs, scores, 1, T, tags, [], [eos]) == []
    with pytest.raises(ValueError, match="every score is -inf"):
        row_confidences(seqs, scores, 0, T, tags, [], [99])  # no EOS known: the banned step is read
