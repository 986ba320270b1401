"""Where a model step's time goes outside its linear-layer products, and how much of it is irreducible here.

For image encoding, time to first token and a decoded token (float32, and a bfloat16-storage token), one process:

* whole: the step, median of ``--repeats``;
* products: its linear-layer products replayed alone (compare.py's floor, timed in turns with the whole step);
* the time inside attention, LayerNorm and the activations (timed around each fast primitive, outermost call
  only; the median of ``--repeats`` calls each), and the rest (residual adds, embeddings, head splits, Python);
* two pieces of that no rearrangement removes: attention's own two products per head (q kᵀ and p v, replayed
  alone on the recorded q, k, v) and one ``np.exp`` per softmax score and per quick-GELU input (NumPy's
  float32 exp over as many elements, in cache-sized blocks);
* for bfloat16 storage: the token and its products against the float32 token's (issue #23's ratio); where the
  2-byte products widen in blocks (no Numba, or ``KOSMOS2_FUSED=off``), also the widening alone
  (``fast.widen_pairs`` over every 2-byte matrix of the step, no product, its blocks shared among the threads
  as the products share them), against the float32 token's products.

    python benchmarks/step_profile.py --size full --repeats 5

Results go to benchmarks/results/step-profile-<size>.json (with compare.machine()).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TIMED = {  # fast's functions timed, and the part they count towards
    "attention": "attention",
    "layer_norm": "layer_norm",
    "_layer_norm_columns": "layer_norm",
    "gelu": "activation",
    "quick_gelu": "activation",
    "_in_cache_sized_blocks": "activation",
}


def parts_of(fn, repeats: int = 1) -> tuple[dict, list]:
    """Seconds inside each part of ``fn()``, the median over ``repeats`` calls (one call's parts moved by up to 2x
    on a noisy VM, against the median of the whole step they are set beside), and every attention call's (q, k, v)
    of the first call, as it was."""
    from kosmos2_ref import fast

    calls, attention_inputs, depth = [], [], [0]
    spent = defaultdict(float)  # the call being timed
    saved = {name: getattr(fast, name) for name in TIMED}
    activations = dict(fast.ACTIVATIONS)  # feed_forward's few-rows path looks them up here

    def timer(name, f):
        def timed(*args, **kwargs):
            if name == "attention" and not depth[0] and not calls:  # the first call's, outermost
                attention_inputs.append(tuple(a.copy() for a in args[:3]))
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    spent[TIMED[name]] += time.perf_counter() - t0

        return timed

    try:
        for name, f in saved.items():
            setattr(fast, name, timer(name, f))
        fast.ACTIVATIONS.update({name: timer(name, f) for name, f in activations.items()})
        for _ in range(repeats):
            spent.clear()
            fn()
            calls.append(dict(spent))
    finally:
        for name, f in saved.items():
            setattr(fast, name, f)
        fast.ACTIVATIONS.update(activations)
    parts = {part for call in calls for part in call}
    return {part: statistics.median(call.get(part, 0.0) for call in calls) for part in parts}, attention_inputs


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def irreducible(attention_inputs, activation_elements: int, repeats: int) -> dict:
    """Attention's own products replayed alone, and np.exp over one element per score and activation input."""
    from kosmos2_ref import fast

    def products():
        for q, k, v in attention_inputs:
            p = q @ k.swapaxes(-1, -2)  # [B, H, T, D] @ [B, H, D, S] -> [B, H, T, S]
            p @ v  # [B, H, T, S] @ [B, H, S, D] -> [B, H, T, D]

    n = sum(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] for q, k, _ in attention_inputs) + activation_elements
    block = fast.ELEMENTWISE_BLOCK
    src = -np.abs(np.random.default_rng(0).standard_normal(block, dtype=np.float32))  # [block], softmax-like
    dst = np.empty_like(src)

    def exps():
        for _ in range(-(-n // block)):
            np.exp(src, out=dst)

    products()
    return {"attention products": median_time(products, repeats), "exp": median_time(exps, repeats), "exps": n}


def widening_alone(calls, repeats: int) -> float:
    """fast.widen_pairs over every 2-byte weight of the recorded products, block by block, no product; the blocks
    shared among the threads as the few-row products share them (fast.over_row_blocks)."""
    from kosmos2_ref import fast

    weights = [w for _, _, w, _ in calls if w.dtype != np.float32 and w.ndim == 2 and w.shape[1] % 2 == 0]

    def widen():
        for w in weights:
            N, K = w.shape
            block = max(1, fast.upcast_block_bytes(True) // (4 * K))
            fast.over_row_blocks(
                lambda r, n, w=w, K=K: fast.widen_pairs(w[r : r + n], *fast._scratch(n, K // 2)),
                N,
                block,
                shared=True,
                elements=N * K,
            )

    widen()
    return median_time(widen, repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here (default: results/)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import compare as cmp

    info = cmp.machine()
    print(cmp.describe_machine(info), flush=True)
    folder = cmp.checkpoint(a.size)
    ours, ours16 = cmp.Ours(folder), cmp.Ours(folder, "bfloat16")
    pv, ids, att, img = cmp.inputs()
    if a.size == "tiny":
        s = ours.model.config.vision_config.image_size
        pv = pv[:, :, :s, :s]
    vision = ours.model.config.vision_config
    patches = 1 + (vision.image_size // vision.patch_size) ** 2
    text = ours.model.config.text_config
    quick_gelu_inputs = vision.num_hidden_layers * patches * vision.intermediate_size  # one exp per element
    gelu_inputs = text.layers * text.ffn_dim  # per token: GELU takes one exp per element (either form)
    steps = [
        ("image encoding", ours, lambda: ours.encode(pv), quick_gelu_inputs),
        (
            "time to first token",
            ours,
            lambda: ours.prefill(pv, ids, att, img),
            quick_gelu_inputs + ids.shape[1] * gelu_inputs,
        ),
        ("per-token decode", ours, cmp.decode_step(ours), gelu_inputs),
        ("per-token decode, bfloat16 storage", ours16, cmp.decode_step(ours16), gelu_inputs),
    ]
    from kosmos2_ref import fused

    rows, f32_decode = [], {}
    for what, side, fn, act_exps in steps:
        whole, products = cmp.products_alone(side, fn, a.repeats)
        spent, attention_inputs = parts_of(fn, a.repeats)
        row = {"step": what, "whole": whole, "products": products, **spent}
        row["rest"] = whole - products - sum(spent.values())
        row.update(irreducible(attention_inputs, act_exps, a.repeats))
        if what == "per-token decode":
            f32_decode = {"whole": whole, "products": products}
        if "bfloat16" in what:
            row["two-byte products"] = fused.how()
            row["whole / float32 whole"] = whole / f32_decode["whole"]
            row["products / float32 products"] = products / f32_decode["products"]
            if not fused.available():  # widened in blocks: the widening by itself
                row["widening alone"] = widening_alone(cmp.record_linears(fn), a.repeats)
                row["widening / float32 products"] = row["widening alone"] / f32_decode["products"]
        rows.append(row)
        floor = (products + row["attention products"] + row["exp"]) / products
        print(
            f"{what}: whole {whole:.3f} s = products {products:.3f} s x {whole / products:.3f}; outside them: "
            + ", ".join(f"{k} {spent.get(k, 0.0):.3f}" for k in ("attention", "layer_norm", "activation"))
            + f", rest {row['rest']:.3f}; irreducible: attention products {row['attention products']:.3f} s, "
            f"{row['exps'] / 1e6:.1f} M exps {row['exp']:.3f} s -> floor x {floor:.3f}"
            + (
                f"; {row['whole / float32 whole']:.3f} x the float32 token, its products "
                f"{row['products / float32 products']:.3f} x the float32 token's ({row['two-byte products']})"
                if "two-byte products" in row
                else ""
            )
            + (
                f"; widening alone {row['widening alone']:.3f} s = "
                f"{row['widening / float32 products']:.2f} x the float32 token's products"
                if "widening alone" in row
                else ""
            ),
            flush=True,
        )
    out = a.out or HERE / "results" / f"step-profile-{a.size}.json"
    out.write_text(json.dumps({"machine": info, "repeats": a.repeats, "steps": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
