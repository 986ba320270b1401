"""The benchmark script itself (benchmarks/compare.py) keeps working: a tiny run of every row, and the docs it writes.

No timing is judged here (that is the script's job, on the full model); these tests check that each figure is
measured and reported, and that the targets are attached to the right rows, for the CPU and the GPU results.
"""

from __future__ import annotations

import importlib.util
import json
import platform
from pathlib import Path

import pytest

from kosmos2_ref import fused

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    """A benchmark script loaded as a module, from benchmarks/."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def compare():
    return _script("compare")


def test_tiny_run_measures_every_row(compare, tiny_checkpoint, monkeypatch):
    folder, _ = tiny_checkpoint
    monkeypatch.setattr(compare, "checkpoint", lambda size, storage="float32": folder)
    res = compare.run("tiny", 1, 4, ["bfloat16"], False, "numpy")
    names = [r["metric"] for r in res["rows"]]
    assert names == [
        "load (from_pretrained, warm page cache)",
        "image encoding (vision + connector)",
        "time to first token (image + 71-token prefill)",
        "per-token decode (KV cache, mean of 16 steps)",
        "generate 4 new tokens (end to end)",
        "peak RSS, load + generate (GB)",
        "per-token decode, bfloat16 storage vs tf float32",
        "peak RSS, bfloat16 storage vs tf float32 (GB)",
        "tf bfloat16 peer: image encoding, ours float32",
        "tf bfloat16 peer: per-token decode, ours bfloat16",
        "tf bfloat16 peer: peak RSS (GB; tf loads float32 first), ours bfloat16",
        # last, as they leave glibc's malloc keeping freed memory in this process (not glibc: no rows)
        *(
            [
                "freed memory kept: image encoding",
                "freed memory kept: time to first token",
                "freed memory kept: per-token decode",
            ]
            if platform.libc_ver()[0] == "glibc"
            else []
        ),
    ]
    for r in res["rows"]:
        assert r["ours"] > 0 and r["transformers"] > 0, r
        assert r["ratio"] == pytest.approx(r["ours"] / r["transformers"])
    # the bfloat16 row is compared with transformers' float32 figures of the same run
    assert res["rows"][6]["transformers"] == res["rows"][3]["transformers"]
    assert res["rows"][7]["transformers"] == res["rows"][5]["transformers"]
    err = res["storage_error"]["bfloat16"]
    print(f"\n  tiny bfloat16 storage: last-token logits max|Δ| vs float32 = {err:.3e}")
    assert 0 < err < 1  # the rounding is real, and small
    assert res["backend"] == "numpy" and res["machine"]["cores"] >= 1
    # the processor and the BLAS kernel are named (#23): every figure is only comparable on the same processor
    m = res["machine"]
    assert m["cpu_model"] and isinstance(m["cpu_flags"], list) and m["cpu_caches"], m
    assert any(k.get("user_api") == "blas" and k.get("architecture") for k in m["blas_kernels"]), m["blas_kernels"]
    assert all(compare.target_for(r["metric"]) is None for r in res["rows"][8:])  # peer rows carry no target


def test_docs_name_the_gpu_and_use_its_targets(compare, tmp_path):
    machine = {
        "cpu": "x86_64",
        "cores": 16,
        "python": "3.12",
        "numpy": "2",
        "numpy_blas": "openblas",
        "torch": "2",
        "torch_threads": 16,
        "transformers": "5",
        "OPENBLAS_CORETYPE": None,
        "OPENBLAS_L2_SIZE": None,
        "commit": "abc1234",
        "gpu": "NVIDIA H100 80GB HBM3",
        "cupy": "14",
        "torch_cuda": "13.0",
        "gpu_memory_gb": 85.0,
    }

    def row(metric, ours, tf):
        return {"metric": metric, "ours": ours, "transformers": tf, "ratio": ours / tf, "unit": "s"}

    gpu = {
        "size": "full",
        "backend": "cupy",
        "machine": machine,
        "repeats": 5,
        "rows": [
            row("image encoding (vision + connector)", 0.012, 0.010),
            row("per-token decode (KV cache, mean of 16 steps)", 0.026, 0.020),
        ],
    }
    cpu = {
        "size": "full",
        "machine": {k: v for k, v in machine.items() if k not in ("gpu", "cupy", "torch_cuda", "gpu_memory_gb")},
        "repeats": 5,
        "rows": [row("image encoding (vision + connector)", 0.9, 1.0)],
        "products_alone": [{"what": "image encoding", "ours": 0.9, "ours_products": 0.7, "transformers": 1.0}],
    }
    results = tmp_path / "results"
    results.mkdir()
    (results / "full-cupy.json").write_text(json.dumps(gpu))
    (results / "full.json").write_text(json.dumps(cpu))
    # another benchmark's results in the same folder (an A/B run) are not compare.py's: left out
    (results / "code-ab-full.json").write_text(json.dumps({"machine": machine, "rows": [{"step": "x"}]}))
    out = tmp_path / "performance.md"
    compare.write_docs(results, out)
    text = out.read_text()
    assert text.index("## full\n") < text.index("## full-cupy\n") and "code-ab" not in text
    gpu_part = text[text.index("## full-cupy") :]
    assert "GPU: NVIDIA H100 80GB HBM3" in gpu_part and "eager attention" in gpu_part
    assert "Processor: x86_64 (model not recorded), 16 logical cores" in gpu_part  # a run without cpu_model
    assert "| 1.200 | ≤ 1.5 met |" in gpu_part  # image encoding: the GPU target is 1.5
    assert "| 1.300 | ≤ 1.2 **not met** |" in gpu_part  # decode: 1.2
    cpu_part = text[text.index("## full\n") : text.index("## full-cupy")]
    assert "| 0.900 | ≤ 0.8 **not met** |" in cpu_part and "GPU:" not in cpu_part
    # the floor: products alone against tf, and the whole step against its products (0.9 / 0.7 = 1.286 > 1.15)
    assert "| image encoding | 0.9000 | 0.7000 | 1.0000 | 0.700 | 1.286 (**not met**) |" in cpu_part


@pytest.mark.parametrize("form", ["weight-first", "x-first"])
def test_products_alone_replays_every_linear_layer(compare, tiny_checkpoint, monkeypatch, form):
    """The floor rows replay exactly the model's linear layers: one call per projection (the MLP's two halves
    included, which fast.feed_forward runs without fast.linear when it keeps the hidden activation transposed),
    each with its own weight and its real input; and the recording leaves the fast module as it was. In either
    product form (fast.product_form), fixed so that the replay takes the form the recorded call took."""
    import numpy as np

    from kosmos2_ref import fast, layers

    monkeypatch.setenv(fast.PRODUCT_FORM_ENV, form)

    before = {name: getattr(fast, name) for name in compare.PRODUCTS}
    folder, _ = tiny_checkpoint
    ours = compare.Ours(folder)
    cfg = ours.model.config
    pv, ids, att, img = compare.inputs()
    pv = pv[:, :, : cfg.vision_config.image_size, : cfg.vision_config.image_size]
    calls = compare.record_linears(lambda: ours.encode(pv))
    # 6 per vision block (q, k, v, out, fc1, fc2); the connector: dense, then q, k, v, out of its cross-attention
    assert len(calls) == 6 * cfg.vision_config.num_hidden_layers + 5
    vision = ours.model.params["vision_model"]["model"]["encoder"]["layers"]
    assert [id(w) for _, _, w, _ in calls[:6]] == [
        id(vision[0][a][b]["weight"])
        for a, b in (
            ("self_attn", "q_proj"),
            ("self_attn", "k_proj"),
            ("self_attn", "v_proj"),
            ("self_attn", "out_proj"),
            ("mlp", "fc1"),
            ("mlp", "fc2"),
        )
    ]
    mlp = [fast.product_to_columns, fast.product_from_columns] if form == "weight-first" else [fast.linear] * 2
    assert [getattr(c[0], "func", c[0]) for c in calls[:6]] == [fast.head_projection] * 3 + [fast.linear] + mlp
    assert calls[0][1].shape == (
        1,
        1 + (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2,
        cfg.vision_config.hidden_size,
    )
    assert {name: getattr(fast, name) for name in compare.PRODUCTS} == before
    # the inputs are the real ones: the last call (the connector's out_proj) replayed gives the image embeddings
    product, x, w, b = calls[-1]
    np.testing.assert_array_equal(product(x, w, b), ours.encode(pv))
    # a replayed head projection gives heads: the first block's queries, as the textbook splits them
    product, x, w, b = calls[0]
    heads = product(x, w, b)
    ref = layers.head_projection(x, w, b, cfg.vision_config.num_attention_heads)
    assert heads.shape == ref.shape and heads.shape[1] == cfg.vision_config.num_attention_heads
    np.testing.assert_allclose(heads, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # a decode step: 6 per decoder block and the LM head, one row each
    step = compare.decode_step(ours)
    calls = compare.record_linears(step)
    assert len(calls) == 6 * cfg.text_config.layers + 1
    assert all(x.shape[:-1] == (1, 1) for _, x, _, _ in calls)
    whole, products = compare.products_alone(ours, step, 2)
    assert whole > 0 and products > 0


def test_step_profile_splits_each_step(tmp_path, capsys):
    """benchmarks/step_profile.py on the tiny checkpoint: every step split into its products, the timed parts
    and the rest (adding up to the whole), with the irreducible pieces and the bfloat16 widening alone."""
    out = tmp_path / "profile.json"
    assert _script("step_profile").main(["--size", "tiny", "--repeats", "1", "--out", str(out)]) == 0
    steps = {row["step"]: row for row in json.loads(out.read_text())["steps"]}
    assert list(steps) == [
        "image encoding",
        "time to first token",
        "per-token decode",
        "per-token decode, bfloat16 storage",
    ]
    for row in steps.values():
        assert row["whole"] > 0 and row["products"] > 0 and row["attention"] > 0 and row["exps"] > 0
        parts = row["products"] + row["rest"] + sum(row.get(k, 0.0) for k in ("attention", "layer_norm", "activation"))
        assert abs(parts - row["whole"]) < 1e-9
    assert steps["image encoding"]["exps"] < steps["time to first token"]["exps"]  # the text GELU's exps too
    two_byte = steps["per-token decode, bfloat16 storage"]
    assert two_byte["whole / float32 whole"] > 0 and two_byte["products / float32 products"] > 0
    assert two_byte["two-byte products"] == fused.how()
    assert ("widening alone" in two_byte) == (not fused.available())
    assert "floor x" in capsys.readouterr().out


def test_step_profile_times_the_widening_alone_where_the_products_widen_in_blocks(tmp_path, monkeypatch):
    """With KOSMOS2_FUSED=off the bfloat16 token's products widen in blocks, and the profile adds the widening
    by itself."""
    monkeypatch.setenv(fused.FUSED_ENV, "off")
    out = tmp_path / "profile.json"
    assert _script("step_profile").main(["--size", "tiny", "--repeats", "1", "--out", str(out)]) == 0
    two_byte = json.loads(out.read_text())["steps"][-1]
    assert two_byte["widening alone"] > 0 and "KOSMOS2_FUSED=off" in two_byte["two-byte products"]


def test_code_ab_runs_two_checkouts_in_turns(tmp_path):
    """benchmarks/code_ab.py with this checkout as both sides: one process per side and round, both steps."""
    out = tmp_path / "ab.json"
    argv = ["--a", str(ROOT), "--b", str(ROOT), "--size", "tiny", "--rounds", "1", "--repeats", "1", "--out", str(out)]
    assert _script("code_ab").main(argv) == 0
    result = json.loads(out.read_text())
    assert [r["step"] for r in result["rows"]] == ["image encoding", "time to first token"]
    assert all(r["A"] > 0 and r["B"] > 0 for r in result["rows"])
    with pytest.raises(SystemExit, match="no kosmos2_ref package"):
        _script("code_ab").main(["--a", str(tmp_path), "--b", str(ROOT), "--size", "tiny"])


# ------------------------------------------------------------------------------------------------------------------
# benchmarks/gpu_check.sh (issue #20): the one-go GPU check. Its real run needs a GPU; here only what is cheap.

GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"
GPU_STAGES = [
    "00_install",
    "01_versions",
    "02_cupy_tiny",
    "03_checkpoint",
    "04_cupy_full",
    "05_benchmark",
    "06_parity_on_cupy",
]


def test_gpu_check_script_parses_and_names_every_stage():
    import subprocess

    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    text = GPU_CHECK.read_text()
    for name in GPU_STAGES:
        assert text.count(name) >= 2, name  # in the header's list and where it runs
    for command in ("tests/parity/test_cupy.py", "benchmarks/compare.py", "--backend", "KOSMOS2_BACKEND=cupy"):
        assert command in text, command
    assert "set -u" in text and "set -e" not in text  # fail-soft: a stage's failure must not end the script


def test_gpu_check_script_writes_its_summary_when_no_time_is_left(tmp_path):
    """With a budget too small for any stage, every stage is recorded as skipped and summary.json is valid JSON
    naming them all in order: the bookkeeping works without running anything."""
    import os
    import subprocess

    env = dict(os.environ, GPU_CHECK_BUDGET="5")
    r = subprocess.run(["bash", str(GPU_CHECK), str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == GPU_STAGES
    assert all(s["status"] == "skipped" for s in summary["stages"]), summary
    assert all((tmp_path / "out" / f"{name}.log").is_file() for name in GPU_STAGES)
