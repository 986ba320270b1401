"""The benchmark script itself (benchmarks/compare.py) keeps working: a tiny run of every row, and the docs it writes.

No timing is judged here (that is the script's job, on the full model); these tests check that each figure is
measured and reported, and that the targets are attached to the right rows, for the CPU and the GPU results.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_measures_every_row(compare, tiny_checkpoint, monkeypatch):
    folder, _ = tiny_checkpoint
    monkeypatch.setattr(compare, "checkpoint", lambda size, storage="float32": folder)
    res = compare.run("tiny", 1, 4, ["bfloat16"], False, "numpy")
    names = [r["metric"] for r in res["rows"]]
    assert names == ["load (from_pretrained, warm page cache)", "image encoding (vision + connector)",
                     "time to first token (image + 71-token prefill)",
                     "per-token decode (KV cache, mean of 16 steps)", "generate 4 new tokens (end to end)",
                     "peak RSS, load + generate (GB)", "per-token decode, bfloat16 storage vs tf float32",
                     "peak RSS, bfloat16 storage vs tf float32 (GB)"]
    for r in res["rows"]:
        assert r["ours"] > 0 and r["transformers"] > 0, r
        assert r["ratio"] == pytest.approx(r["ours"] / r["transformers"])
    # the bfloat16 row is compared with transformers' float32 figures of the same run
    assert res["rows"][6]["transformers"] == res["rows"][3]["transformers"]
    assert res["rows"][7]["transformers"] == res["rows"][5]["transformers"]
    err = res["storage_error"]["bfloat16"]
    print(f"\n  tiny bfloat16 storage: last-token logits max|Δ| vs float32 = {err:.3e}")
    assert 0 < err < 1                   # the rounding is real, and small
    assert res["backend"] == "numpy" and res["machine"]["cores"] >= 1


def test_docs_name_the_gpu_and_use_its_targets(compare, tmp_path):
    machine = {"cpu": "x86_64", "cores": 16, "python": "3.12", "numpy": "2", "numpy_blas": "openblas",
               "torch": "2", "torch_threads": 16, "transformers": "5", "OPENBLAS_CORETYPE": None,
               "OPENBLAS_L2_SIZE": None, "commit": "abc1234", "gpu": "NVIDIA H100 80GB HBM3", "cupy": "14",
               "torch_cuda": "13.0", "gpu_memory_gb": 85.0}

    def row(metric, ours, tf):
        return {"metric": metric, "ours": ours, "transformers": tf, "ratio": ours / tf, "unit": "s"}

    gpu = {"size": "full", "backend": "cupy", "machine": machine, "repeats": 5,
           "rows": [row("image encoding (vision + connector)", 0.012, 0.010),
                    row("per-token decode (KV cache, mean of 16 steps)", 0.026, 0.020)]}
    cpu = {"size": "full", "machine": {k: v for k, v in machine.items() if k not in ("gpu", "cupy", "torch_cuda",
                                                                                       "gpu_memory_gb")},
           "repeats": 5, "rows": [row("image encoding (vision + connector)", 0.9, 1.0)]}
    results = tmp_path / "results"
    results.mkdir()
    (results / "full-cupy.json").write_text(json.dumps(gpu))
    (results / "full.json").write_text(json.dumps(cpu))
    out = tmp_path / "performance.md"
    compare.write_docs(results, out)
    text = out.read_text()
    assert text.index("## full\n") < text.index("## full-cupy\n")
    gpu_part = text[text.index("## full-cupy"):]
    assert "GPU: NVIDIA H100 80GB HBM3" in gpu_part and "eager attention" in gpu_part
    assert "| 1.200 | ≤ 1.5 met |" in gpu_part                      # image encoding: the GPU target is 1.5
    assert "| 1.300 | ≤ 1.2 **not met** |" in gpu_part               # decode: 1.2
    cpu_part = text[text.index("## full\n"):text.index("## full-cupy")]
    assert "| 0.900 | ≤ 0.8 **not met** |" in cpu_part and "GPU:" not in cpu_part
