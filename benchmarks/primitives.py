"""Each fast primitive (kosmos2_ref.fast) against the textbook one it replaces (kosmos2_ref.layers), on the model's
full-size shapes with random data: median seconds of each, and reference / fast (> 1: the fast one is faster).

    python benchmarks/primitives.py [--repeats 7] [--only linear,attention]
    python benchmarks/primitives.py --threads-ab --only layer_norm,gelu,quick_gelu,attention
    python benchmarks/primitives.py --setting-ab KOSMOS2_ATTENTION_BLOCK=8M,1M --only attention

With ``--threads-ab`` the two timed are both the fast form: its element-wise work on one thread
(``KOSMOS2_ELEMENTWISE_THREADS=1``) against always shared among the threads the machine allows
(``fast.over_parts``; the variable set to that count, where unset the split is measured per kind of work).
``--setting-ab VAR=A,B`` likewise times the fast form with the environment variable at A (left column) and at
B (right column; an empty value: unset).

The two are timed in turns, so drift on a shared machine hits both alike; the figures quoted in fast.py's
docstrings come from this script. Shapes: the vision tower (257 tokens of 1024, MLP 4096), the text decoder on
the 71-token benchmark prompt (2048, MLP 8192, 32 heads of 64) and one decoded token, and a 1024-token prompt.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from setting_ab import with_setting  # noqa: E402  (this folder: the script's own, first on sys.path)

from kosmos2_ref import fast, layers  # noqa: E402
from kosmos2_ref.layers import NEG_INF_F32  # noqa: E402
from kosmos2_ref.weights import float32_to_bf16_bits  # noqa: E402

rng = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def causal(T: int, S: int):
    """[1, 1, T, S] additive causal mask with S - T cached keys."""
    past = S - T
    return np.where(np.arange(S)[None, :] > past + np.arange(T)[:, None], NEG_INF_F32, 0.0).astype(np.float32)[
        None, None
    ]


def read_only(w):
    w.flags.writeable = False  # as loaded (weights.load_flat): lets fast.linear remember a finite float16 matrix
    return w


def cases():
    """(primitive, label, the arguments) per measured case."""
    for label, M, K, N in [
        ("vision q/k/v/out  [1,257,1024] x [1024,1024]", 257, 1024, 1024),
        ("vision fc1        [1,257,1024] x [4096,1024]", 257, 1024, 4096),
        ("vision fc2        [1,257,4096] x [1024,4096]", 257, 4096, 1024),
        ("text prefill fc1  [1,71,2048]  x [8192,2048]", 71, 2048, 8192),
        ("text prefill fc2  [1,71,8192]  x [2048,8192]", 71, 8192, 2048),
        ("decode, 2 rows    [2,1,2048]   x [8192,2048]", 2, 2048, 8192),
        ("decode, 3 rows    [3,1,2048]   x [8192,2048]", 3, 2048, 8192),
    ]:
        yield "linear", label, (randn(1, M, K) if M > 3 else randn(M, 1, K), randn(N, K, scale=0.02), randn(N))
    w = randn(8192, 2048, scale=0.02)
    x1 = randn(1, 1, 2048)
    yield "linear", "decode bfloat16   [1,1,2048]   x [8192,2048]", (x1, read_only(float32_to_bf16_bits(w)), None)
    yield "linear", "decode float16    [1,1,2048]   x [8192,2048]", (x1, read_only(w.astype(np.float16)), None)
    yield (
        "linear",
        "prefill bfloat16  [1,71,2048]  x [8192,2048]",
        (randn(1, 71, 2048), read_only(float32_to_bf16_bits(w)), None),
    )
    for shape in [(1, 1, 2048), (1, 71, 2048), (1, 71, 8192), (1, 257, 1024)]:
        C = shape[-1]
        yield "layer_norm", f"{list(shape)}", (randn(*shape), randn(C), randn(C))
    for label, M, C, F, act, norm in [
        ("vision MLP     [1,257,1024], 4096 hidden", 257, 1024, 4096, "quick_gelu", False),
        ("text FFN       [1,71,2048], 8192 hidden, sub-LN", 71, 2048, 8192, "gelu", True),
    ]:
        fc1 = {"weight": randn(F, C, scale=0.02), "bias": randn(F)}
        fc2 = {"weight": randn(C, F, scale=0.02), "bias": randn(C)}
        inner = {"weight": randn(F), "bias": randn(F)} if norm else None
        yield "feed_forward", label, (randn(1, M, C), fc1, fc2, act, inner, 1e-5)
    yield "quick_gelu", "[1,257,4096]", (randn(1, 257, 4096),)
    yield "gelu", "[1,71,8192]", (randn(1, 71, 8192),)
    yield "gelu", "[1,1024,8192]", (randn(1, 1024, 8192),)
    yield (
        "attention",
        "vision [1,16,257,64], probs kept",
        (randn(1, 16, 257, 64), randn(1, 16, 257, 64), randn(1, 16, 257, 64), None, None, True),
    )
    yield (
        "attention",
        "vision [1,16,257,64], no probs",
        (randn(1, 16, 257, 64), randn(1, 16, 257, 64), randn(1, 16, 257, 64), None, None, False),
    )
    yield (
        "attention",
        "text prefill [1,32,71,64] causal",
        (randn(1, 32, 71, 64), randn(1, 32, 71, 64), randn(1, 32, 71, 64), causal(71, 71), None, False),
    )
    yield (
        "attention",
        "1024-token prefill causal",
        (randn(1, 32, 1024, 64), randn(1, 32, 1024, 64), randn(1, 32, 1024, 64), causal(1024, 1024), None, False),
    )
    yield (
        "attention",
        "decode [1,32,1,64], 100 keys",
        (randn(1, 32, 1, 64), randn(1, 32, 100, 64), randn(1, 32, 100, 64), None, None, False),
    )


def timed(fn, args, repeats):
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        t.append(time.perf_counter() - t0)
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", default="", help="comma-separated primitives (default: all)")
    ap.add_argument("--threads-ab", action="store_true", help="fast on one thread against fast on all threads")
    ap.add_argument("--setting-ab", default="", metavar="VAR=A,B", help="fast with VAR at A against at B")
    a = ap.parse_args(argv)
    if a.threads_ab:
        var, values = fast.ELEMENTWISE_THREADS_ENV, ["1", str(max(2, fast.elementwise_threads()))]
    elif a.setting_ab:
        var, _, text = a.setting_ab.partition("=")
        values = text.split(",")
        if not var or len(values) != 2:
            ap.error(f"--setting-ab {a.setting_ab!r}: expected VAR=A,B, e.g. KOSMOS2_ATTENTION_BLOCK=8M,1M")
    only = set(filter(None, a.only.split(",")))
    cpu = (
        next(
            (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
            platform.processor(),
        )
        if os.path.exists("/proc/cpuinfo")
        else platform.processor()
    )
    print(f"CPU: {cpu}, {os.cpu_count()} logical cores; NumPy {np.__version__}; repeats {a.repeats} (medians)")
    ab = a.threads_ab or bool(a.setting_ab)
    if ab:
        print(f"{var}: {values[0] or 'unset'} (left column) against {values[1] or 'unset'} (right column)")
    heads = ("fast, A", "fast, B", "A/B") if ab else ("reference", "fast", "ref/fast")
    print(f"{'primitive':<11s} {'case':<46s} {heads[0]:>14s} {heads[1]:>10s} {heads[2]:>9s}")
    for name, label, args in cases():
        if only and name not in only:
            continue
        if ab:
            ref, fst = (with_setting(var, value, getattr(fast, name)) for value in values)
        else:
            ref, fst = getattr(layers, name), getattr(fast, name)
        ref(*args), fst(*args)  # warm-up (and the float16 matrix remembered)
        t_ref, t_fast = [], []
        for _ in range(a.repeats):  # in turns
            t_ref += timed(ref, args, 1)
            t_fast += timed(fst, args, 1)
        r, f = statistics.median(t_ref), statistics.median(t_fast)
        print(f"{name:<11s} {label:<46s} {r * 1e3:12.2f}ms {f * 1e3:8.2f}ms {r / f:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
