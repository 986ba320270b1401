"""Evaluate the miniature on held-out scenes, with our NumPy model and transformers side by side (dev tool).

    python training/evaluate_mini.py --n 500 [--model kosmos2_ref/assets/mini] [--json out.json]
    # or on two cores: --shard 0/2 --rows a.json & --shard 1/2 --rows b.json, then --merge a.json b.json

Scenes come from seeds ``HELDOUT_SEED_BASE + i`` (training draws seeds below 10^9; its learning curve uses
10^9 + i), rendered at 224 pixels. Per scene, greedy decoding with the checkpoint's settings, the three jobs of
``kosmos2_ref.tasks``:

* caption -- ``<grounding> An image of``: every object named (its colour and shape in some phrase), and per
  object whether a box of a phrase naming it has IoU >= 0.5 with it (boxes matched one to one);
* ground -- one kind of the scene (the ``seed % kinds``-th), ``the <colour> <shape>(s)``: every box of that
  kind found with IoU >= 0.5, no extra boxes;
* describe -- one object (the ``seed % objects``-th) by its box: the text names its colour and its shape, and
  no other colour or shape.

Ours runs through ``kosmos2_ref.tasks``; transformers runs ``generate`` on the same processor outputs and is
scored by the same rules; ``agree`` counts scenes where both produced the same tokens in all three jobs. The
baseline is the best single fixed box (chosen on 2000 training scenes) and the commonest kind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny products: one BLAS thread is 2x faster here
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kosmos2_ref import tasks, world  # noqa: E402

HELDOUT_SEED_BASE = 1_500_000_000
IMAGE_SIZE = 224


# ----------------------------------------------------------------------------------------------------------------
# Scoring rules (shared by both implementations)


def match_count(pred: list, truth: list, thresh: float = 0.5) -> int:
    """How many truth boxes get a distinct predicted box with IoU >= thresh (greedy, best pairs first)."""
    pairs = sorted(((world.iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)), reverse=True)
    used_p, used_t, n = set(), set(), 0
    for score, i, j in pairs:
        if score >= thresh and i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            n += 1
    return n


def names_kind(phrase: str, colour: str, shape: str) -> bool:
    words = phrase.lower().split()
    return colour in words and (shape in words or world.plural(shape) in words)


def score_caption(scene: world.Scene, entities) -> tuple[bool, int]:
    """(every object named, objects whose box was found)."""
    named, found = True, 0
    for colour, shape, boxes in world.groups(scene):
        mine = [e for e in entities if names_kind(e[0], colour, shape)]
        named &= bool(mine)
        found += match_count([b for e in mine for b in e[2]], boxes)
    return named, found


def ground_query(scene: world.Scene) -> tuple[str, list]:
    refs = world.referring_examples(scene)
    return refs[scene.seed % len(refs)]


def score_ground(boxes: list, truth: list) -> bool:
    return len(boxes) == len(truth) and match_count(boxes, truth) == len(truth)


def score_describe(text: str, obj: world.SceneObject) -> bool:
    words = text.lower().replace(".", " ").split()
    colours = {w for w in words if w in world.COLOURS}
    shapes = {w.rstrip("s") for w in words if w.rstrip("s") in world.SHAPES}
    return colours == {obj.colour} and shapes == {obj.shape}


# ----------------------------------------------------------------------------------------------------------------
# The two implementations


def run_ours(model, processor, scene, image):
    cap = tasks.caption(model, image, processor=processor)
    phrase, truth = ground_query(scene)
    gr = tasks.ground(model, image, phrase, processor=processor)
    obj = scene.objects[scene.seed % len(scene.objects)]
    de = tasks.describe(model, image, obj.box, processor=processor)
    ent = [(e.phrase, e.span, e.boxes) for e in cap.entities]
    return {
        "caption": score_caption(scene, ent),
        "ground": score_ground(gr.boxes, truth),
        "describe": score_describe(de.description, obj),
        "texts": (cap.text, gr.text, de.text),
    }


def run_transformers(model, processor, scene, image):
    import torch

    def generate(prompt, bboxes=None, max_new=tasks.DEFAULT_MAX_NEW_TOKENS):
        enc = processor(text=prompt, images=image, bboxes=bboxes, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(
                pixel_values=enc["pixel_values"],
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                image_embeds_position_mask=enc["image_embeds_position_mask"],
                max_new_tokens=max_new,
            )
        decoded = processor.batch_decode(ids, skip_special_tokens=True)[0]
        raw = processor.post_process_generation(decoded, cleanup_and_extract=False)
        caption, entities = processor.post_process_generation(decoded)
        return raw, caption, entities

    raw_c, _, ent_c = generate(tasks.DEFAULT_CAPTION_PROMPT)
    phrase, truth = ground_query(scene)
    raw_g, _, ent_g = generate(f"<grounding><phrase> {phrase}</phrase>", max_new=tasks.GROUND_MAX_NEW_TOKENS)
    hit = next((e for e in ent_g if e[1][0] == 0 and e[0] == phrase), None)
    obj = scene.objects[scene.seed % len(scene.objects)]
    raw_d, cap_d, _ = generate("<grounding><phrase> It</phrase>", [obj.box])
    return {
        "caption": score_caption(scene, ent_c),
        "ground": score_ground(hit[2] if hit else [], truth),
        "describe": score_describe(cap_d, obj),
        "texts": (raw_c, raw_g, raw_d),
    }


# ----------------------------------------------------------------------------------------------------------------
# Baselines


def best_fixed_box(n_train: int = 2000, step: float = 1 / 16) -> tuple[tuple, float]:
    """The one box that has IoU >= 0.5 with the most objects of ``n_train`` training scenes, and that share."""
    truth = np.array([o.box for s in range(n_train) for o in world.make_scene(s).objects])  # [M, 4]
    edges = np.arange(0, 1 + 1e-9, step)
    cands = np.array(
        [(x1, y1, x2, y2) for x1 in edges for x2 in edges if x2 > x1 for y1 in edges for y2 in edges if y2 > y1]
    )  # [K, 4]
    best, best_rate = None, -1.0
    for chunk in np.array_split(cands, max(1, len(cands) // 2000)):
        c, t = chunk[:, None, :], truth[None, :, :]  # [k, 1, 4], [1, M, 4]
        iw = np.clip(np.minimum(c[..., 2], t[..., 2]) - np.maximum(c[..., 0], t[..., 0]), 0, None)  # [k, M]
        ih = np.clip(np.minimum(c[..., 3], t[..., 3]) - np.maximum(c[..., 1], t[..., 1]), 0, None)
        inter = iw * ih
        area_c = (chunk[:, 2] - chunk[:, 0]) * (chunk[:, 3] - chunk[:, 1])
        area_t = (truth[:, 2] - truth[:, 0]) * (truth[:, 3] - truth[:, 1])
        rate = ((inter / (area_c[:, None] + area_t[None, :] - inter)) >= 0.5).mean(1)  # [k]
        if rate.max() > best_rate:
            best_rate, best = float(rate.max()), tuple(float(v) for v in chunk[rate.argmax()])
    return best, best_rate


def baseline(scenes: list, box: tuple) -> dict:
    objects = [o for s in scenes for o in s.objects]
    ground = [score_ground([box], ground_query(s)[1]) for s in scenes]
    return {
        "ground": float(np.mean(ground)),
        "caption_boxes": float(np.mean([world.iou(box, o.box) >= 0.5 for o in objects])),
        "describe": 1 / (len(world.COLOURS) * len(world.SHAPES)),
    }


# ----------------------------------------------------------------------------------------------------------------


def summarise(rows: list[dict], scenes: list) -> dict:
    n_obj = sum(len(s.objects) for s in scenes)
    return {
        "caption_named": float(np.mean([r["caption"][0] for r in rows])),
        "caption_boxes": sum(r["caption"][1] for r in rows) / n_obj,
        "ground": float(np.mean([r["ground"] for r in rows])),
        "describe": float(np.mean([r["describe"] for r in rows])),
    }


def evaluate_scenes(folder, indices: list[int], with_transformers: bool) -> list[dict]:
    """Per scene: the seed, our scores, transformers' scores and whether the tokens agree."""
    from kosmos2_ref import Kosmos2, Kosmos2Processor

    ours = Kosmos2.from_pretrained(folder)
    ours_proc = Kosmos2Processor.from_pretrained(folder)
    if with_transformers:
        import torch
        from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

        torch.set_num_threads(1)
        ref = Kosmos2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        ref_proc = AutoProcessor.from_pretrained(folder)
    rows = []
    for k, i in enumerate(indices):
        scene = world.make_scene(HELDOUT_SEED_BASE + i, image_size=IMAGE_SIZE)
        image = world.render(scene)
        t = time.time()
        row = {"index": i, "ours": run_ours(ours, ours_proc, scene, image)}
        row["seconds_ours"] = time.time() - t
        if with_transformers:
            t = time.time()
            row["transformers"] = run_transformers(ref, ref_proc, scene, image)
            row["seconds_transformers"] = time.time() - t
            row["agree"] = row["ours"]["texts"] == row["transformers"]["texts"]
        rows.append(row)
        if (k + 1) % 25 == 0:
            print(f"  {k + 1} scenes: ours {summarise([r['ours'] for r in rows], scenes_of(rows))}", flush=True)
    return rows


