"""Images per second for the batch jobs: caption and embed at batch sizes 1, 4 and 8, kosmos2-ref against
transformers in the same run on the same checkpoint (random weights).

    python benchmarks/throughput.py --size full --new-tokens 16     # the released architecture (6.66 GB)
    python benchmarks/throughput.py --size tiny                     # a quick check of the script itself

Both sides get the same inputs: ``--images`` photos (the repository's test photos, repeated) preprocessed once by
our processor, prompts left-padded (``padding_side="left"``; one prompt, so the rows are equal in length anyway).
``caption`` generates exactly ``--new-tokens`` tokens per image (greedy, ``min_new_tokens`` too, so neither side
stops early); ``embed`` is the vision tower and the connector. The sides run one after the other, each model
loaded alone (so the full size needs one 6.66 GB model in memory at a time), with one warm-up batch each.
A last column times ours end to end as a user runs it, through :func:`kosmos2_ref.jobs.run_text_job` /
:func:`~kosmos2_ref.jobs.run_embed_job` (image files read and decoded, records and .npy rows written).
Results go to benchmarks/results/throughput-<size>.json and are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

PROMPT = "<grounding> An image of"
BATCH_SIZES = (1, 4, 8)


def _compare():
    """benchmarks/compare.py: its checkpoint cache and its two sides (Ours, HF)."""
    spec = importlib.util.spec_from_file_location("compare", HERE / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def photos(count: int) -> list[Path]:
    from fixtures_tokenizer import IMAGES

    found = sorted(IMAGES.glob("*.jpg")) + sorted(IMAGES.glob("*.png"))
    return [found[i % len(found)] for i in range(count)]


def model_inputs(paths: list[Path]) -> dict:
    from kosmos2_ref.processing import Kosmos2Processor

    processor = Kosmos2Processor.default()
    return processor(text=[PROMPT] * len(paths), images=[str(p) for p in paths], padding=True, padding_side="left")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def side_rates(side, inputs: dict, new_tokens: int) -> dict:
    """{job: {batch size: images/s}} for one side (compare.Ours or compare.HF)."""
    n = inputs["pixel_values"].shape[0]
    keys = ("pixel_values", "input_ids", "attention_mask", "image_embeds_position_mask")
    rates: dict = {"caption": {}, "embed": {}}
    for bs in BATCH_SIZES:
        chunks = [[inputs[k][s : s + bs] for k in keys] for s in range(0, n, bs)]
        side.generate(*chunks[0], new_tokens)  # warm-up
        rates["caption"][bs] = n / _timed(lambda: [side.generate(*c, new_tokens) for c in chunks])  # noqa: B023 (called inside this iteration)
        side.encode(chunks[0][0])
        rates["embed"][bs] = n / _timed(lambda: [side.encode(c[0]) for c in chunks])  # noqa: B023 (called inside this iteration)
        print(
            f"  {side.name}: batch {bs}: caption {rates['caption'][bs]:.3f}, embed {rates['embed'][bs]:.3f} images/s",
            flush=True,
        )
    return rates


def job_rates(folder: Path, paths: list[Path], new_tokens: int) -> dict:
    """Ours end to end: the batch jobs over the image files, writing their outputs."""
    from kosmos2_ref import Kosmos2, jobs

    model = Kosmos2.from_pretrained(folder)
    names = [str(p) for p in paths]
    rates: dict = {"caption": {}, "embed": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for bs in BATCH_SIZES:
            job = jobs.TextJob("caption", PROMPT, new_tokens)
            out = jobs.RecordFile(f"{tmp}/c{bs}.jsonl")
            outcome = jobs.run_text_job(model, None, job, names, out, batch_size=bs)
            out.close()
            rates["caption"][bs] = len(names) / outcome.seconds
            embeds_row, pooled_row = jobs.embedding_row_shapes(model)
            files = jobs.EmbeddingFiles(f"{tmp}/e{bs}.npy", names, embeds_row, pooled_row)
            outcome = jobs.run_embed_job(model, None, names, files, batch_size=bs)
            files.close()
            rates["embed"][bs] = len(names) / outcome.seconds
            print(
                f"  kosmos2-ref job: batch {bs}: caption {rates['caption'][bs]:.3f}, embed "
                f"{rates['embed'][bs]:.3f} images/s",
                flush=True,
            )
    return rates


def table(result: dict) -> str:
    lines = [
        "| job | batch | kosmos2-ref (images/s) | transformers (images/s) | ratio ours / tf | kosmos2-ref job, "
        "end to end |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for job in ("caption", "embed"):
        for bs in BATCH_SIZES:
            ours, tf, end = (result[k][job][str(bs)] for k in ("ours", "transformers", "job"))
            lines.append(f"| {job} | {bs} | {ours:.3f} | {tf:.3f} | {ours / tf:.2f} | {end:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--images", type=int, default=8, help="images per measurement (default 8)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per caption (default 16)")
    args = ap.parse_args(argv)
    compare = _compare()
    folder = compare.checkpoint(args.size)
    paths = photos(args.images)
    inputs = model_inputs(paths)
    print(
        f"{args.size}: {args.images} images, prompt {inputs['input_ids'].shape[1]} tokens, "
        f"{args.new_tokens} new tokens",
        flush=True,
    )
    result = {
        "size": args.size,
        "images": args.images,
        "new_tokens": args.new_tokens,
        "machine": compare.machine(),  # the processor, its caches and ISA flags, the BLAS kernel, the versions
    }
    print(compare.describe_machine(result["machine"]), flush=True)
    for key, make in (("ours", lambda: compare.Ours(folder)), ("transformers", lambda: compare.HF(folder))):
        side = make()
        result[key] = {
            job: {str(bs): r for bs, r in by_bs.items()}
            for job, by_bs in side_rates(side, inputs, args.new_tokens).items()
        }
        del side
        gc.collect()
    result["job"] = {
        job: {str(bs): r for bs, r in by_bs.items()} for job, by_bs in job_rates(folder, paths, args.new_tokens).items()
    }
    out = HERE / "results" / f"throughput-{args.size}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
