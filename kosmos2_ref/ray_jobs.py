"""The batch jobs on Ray (optional extra ``ray``: ``pip install 'kosmos2-ref[ray]'``): ``--engine ray``.

The same jobs as :mod:`kosmos2_ref.jobs`, with the batches computed by a pool of Ray actors instead of this
process. A Ray Data pipeline::

    from_items(paths) -> map_batches(worker class, concurrency=N, num_gpus=1 each with backend="cupy")

Each worker (a callable class) loads the model once, in its constructor, and turns a batch of paths into records
(or embedding rows) with the very functions the local loop uses (:func:`~kosmos2_ref.jobs.text_batch_records`,
:func:`~kosmos2_ref.jobs.embed_batch`). The driver -- this process -- receives the batches in input order
(``preserve_order``) and writes them with the local writers, so the outputs are the same files, byte for byte
apart from ``seconds``, as a local run's, ``--resume`` included.

Fault tolerance is Ray's: a worker that dies is restarted and its batch retried (Ray Data's defaults for
actor pools). Every image is written exactly once: the driver writes each path once, whatever a retry
hands it again. The images must be readable by every worker under the same path (one machine, or a shared file
system on a cluster).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from . import jobs, machine, tasks
from .model import Kosmos2


def import_ray():
    """``ray`` and ``ray.data``, or a JobError saying how to install them."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is a separate import)
    except ImportError as exc:
        raise jobs.JobError(f"--engine ray needs Ray Data: pip install 'kosmos2-ref[ray]' ({exc})") from None
    return ray


class _Worker:
    """What a Ray actor runs: the model, loaded once, and one batch at a time.

    ``fault_once`` is for tests: the first worker to create that file (atomically) exits its process abruptly in
    the middle of its batch, as a machine that dies would, so that Ray's restart and retry can be seen to work.
    """

    def __init__(self, model_path: str, backend: str | None, dtype: str, on_error: str, fault_once: str | None = None):
        machine.keep_freed_memory_unless_told_not_to()  # the actor's process is the job's own, as the CLI's is
        self.model = Kosmos2.from_pretrained(model_path, backend=backend, dtype=dtype)
        self.processor = tasks.model_processor(self.model)
        self.on_error = on_error
        self.fault_once = fault_once

    def _maybe_die(self) -> None:
        if self.fault_once is None:
            return
        try:
            os.close(os.open(self.fault_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)


class TextWorker(_Worker):
    def __init__(self, job: dict, **kwargs):
        super().__init__(**kwargs)
        self.job = jobs.TextJob(**job)

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["path"]]
        self._maybe_die()
        records = jobs.text_batch_records(self.model, self.processor, self.job, paths, self.on_error)
        return {"path": np.array(paths), "record": np.array([json.dumps(r, ensure_ascii=False) for r in records])}


class EmbedWorker(_Worker):
    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["path"]]
        self._maybe_die()
        entries, embeds, pooled = jobs.embed_batch(self.model, self.processor, paths, "record")
        return {
            "row": np.asarray(batch["row"]),
            "entry": np.array([json.dumps(e) for e in entries]),
            "embeds": embeds,
            "pooled": pooled,
        }