def scenes_of(rows: list[dict]) -> list:
    return [world.make_scene(HELDOUT_SEED_BASE + r["index"], image_size=IMAGE_SIZE) for r in rows]


def report(rows: list[dict], folder) -> dict:
    scenes = scenes_of(rows)
    box, train_rate = best_fixed_box()
    root = Path(__file__).resolve().parents[1]
    shown = Path(folder).resolve()
    shown = shown.relative_to(root) if shown.is_relative_to(root) else shown  # no machine paths in the record
    result = {
        "n": len(rows),
        "model": str(shown),
        "ours": summarise([r["ours"] for r in rows], scenes),
        "baseline": {**baseline(scenes, box), "box": box, "train_rate": train_rate},
        "seconds": {"ours": round(sum(r["seconds_ours"] for r in rows), 1)},
    }
    if all("transformers" in r for r in rows):
        result["transformers"] = summarise([r["transformers"] for r in rows], scenes)
        result["agree"] = sum(r["agree"] for r in rows)
        result["seconds"]["transformers"] = round(sum(r["seconds_transformers"] for r in rows), 1)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="held-out scenes")
    p.add_argument("--model", default="mini", help="checkpoint folder (default: the packaged miniature)")
    p.add_argument("--skip-transformers", action="store_true", help="ours only (no torch needed)")
    p.add_argument("--shard", default="0/1", help="i/k: this process takes scenes i, i+k, ... (run k of them)")
    p.add_argument("--rows", default=None, help="write the per-scene rows here (JSON)")
    p.add_argument("--merge", nargs="+", default=None, help="per-scene row files of the shards: report them")
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args(argv)

    from kosmos2_ref.hub import resolve_checkpoint

    folder = resolve_checkpoint(args.model)
    if args.merge:
        rows = [r for f in args.merge for r in json.loads(Path(f).read_text())]
        rows.sort(key=lambda r: r["index"])
    else:
        i, k = (int(v) for v in args.shard.split("/"))
        rows = evaluate_scenes(folder, list(range(i, args.n, k)), not args.skip_transformers)
        if args.rows:
            Path(args.rows).write_text(json.dumps(rows) + "\n")
        if k > 1:
            return {}
    result = report(rows, folder)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_table(r: dict) -> None:
    cols = [("ours", r["ours"])] + ([("transformers", r["transformers"])] if "transformers" in r else [])
    b = r["baseline"]
    print(
        f"\n{r['n']} held-out scenes (seeds {HELDOUT_SEED_BASE}..), greedy     target   "
        + "  ".join(f"{name:>12s}" for name, _ in cols)
        + "   fixed-box baseline"
    )
    lines = [
        ("caption: every object named", "caption_named", ">= 0.90", None),
        ("caption: objects with box IoU >= 0.5", "caption_boxes", ">= 0.80", b["caption_boxes"]),
        ("ground: IoU >= 0.5", "ground", ">= 0.85", b["ground"]),
        ("describe: right colour and shape", "describe", ">= 0.85", b["describe"]),
    ]
    for label, key, target, base in lines:
        vals = "  ".join(f"{c[key]:12.3f}" for _, c in cols)
        print(f"  {label:<44s} {target:>8s}   {vals}   {'' if base is None else f'{base:.3f}'}")
    if "agree" in r:
        print(f"  ours and transformers: the same tokens in all three jobs on {r['agree']} / {r['n']} scenes")
    print(f"  time: {r['seconds']}")


if __name__ == "__main__":
    main()
