"""The batch jobs on Ray (kosmos2_ref/ray_jobs.py, issue #21 item 3), on a local Ray started by the tests
(``ray.init(num_cpus=2)``, shut down after): the same outputs as the single-process jobs, and a worker that dies
once mid-run still gives complete output with every image exactly once.

Skipped where Ray Data is not installed (``pip install 'kosmos2-ref[ray]'``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from fixtures_tokenizer import IMAGES  # noqa: E402

from kosmos2_ref import Kosmos2, cli, jobs, ray_jobs  # noqa: E402

DOGS = IMAGES / "two_dogs.jpg"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return str(tiny_checkpoint[0])


@pytest.fixture
def folder(tmp_path) -> Path:
    """Nine images (noise, so the rows differ), a truncated JPEG and a text file called .png."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(9):
        PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "05_truncated.jpg").write_bytes(DOGS.read_bytes()[:5000])
    (folder / "07_text.png").write_text("not an image")
    return folder


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def records(path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "seconds"} for line in Path(path).read_text().splitlines()
    ]


def test_ray_gives_the_single_process_outputs(capsys, ckpt, folder, tmp_path):
    common = ["--model", ckpt, "--max-new-tokens", "6"]
    assert run(capsys, *common, "caption", folder, "--batch-size", "3", "--out", tmp_path / "local.jsonl")[0] == 0
    code, out, err = run(
        capsys,
        *common,
        "caption",
        folder,
        "--batch-size",
        "3",
        "--engine",
        "ray",
        "--workers",
        "2",
        "--out",
        tmp_path / "ray.jsonl",
    )
    assert code == 0, err
    local, on_ray = records(tmp_path / "local.jsonl"), records(tmp_path / "ray.jsonl")
    assert len(local) == 11 and sum(r["status"] == "error" for r in local) == 2
    assert on_ray == local

    assert run(capsys, "--model", ckpt, "embed", folder, "--out", tmp_path / "local.npy")[0] == 0
    code, out, err = run(
        capsys, "--model", ckpt, "embed", folder, "--out", tmp_path / "ray.npy", "--engine", "ray", "--batch-size", "4"
    )
    assert code == 0, err
    assert records(tmp_path / "ray.index.jsonl") == records(tmp_path / "local.index.jsonl")
    for name in ("{}.npy", "{}.pooled.npy"):
        a, b = np.load(tmp_path / name.format("local")), np.load(tmp_path / name.format("ray"))
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * np.abs(a).max())  # other batches: BLAS rounding


def test_a_worker_that_dies_once_still_gives_every_image_exactly_once(ckpt, folder, tmp_path):
    paths = jobs.collect_inputs([folder])
    job = jobs.TextJob.caption("<grounding> An image of", 6)
    expected = tmp_path / "local.jsonl"
    out = jobs.RecordFile(str(expected))
    jobs.run_text_job(Kosmos2.from_pretrained(ckpt), None, job, paths, out, batch_size=2)
    out.close()

    fault = tmp_path / "worker-died"
    out = jobs.RecordFile(str(tmp_path / "ray.jsonl"))
    outcome = ray_jobs.run_text_job(ckpt, job, paths, out, batch_size=2, workers=2, fault_once=str(fault))
    out.close()
    assert fault.is_file()  # a worker did exit mid-batch
    got = records(tmp_path / "ray.jsonl")
    assert [r["path"] for r in got] == paths  # all of them, once each, in order
    assert got == records(expected)
    assert outcome.done == len(paths) and outcome.errors == 2

    # embeddings too: the dead worker's rows are written once, complete
    files = jobs.EmbeddingFiles(str(tmp_path / "e.npy"), paths, (64, 32), (32,))
    fault.unlink()
    ray_jobs.run_embed_job(ckpt, paths, files, batch_size=3, workers=2, fault_once=str(fault))
    files.close()
    assert fault.is_file()
    index = records(tmp_path / "e.index.jsonl")[1:]
    assert [r["row"] for r in index] == list(range(len(paths)))
    assert np.load(tmp_path / "e.npy")[[r["row"] for r in index if r["status"] == "ok"]].any(axis=(1, 2)).all()


def test_ray_option_errors(capsys, ckpt, folder, tmp_path):
    code, _, err = run(capsys, "--model", ckpt, "caption", folder, "--workers", "0")
    assert code == 2 and "--workers" in err
    code, _, err = run(capsys, "--model", ckpt, "caption", folder, "--address", "auto")
    assert code == 2 and "--address is for --engine ray" in err
    code, _, err = run(capsys, "--model", ckpt, "embed", folder, "--engine", "ray", "--out", tmp_path / "e.npz")
    assert code == 2 and "FILE.npy" in err
