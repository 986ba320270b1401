"""Element-wise work on one thread against shared among the cores (``fast.over_parts``), whole model steps, in
one process: image encoding and time to first token of the same checkpoint with ``KOSMOS2_ELEMENTWISE_THREADS=1``
and with the default, timed in turns; and each step's linear-layer products alone (compare.py's floor), so the
whole-step / products ratio of issue #23 is printed for both.

    python benchmarks/elementwise_ab.py --size full --repeats 7

Results go to benchmarks/results/elementwise-ab-<size>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _compare():
    spec = importlib.util.spec_from_file_location("compare", HERE / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def with_threads(value: str | None, fn):
    """``fn`` run with KOSMOS2_ELEMENTWISE_THREADS set to ``value`` (None: unset, the default)."""
    from kosmos2_ref import fast

    def run():
        before = os.environ.pop(fast.ELEMENTWISE_THREADS_ENV, None)
        if value is not None:
            os.environ[fast.ELEMENTWISE_THREADS_ENV] = value
        try:
            return fn()
        finally:
            os.environ.pop(fast.ELEMENTWISE_THREADS_ENV, None)
            if before is not None:
                os.environ[fast.ELEMENTWISE_THREADS_ENV] = before

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args(argv)
    from kosmos2_ref import fast

    cmp = _compare()
    info = cmp.machine()
    print(cmp.describe_machine(info), flush=True)
    threads = fast.elementwise_threads()
    print(f"element-wise threads: 1 against {threads}", flush=True)
    side = cmp.Ours(cmp.checkpoint(a.size), "float32")
    pv, ids, att, img = cmp.inputs()
    steps = {
        "image encoding": lambda: side.encode(pv),
        "time to first token": lambda: side.prefill(pv, ids, att, img),
    }
    rows = []
    for what, fn in steps.items():
        one, many = with_threads("1", fn), with_threads(None, fn)
        one(), many()  # warm-up
        times = {"one": [], "many": []}
        for _ in range(a.repeats):  # in turns
            for key, f in (("one", one), ("many", many)):
                t0 = time.perf_counter()
                f()
                times[key].append(time.perf_counter() - t0)
        t1, tn = statistics.median(times["one"]), statistics.median(times["many"])
        _, products = cmp.products_alone(side, many, a.repeats)
        rows.append({"step": what, "one_thread": t1, "threads": tn, "products_alone": products})
        print(
            f"  {what:<22s} 1 thread {t1:7.4f} s, {threads} threads {tn:7.4f} s ({t1 / tn:.3f}x); products alone "
            f"{products:7.4f} s: whole / products {t1 / products:.3f} -> {tn / products:.3f}",
            flush=True,
        )
    out = HERE / "results" / f"elementwise-ab-{a.size}.json"
    out.write_text(json.dumps({"machine": info, "threads": threads, "repeats": a.repeats, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