def _ensure_ray(address: str | None, num_cpus: int | None = None):
    """Ray, started here (and to be shut down by the caller: the bool) unless already running in this process."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    return ray, True


def _quiet_data_context(ray) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # batches come back in input order
    ctx.enable_progress_bars = False  # ours is on stderr already


def _map(ray, items: list[dict], worker, constructor_kwargs: dict, batch_size: int, workers: int, gpu: bool):
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch_size)))
    # Ray Data restarts a dead actor of the pool and retries its batch by default (max_restarts and
    # max_task_retries of -1 for actor pools); the fault test proves it.
    return ds.map_batches(
        worker,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if gpu else 0,
        batch_format="numpy",
    )


def _worker_kwargs(args_model: str, backend: str | None, dtype: str, on_error: str, fault_once) -> dict:
    # the worker resolves the model itself; a folder is made absolute so that it does not depend on its cwd
    model = str(Path(args_model).resolve()) if Path(args_model).exists() else args_model
    return {"model_path": model, "backend": backend, "dtype": dtype, "on_error": on_error, "fault_once": fault_once}


def run_text_job(
    model_path: str,
    job: jobs.TextJob,
    paths: list[str],
    records: jobs.RecordFile,
    *,
    backend: str | None = None,
    dtype: str = "float32",
    batch_size: int = jobs.TEXT_BATCH_SIZE,
    workers: int = 2,
    address: str | None = None,
    on_error: str = "record",
    progress: jobs.Progress | None = None,
    stop: jobs.StopOnInterrupt | None = None,
    fault_once: str | None = None,
) -> jobs.JobOutcome:
    """:func:`kosmos2_ref.jobs.run_text_job` with the batches computed by ``workers`` Ray actors."""
    ray, started = _ensure_ray(address)
    try:
        _quiet_data_context(ray)
        pending = [p for p in paths if p not in records.done]
        outcome = jobs.JobOutcome(total=len(paths), done=len(paths) - len(pending), errors=0)
        start = time.perf_counter()
        if pending:
            kwargs = {"job": vars(job), **_worker_kwargs(model_path, backend, dtype, on_error, fault_once)}
            ds = _map(ray, [{"path": p} for p in pending], TextWorker, kwargs, batch_size, workers, backend == "cupy")
            written: set[str] = set()
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                batch_records = [json.loads(r) for r in batch["record"]]
                batch_records = [r for r in batch_records if r["path"] not in written]  # exactly once
                for record in batch_records:
                    if on_error == "stop" and record["status"] == "error":
                        raise jobs.JobStopped(
                            f"{record['error']} (--on-error stop; fix or remove it, then run again with --resume)"
                        )
                    records.write(record)
                    written.add(record["path"])
                if jobs.count_batch(outcome, batch_records, progress, stop):
                    break
        outcome.seconds = time.perf_counter() - start
        return outcome
    finally:
        if started:
            ray.shutdown()


def run_embed_job(
    model_path: str,
    paths: list[str],
    files: jobs.EmbeddingFiles,
    *,
    backend: str | None = None,
    dtype: str = "float32",
    batch_size: int = jobs.EMBED_BATCH_SIZE,
    workers: int = 2,
    address: str | None = None,
    on_error: str = "record",
    progress: jobs.Progress | None = None,
    stop: jobs.StopOnInterrupt | None = None,
    fault_once: str | None = None,
) -> jobs.JobOutcome:
    """:func:`kosmos2_ref.jobs.run_embed_job` with the batches computed by ``workers`` Ray actors; this process
    writes the rows as they arrive."""
    ray, started = _ensure_ray(address)
    try:
        _quiet_data_context(ray)
        pending = [row for row in range(len(paths)) if row not in files.done]
        outcome = jobs.JobOutcome(total=len(paths), done=len(paths) - len(pending), errors=files.errors)
        start = time.perf_counter()
        if pending:
            kwargs = _worker_kwargs(model_path, backend, dtype, "record", fault_once)
            ds = _map(
                ray,
                [{"row": r, "path": paths[r]} for r in pending],
                EmbedWorker,
                kwargs,
                batch_size,
                workers,
                backend == "cupy",
            )
            written: set[int] = set()
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                fresh = [j for j, row in enumerate(batch["row"]) if int(row) not in written]  # exactly once
                rows = [int(batch["row"][j]) for j in fresh]
                entries = [json.loads(batch["entry"][j]) for j in fresh]
                for entry in entries:
                    if on_error == "stop" and entry["status"] == "error":
                        raise jobs.JobStopped(
                            f"{entry['error']} (--on-error stop; fix or remove it, then run again with --resume)"
                        )
                jobs.write_embed_rows(files, rows, entries, batch["embeds"][fresh], batch["pooled"][fresh])
                written.update(rows)
                if jobs.count_batch(outcome, entries, progress, stop):
                    break
        outcome.seconds = time.perf_counter() - start
        return outcome
    finally:
        if started:
            ray.shutdown()
