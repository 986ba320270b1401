"""Local against Ray on one machine: images per second of the caption and embed jobs run in this process and on
``--workers`` Ray workers, and the memory the workers take (resident and proportional set size of every
``ray::`` process, sampled while the job runs; PSS splits the pages the workers share, such as the memory-mapped
weights, between them).

    python benchmarks/ray_local.py --size tiny --images 32
    python benchmarks/ray_local.py --size full --images 16 --new-tokens 8

Results go to benchmarks/results/ray-local-<size>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

PROMPT = "<grounding> An image of"


def _throughput():
    spec = importlib.util.spec_from_file_location("throughput", HERE / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ray_worker_memory() -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over the processes whose command line starts with ``ray::`` (the workers)."""
    rss = pss = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                continue
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


class MemorySampler:
    """The largest worker memory seen, sampled every 0.2 s in a thread while a job runs."""

    def __init__(self):
        self.peak = (0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.2):
            now = ray_worker_memory()
            if now[0] > self.peak[0]:
                self.peak = now

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["full", "tiny"], default="tiny")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args(argv)
    import ray

    from kosmos2_ref import Kosmos2, jobs, ray_jobs

    folder = str(_throughput()._compare().checkpoint(args.size))
    paths = [str(p) for p in _throughput().photos(args.images)]
    job = jobs.TextJob("caption", PROMPT, args.new_tokens)
    result = {
        "size": args.size,
        "images": args.images,
        "new_tokens": args.new_tokens,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "cpus": os.cpu_count(),
        "machine": _throughput()._compare().machine(),  # processor, caches, ISA flags, BLAS kernel, versions
    }
    with tempfile.TemporaryDirectory() as tmp:
        # the same image several times would be one input: give each its own name (symbolic links)
        names = []
        for i, p in enumerate(paths):
            link = Path(tmp) / f"{i:04d}{Path(p).suffix}"
            link.symlink_to(p)
            names.append(str(link))
        model = Kosmos2.from_pretrained(folder)
        shapes = jobs.embedding_row_shapes(model)
        out = jobs.RecordFile(f"{tmp}/local.jsonl")
        result["local_caption"] = (
            args.images / jobs.run_text_job(model, None, job, names, out, batch_size=args.batch_size).seconds
        )
        out.close()
        files = jobs.EmbeddingFiles(f"{tmp}/local.npy", names, *shapes)
        result["local_embed"] = (
            args.images / jobs.run_embed_job(model, None, names, files, batch_size=args.batch_size).seconds
        )
        files.close()
        del model
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        try:
            with MemorySampler() as caption_memory:
                out = jobs.RecordFile(f"{tmp}/ray.jsonl")
                t0 = time.perf_counter()
                ray_jobs.run_text_job(folder, job, names, out, batch_size=args.batch_size, workers=args.workers)
                result["ray_caption"] = args.images / (time.perf_counter() - t0)  # worker start-up included
                out.close()
            with MemorySampler() as embed_memory:
                files = jobs.EmbeddingFiles(f"{tmp}/ray.npy", names, *shapes)
                t0 = time.perf_counter()
                ray_jobs.run_embed_job(folder, names, files, batch_size=args.batch_size, workers=args.workers)
                result["ray_embed"] = args.images / (time.perf_counter() - t0)
                files.close()
        finally:
            ray.shutdown()
    result["ray_workers_peak_rss_bytes"] = {"caption": caption_memory.peak[0], "embed": embed_memory.peak[0]}
    result["ray_workers_peak_pss_bytes"] = {"caption": caption_memory.peak[1], "embed": embed_memory.peak[1]}
    out_path = HERE / "results" / f"ray-local-{args.size}.json"
    out_path.parent.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
