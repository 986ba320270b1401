"""Element-wise work on one thread, always shared among the cores (``fast.over_parts``), and measured per kind of
work (the default: one way or the other, as timed at first use), whole model steps, in one process: image encoding
and time to first token of the same checkpoint with ``KOSMOS2_ELEMENTWISE_THREADS=1``, with it set to the core
count, and unset, timed in turns; and each step's linear-layer products alone (compare.py's floor), so the
whole-step / products ratio of issue #23 is printed for each.

    python benchmarks/elementwise_ab.py --size full --repeats 7

Results go to benchmarks/results/elementwise-ab-<size>.json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from setting_ab import _compare, with_setting  # this folder: the script's own, first on sys.path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here (default: results/)")
    a = ap.parse_args(argv)
    from kosmos2_ref import fast

    cmp = _compare()
    info = cmp.machine()
    print(cmp.describe_machine(info), flush=True)
    threads = fast.elementwise_threads()
    print(f"element-wise threads: 1, {threads} (always split), or measured per kind (the default)", flush=True)
    side = cmp.Ours(cmp.checkpoint(a.size), "float32")
    pv, ids, att, img = cmp.inputs()
    steps = {
        "image encoding": lambda: side.encode(pv),
        "time to first token": lambda: side.prefill(pv, ids, att, img),
    }
    ways = {"one": "1", "split": str(threads), "measured": None}
    rows = []
    for what, fn in steps.items():
        runs = {key: with_setting(fast.ELEMENTWISE_THREADS_ENV, value or "", fn) for key, value in ways.items()}
        for f in runs.values():  # warm-up (and, for the default, the first calls' measuring)
            f()
        times = {key: [] for key in runs}
        for _ in range(a.repeats):  # in turns
            for key, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[key].append(time.perf_counter() - t0)
        med = {key: statistics.median(t) for key, t in times.items()}
        _, products = cmp.products_alone(side, runs["measured"], a.repeats)
        rows.append(
            {
                "step": what,
                "one_thread": med["one"],
                "threads": med["split"],
                "measured": med["measured"],
                "products_alone": products,
            }
        )
        print(
            f"  {what:<22s} 1 thread {med['one']:7.4f} s, {threads} threads {med['split']:7.4f} s, measured "
            f"{med['measured']:7.4f} s (split / one {med['split'] / med['one']:.3f}, measured / split "
            f"{med['measured'] / med['split']:.3f}); products alone {products:7.4f} s: whole / products "
            + " / ".join(f"{med[k] / products:.3f}" for k in ways),
            flush=True,
        )
    splits = fast.elementwise_splits()
    print("kept by the measured way: " + (", ".join(f"{k} {v}" for k, v in splits.items()) or "none"), flush=True)
    out = a.out or HERE / "results" / f"elementwise-ab-{a.size}.json"
    out.write_text(
        json.dumps({"machine": info, "threads": threads, "repeats": a.repeats, "rows": rows, "kept": splits}, indent=1)
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
