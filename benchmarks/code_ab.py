"""Two checkouts of kosmos2_ref, whole model steps, A/B: image encoding and time to first token of the same
checkpoint, each checkout in its own process, the processes taking turns (A, B, A, B, ...), so that a busy moment
of the machine hits both alike. For a change to the fast primitives that cannot be switched within one process.

    python benchmarks/code_ab.py --a /path/to/old/checkout --b . --size full --rounds 4 --repeats 3

Prints the medians over all rounds and the ratio B/A; results go to benchmarks/results/code-ab-<size>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# run inside each child: the checkout's kosmos2_ref first on sys.path, this benchmarks folder for compare.py
CHILD = r"""
import json, sys, time
sys.path[:0] = [{src!r}, {bench!r}]
import kosmos2_ref  # before compare, which puts its own checkout first on sys.path
import compare
assert kosmos2_ref.__file__.startswith({src!r}), kosmos2_ref.__file__
ours = compare.Ours(compare.checkpoint({size!r}))
pv, ids, att, img = compare.inputs()
steps = {{"image encoding": lambda: ours.encode(pv), "time to first token": lambda: ours.prefill(pv, ids, att, img)}}
out = {{}}
for name, fn in steps.items():
    fn()
    times = []
    for _ in range({repeats}):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    out[name] = times
print("RESULT " + json.dumps(out))
"""


def run_child(src: Path, size: str, repeats: int) -> dict:
    code = CHILD.format(src=str(src), bench=str(HERE), size=size, repeats=repeats)
    env = dict(os.environ, PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"child for {src} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT ") :])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, type=Path, help="checkout A (the before)")
    ap.add_argument("--b", required=True, type=Path, help="checkout B (the after)")
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here (default: results/)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import compare

    info = compare.machine()
    print(compare.describe_machine(info), flush=True)
    sides = {"A": a.a.resolve(), "B": a.b.resolve()}
    for name, src in sides.items():
        if not (src / "kosmos2_ref" / "__init__.py").is_file():
            raise SystemExit(f"--{name.lower()} {src}: no kosmos2_ref package there")
    times = {name: {} for name in sides}
    for r in range(a.rounds):
        for name, src in sides.items():
            for step, ts in run_child(src, a.size, a.repeats).items():
                times[name].setdefault(step, []).extend(ts)
        print(f"round {r + 1}/{a.rounds} done", flush=True)
    rows = []
    for step in times["A"]:
        ma, mb = statistics.median(times["A"][step]), statistics.median(times["B"][step])
        rows.append({"step": step, "A": ma, "B": mb, "B/A": mb / ma})
        print(f"{step:<22s} A {ma:.3f} s  B {mb:.3f} s  B/A {mb / ma:.3f}", flush=True)
    out = a.out or HERE / "results" / f"code-ab-{a.size}.json"
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "a": str(sides["A"]),
                "b": str(sides["B"]),
                "rounds": a.rounds,
                "repeats": a.repeats,
                "rows": rows,
                "times": times,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
