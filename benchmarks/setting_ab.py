"""One environment setting of kosmos2_ref at two or more values, whole model steps, A/B in one process: image
encoding and time to first token of the same checkpoint with the variable at each value, timed in turns (so drift
on a shared machine hits all alike), and each step's linear-layer products alone (compare.py's floor) with the
variable unset, so the whole-step / products ratio of issue #23 is printed for each value. For a choice the
library makes at run time (the settings are read at each call), e.g. padding ragged rows:

    python benchmarks/setting_ab.py --var KOSMOS2_PAD_ROWS --values off,on, --size full --repeats 7

An empty value means the variable unset (the library's default). Results go to
benchmarks/results/setting-ab-<var>-<size>.json (``--out`` elsewhere).
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


def with_setting(var: str, value: str, fn):
    """``fn`` run with environment variable ``var`` set to ``value`` ("" : unset), restored after; the
    arguments pass through."""

    def run(*args):
        before = os.environ.pop(var, None)
        if value:
            os.environ[var] = value
        try:
            return fn(*args)
        finally:
            os.environ.pop(var, None)
            if before is not None:
                os.environ[var] = before

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--var", required=True, help="the environment variable, e.g. KOSMOS2_PAD_ROWS")
    ap.add_argument("--values", required=True, help="comma-separated values; an empty one means unset")
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here (default: results/)")
    a = ap.parse_args(argv)
    values = a.values.split(",")
    if len(values) < 2:
        ap.error(f"--values {a.values!r}: expected at least two comma-separated values")
    names = [v or "unset" for v in values]
    from kosmos2_ref import fast

    cmp = _compare()
    info = cmp.machine()
    print(cmp.describe_machine(info), flush=True)
    print(f"{a.var}: " + ", ".join(names), flush=True)
    side = cmp.Ours(cmp.checkpoint(a.size), "float32")
    pv, ids, att, img = cmp.inputs()
    steps = {
        "image encoding": lambda: side.encode(pv),
        "time to first token": lambda: side.prefill(pv, ids, att, img),
    }
    rows = []
    for what, fn in steps.items():
        runs = {name: with_setting(a.var, value, fn) for name, value in zip(names, values)}
        for f in runs.values():  # warm-up (and, unset, the first calls' measuring)
            f()
        times = {name: [] for name in runs}
        for _ in range(a.repeats):  # in turns
            for name, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        _, products = cmp.products_alone(side, fn, a.repeats)
        rows.append({"step": what, "medians": med, "times": times, "products_alone": products})
        first = names[0]
        print(
            f"  {what:<22s} "
            + ", ".join(f"{n} {med[n]:7.4f} s ({med[n] / med[first]:.3f})" for n in names)
            + f"; products alone {products:7.4f} s: whole / products "
            + " / ".join(f"{med[n] / products:.3f}" for n in names),
            flush=True,
        )
    kept = {"product_forms": fast.product_forms(), "row_paddings": fast.row_paddings()}
    kept["elementwise_splits"] = fast.elementwise_splits()
    print(f"kept: {kept}", flush=True)
    slug = a.var.lower().replace("kosmos2_", "").replace("_", "-")
    out = a.out or HERE / "results" / f"setting-ab-{slug}-{a.size}.json"
    out.write_text(
        json.dumps(
            {"machine": info, "var": a.var, "values": names, "repeats": a.repeats, "rows": rows, "kept": kept}, indent=1
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
