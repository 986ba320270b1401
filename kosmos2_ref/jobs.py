"""Batch jobs over many images: the machinery behind ``caption``, ``ground``, ``describe`` and ``embed`` when they
are given several images, a folder or a list.

A job is a loop over batches of images that writes its results to disk as each batch finishes, so that

* memory stays flat whatever the number of images (nothing is kept once written),
* a bad image becomes an error record (or stops the run with ``--on-error stop``), never a lost run,
* a run that is killed leaves valid output for everything finished, and ``--resume`` skips what is done.

The pieces, in the order a run uses them:

* :func:`collect_inputs` -- files, folders (``recursive``) and a list file -> the ordered list of image paths.
* :class:`RecordFile` -- JSON Lines output (one record per image, flushed per record), resumable.
* :class:`EmbeddingFiles` -- ``FILE.npy`` [N, 64, C] and ``FILE.pooled.npy`` [N, D] filled row by row with
  ``os.pwrite`` at their offsets, and ``FILE.index.jsonl`` saying which rows are complete.
* :func:`run_text_job` / :func:`run_embed_job` -- the batch loops; :class:`Progress` and :class:`StopOnInterrupt`
  report and stop them.

Records of the text jobs::

    {"path", "status": "ok", "job", "prompt", "text", "caption",
     "entities": [{phrase, span, boxes, pixel_boxes, confidence}], "image_size", <the job's own fields>, "seconds"}
    {"path", "status": "error", "job", "error": "<one-line message>"}

``seconds`` is the record's share of its batch's wall time (load, preprocess, generate, decode). ``confidence`` is
how probable the entity's tokens were when the model chose them (:mod:`kosmos2_ref.confidence`): ``{"phrase",
"object", "boxes": [{"probability", "upper_left", "lower_right"}]}``, None where the prompt gave a token; an
entity the tokens do not explain gets ``null``. More fields can be added to ok records by passing ``annotate`` to
:func:`run_text_job`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from . import tasks
from .backend import to_numpy
from .confidence import run_confidences
from .processing.grounding import box_to_pixels, entities_to_pixel_boxes
from .processing.image import load_image

# The files a folder's walk takes as images (by extension, case-insensitive).
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}

ON_ERROR_CHOICES = ("record", "stop")
ENGINES = ("local", "ray")
TEXT_BATCH_SIZE = 4  # generation keeps a KV cache per row: smaller batches than embed
EMBED_BATCH_SIZE = 8
INDEX_FORMAT = "kosmos2-ref embed index 1"


class JobError(ValueError):
    """A problem with a job's inputs or outputs, reported as one line (the CLI prints it and exits with 2)."""


class JobStopped(JobError):
    """``--on-error stop``: an image could not be read, so the run stops before its batch is computed."""


def _one_line(text) -> str:
    return " ".join(str(text).split())


def note(message: str) -> None:
    """A one-line note on stderr (not an error: the run goes on)."""
    print(f"kosmos2-ref: note: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class _Skipped:
    """What folders held that is not an image to process, counted for one note each."""

    other_files: int = 0
    sub_folders: int = 0
    duplicates: int = 0


def _folder_images(folder: Path, recursive: bool, skipped: _Skipped, seen_folders: set) -> Iterator[Path]:
    """The image files of ``folder`` sorted by name, hidden entries skipped; sub-folders (in the same name order)
    only when ``recursive``. A folder reached twice (a symbolic link loop) is walked once."""
    real = os.path.realpath(folder)
    if real in seen_folders:
        return
    seen_folders.add(real)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise JobError(f"cannot read folder {str(folder)!r}: {exc.strerror or _one_line(exc)}") from exc
    extensions = IMAGE_EXTENSIONS
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = folder / entry.name
        if entry.is_dir():
            if recursive:
                yield from _folder_images(path, recursive, skipped, seen_folders)
            else:
                skipped.sub_folders += 1
        elif entry.is_file():
            if path.suffix.lower() in extensions:
                yield path
            else:
                skipped.other_files += 1


def read_list_file(list_file: str) -> list[Path]:
    """The paths of a list file: one per line, relative to the list file's folder; blank lines and ``#``
    comments skipped."""
    path = Path(list_file).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise JobError(f"--list {list_file!r}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"--list {list_file!r}: cannot read it as UTF-8 text: {_one_line(exc)}") from exc
    base = path.parent
    entries = (line.strip() for line in lines)
    return [base / Path(entry).expanduser() for entry in entries if entry and not entry.startswith("#")]


def collect_inputs(items: Iterable[str], recursive: bool = False, list_file: str | None = None) -> list[str]:
    """The images a job runs over, in order: each item of ``items`` (a file, or a folder's image files sorted by
    name), then the entries of ``list_file``. A path named twice is processed once.

    A positional path that does not exist is an error now (a typo); a listed path that does not exist is kept and
    becomes an error record (lists are often long and generated). Files named explicitly are taken whatever their
    extension; in folders only files with an image extension are, and the others are counted in one note.
    """
    skipped = _Skipped()
    seen_folders: set = set()
    paths: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            paths.extend(_folder_images(p, recursive, skipped, seen_folders))
        elif p.exists():
            paths.append(p)
        else:
            raise JobError(f"image not found: {item!r}")
    if list_file is not None:
        for p in read_list_file(list_file):
            paths.extend(_folder_images(p, recursive, skipped, seen_folders) if p.is_dir() else [p])
    unique = list(dict.fromkeys(os.path.normpath(p) for p in paths))
    skipped.duplicates = len(paths) - len(unique)
    _note_skipped(skipped)
    if not unique:
        raise JobError(
            "no images to process: the folders given hold no image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
            + (" (pass --recursive to include their sub-folders)" if skipped.sub_folders else "")
        )
    return unique


def _note_skipped(skipped: _Skipped) -> None:
    if skipped.other_files:
        note(
            f"skipped {skipped.other_files} file(s) in the folders given without an image extension "
            f"({' '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    if skipped.sub_folders:
        note(f"skipped {skipped.sub_folders} sub-folder(s) (pass --recursive to include them)")
    if skipped.duplicates:
        note(f"{skipped.duplicates} path(s) named more than once are processed once")


# ----------------------------------------------------------------------------------------------------------------
# JSON Lines output


def _complete_lines(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """(line number, line, offset after it) for every complete (newline-ended) line of ``path``, read as a stream
    so that a large output is never held in memory."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return
            offset += len(line)
            yield number, line, offset


def _read_records(path: Path, what: str) -> Iterator[tuple[dict, int]]:
    """(record, offset after it) for each complete JSON line of ``path``; a JobError naming the line when one is
    not a JSON object (the file is not our output)."""
    for number, line, offset in _complete_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise JobError(f"{what} {str(path)!r}: line {number} is not a JSON record; is it a kosmos2-ref output?")
        yield record, offset


def _truncate_partial_line(path: Path, complete_end: int) -> None:
    """Drop what follows the last complete line: a record a killed run was writing."""
    if path.stat().st_size > complete_end:
        with open(path, "r+b") as f:
            f.truncate(complete_end)


def _refuse_existing(option: str, path: Path) -> None:
    if path.is_file() and path.stat().st_size > 0:
        raise JobError(f"{option} {str(path)!r} already exists; pass --resume to continue it, or remove it")


class RecordFile:
    """JSON Lines output, one record per image, each flushed as it is written (stdout when ``path`` is None).

    With ``resume``, the existing file is read first: a trailing partial line (a run killed mid-write) is dropped,
    and :attr:`done` holds the path of every record (ok or error), which the job then skips. Without it, a
    non-empty existing file is refused rather than overwritten.
    """

    def __init__(self, path: str | None, resume: bool = False, job: str | None = None, prompt: str | None = None):
        self.path = Path(path).expanduser() if path else None
        self.done: set[str] = set()
        if self.path is None:
            if resume:
                raise JobError("--resume needs --out FILE.jsonl (the output to continue)")
            self._file = sys.stdout
            return
        if resume and self.path.is_file():
            self._load_done(job, prompt)
        elif not resume:
            _refuse_existing("--out", self.path)
        try:
            self._file = open(self.path, "a" if resume else "w", encoding="utf-8")
        except OSError as exc:
            raise JobError(f"--out {str(self.path)!r}: cannot write it: {exc.strerror or _one_line(exc)}") from exc

    def _load_done(self, job: str | None, prompt: str | None) -> None:
        end = 0
        for record, end in _read_records(self.path, "--out"):  # noqa: B007 (end is read after the loop)
            if "path" not in record:
                raise JobError(f'--out {str(self.path)!r}: a record has no "path"; is it a kosmos2-ref output?')
            if job is not None and record.get("job", job) != job:
                raise JobError(
                    f"--resume: {str(self.path)!r} holds {record.get('job')} records, not {job}; "
                    f"write this job to another file"
                )
            if prompt is not None and record.get("status") == "ok" and record.get("prompt") != prompt:
                raise JobError(
                    f"--resume: {str(self.path)!r} was written with prompt {record.get('prompt')!r}, "
                    f"not {prompt!r}; write this job to another file"
                )
            self.done.add(record["path"])
        _truncate_partial_line(self.path, end)

    def write(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            where = str(self.path) if self.path else "stdout"
            raise JobError(
                f"--out: cannot write to {where!r}: {exc.strerror or _one_line(exc)} (the complete "
                f"records are kept; --resume continues)"
            ) from exc

    def close(self) -> None:
        if self._file is not sys.stdout:
            self._file.close()


# ----------------------------------------------------------------------------------------------------------------
# Embedding output: .npy files filled row by row


def embedding_paths(out: str) -> tuple[Path, Path, Path]:
    """--out FILE.npy -> (FILE.npy, FILE.pooled.npy, FILE.index.jsonl)."""
    path = Path(out).expanduser()
    stem = path.name[: -len(path.suffix)]
    return path, path.with_name(stem + ".pooled.npy"), path.with_name(stem + ".index.jsonl")


class RowFile:
    """A float32 ``.npy`` file of shape [N, *row_shape], written one row at a time with ``os.pwrite`` at the row's
    offset. Plain writes, not ``np.memmap``: a memory map's dirty pages count in the process's resident memory,
    while written pages belong to the page cache. Rows never written read back as zeros."""

    def __init__(self, path: Path, count: int, row_shape: tuple[int, ...], create: bool):
        self.path = path
        self.shape = (count, *row_shape)
        self.row_bytes = int(np.prod(row_shape)) * 4
        try:
            self._fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0), 0o644)
        except OSError as exc:
            raise JobError(
                f"--out: cannot {'write' if create else 'reopen'} {str(path)!r}: {exc.strerror or _one_line(exc)}"
            ) from exc
        self.offset = self._write_header() if create else self._check_header()

    def _write_header(self) -> int:
        with os.fdopen(os.dup(self._fd), "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": self.shape})
            offset = f.tell()
        os.ftruncate(self._fd, offset + self.shape[0] * self.row_bytes)  # the full size, a sparse file
        return offset

    def _check_header(self) -> int:
        with os.fdopen(os.dup(self._fd), "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(f)
            except ValueError as exc:
                raise JobError(f"--resume: {str(self.path)!r} is not a .npy file: {_one_line(exc)}") from exc
            offset = f.tell()
        if tuple(shape) != self.shape or fortran or dtype != np.dtype("<f4"):
            raise JobError(
                f"--resume: {str(self.path)!r} holds {dtype} {tuple(shape)}, not float32 {self.shape}: "
                f"it was written for other images or another model"
            )
        return offset

    def write(self, row: int, values: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(values, dtype="<f4").reshape(-1)).cast("B")
        position = self.offset + row * self.row_bytes
        try:
            while data:  # pwrite may write less than asked
                written = os.pwrite(self._fd, data, position)
                data, position = data[written:], position + written
        except OSError as exc:
            raise JobError(
                f"--out: cannot write row {row} of {str(self.path)!r}: {exc.strerror or _one_line(exc)} "
                f"(the rows its index lists are complete; --resume continues)"
            ) from exc

    def close(self) -> None:
        os.close(self._fd)


def inputs_digest(paths: list[str]) -> str:
    """A fingerprint of the ordered input list, kept in the index so that --resume can check it is the same."""
    return hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()


class EmbeddingFiles:
    """``FILE.npy`` [N, Q, C], ``FILE.pooled.npy`` [N, D] and ``FILE.index.jsonl``.

    The index starts with a header line (format, count, the digest of the input list, both shapes), then one
    record per finished row, ``{"row", "path", "status"}`` (and ``"error"``), written after the row's values: every
    row the index lists is complete. Error rows stay zero. With ``resume`` the files are reopened after checking
    they were written for the same inputs and shapes; :attr:`done` holds the rows already listed.
    """

    def __init__(
        self, out: str, paths: list[str], embeds_row: tuple[int, int], pooled_row: tuple[int], resume: bool = False
    ):
        self.embeds_path, self.pooled_path, self.index_path = embedding_paths(out)
        self.header = {
            "format": INDEX_FORMAT,
            "count": len(paths),
            "inputs_sha256": inputs_digest(paths),
            "image_embeds_shape": [len(paths), *embeds_row],
            "pooled_shape": [len(paths), *pooled_row],
        }
        self.done: set[int] = set()
        self.errors = 0
        resuming = resume and self.index_path.is_file()
        if resuming:
            self._load_index()
        else:  # a fresh run: never overwrite results (a --resume without an index is fresh too)
            for path in (self.embeds_path, self.pooled_path, self.index_path):
                if resume and path.is_file() and path.stat().st_size > 0:
                    raise JobError(
                        f"--resume: {str(path)!r} exists but its index {str(self.index_path)!r} does "
                        f"not, so its complete rows are unknown; remove it and start again"
                    )
                _refuse_existing("--out", path)
        self.embeds = RowFile(self.embeds_path, len(paths), embeds_row, create=not resuming)
        self.pooled = RowFile(self.pooled_path, len(paths), pooled_row, create=not resuming)
        self._index = open(self.index_path, "a" if resuming else "w", encoding="utf-8")
        if not resuming:
            self._append(self.header)

    def _load_index(self) -> None:
        end, header = 0, None
        for record, end in _read_records(self.index_path, "--resume: the index"):  # noqa: B007 (read after the loop)
            if header is None:
                header = record
                self._check_header(header)
            elif isinstance(record.get("row"), int):
                self.done.add(record["row"])
                self.errors += record.get("status") == "error"
        if header is None:
            raise JobError(f"--resume: the index {str(self.index_path)!r} is empty; remove the outputs and start again")
        _truncate_partial_line(self.index_path, end)

    def _check_header(self, header: dict) -> None:
        where = f"--resume: the index {str(self.index_path)!r}"
        if header.get("format") != INDEX_FORMAT:
            raise JobError(f"{where} is not a kosmos2-ref embedding index")
        if header.get("count") != self.header["count"] or header.get("inputs_sha256") != self.header["inputs_sha256"]:
            raise JobError(
                f"{where} was written for another list of images ({header.get('count')} of them; this "
                f"run has {self.header['count']}): pass the same images, in the same order, as the "
                f"first run"
            )
        for key in ("image_embeds_shape", "pooled_shape"):
            if header.get(key) != self.header[key]:
                raise JobError(f"{where}: {key} {header.get(key)} but this model gives {self.header[key]}")

    def _append(self, record: dict) -> None:
        try:
            self._index.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._index.flush()
        except OSError as exc:
            raise JobError(
                f"--out: cannot write the index {str(self.index_path)!r}: "
                f"{exc.strerror or _one_line(exc)} (the rows it lists are complete; --resume continues)"
            ) from exc

    def write_ok(self, row: int, path: str, embeds: np.ndarray, pooled: np.ndarray) -> None:
        self.embeds.write(row, embeds)
        self.pooled.write(row, pooled)
        self._append({"row": row, "path": path, "status": "ok"})

    def write_error(self, row: int, path: str, message: str) -> None:
        self.errors += 1
        self._append({"row": row, "path": path, "status": "error", "error": message})

    def close(self) -> None:
        self.embeds.close()
        self.pooled.close()
        self._index.close()


# ----------------------------------------------------------------------------------------------------------------
# Progress and interruption


class Progress:
    """Progress on stderr: on a terminal, a bar redrawn per batch with done/total, images/s and the time left;
    otherwise nothing until :meth:`finish` prints one summary line."""

    def __init__(self, job: str, total: int, already_done: int = 0, stream=None):
        self.job, self.total, self.already = job, total, already_done
        self.done = already_done
        self.errors = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return (self.done - self.already) / elapsed if elapsed > 0 else 0.0

    def update(self, finished: int, errors: int = 0) -> None:
        self.done += finished
        self.errors += errors
        if not self.tty:
            return
        rate = self.rate()
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        eta = f"{int(left // 60)}:{int(left % 60):02d}" if left == left else "?"
        self.stream.write(
            f"\r{self.job} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{rate:.2f} images/s, {eta} left "
        )
        self.stream.flush()

    def finish(self, interrupted: bool = False) -> None:
        if self.tty:
            self.stream.write("\n")
        elapsed = time.perf_counter() - self.start
        new = self.done - self.already
        resumed = f" ({self.already} done before)" if self.already else ""
        status = "interrupted: " if interrupted else ""
        self.stream.write(
            f"{self.job}: {status}{new} image(s) in {elapsed:.1f} s ({self.rate():.2f} images/s), "
            f"{self.errors} error(s); {self.done}/{self.total} done{resumed}\n"
        )
        self.stream.flush()


class StopOnInterrupt:
    """While active, the first Ctrl-C asks the job to stop after the batch it is computing (its records are
    written); a second one stops at once (KeyboardInterrupt; the output is still valid up to its last line).
    Signal handlers can only be set from the main thread; elsewhere Ctrl-C keeps its usual meaning."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nkosmos2-ref: stopping after the current batch (Ctrl-C again to stop now)", file=sys.stderr)

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ----------------------------------------------------------------------------------------------------------------
# Loading a batch


@dataclass
class Loaded:
    """One image of a batch: its path and the PIL image, or the one-line reason it could not be read."""

    path: str
    image: object = None
    error: str | None = None
    extra: object = None  # a job's per-image value (describe: the normalised box)


def load_batch(paths: list[str], on_error: str, prepare: Callable | None = None) -> list[Loaded]:
    """Read the images of a batch. One that cannot be read (or that ``prepare(image)`` rejects with a ValueError)
    becomes an error entry, or stops the run before anything of the batch is computed with ``on_error="stop"``."""
    batch = []
    for path in paths:
        item = Loaded(path)
        if not Path(path).is_file():
            item.error = f"image {path!r}: file not found"
        else:
            try:
                item.image = load_image(path, "image")
                item.extra = prepare(item.image) if prepare is not None else None
            except (ValueError, OSError) as exc:
                item.error = _one_line(exc) or type(exc).__name__
        if item.error is not None and on_error == "stop":
            raise JobStopped(f"{item.error} (--on-error stop; fix or remove it, then run again with --resume)")
        batch.append(item)
    return batch


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class JobOutcome:
    total: int
    done: int
    errors: int
    interrupted: bool = False
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------------------------
# Text jobs: caption, ground, describe


@dataclass
class TextJob:
    """One prompt for every image. ``name`` is caption, ground or describe; ``phrase`` (ground) and ``box``
    (describe: normalised, or pixels of each image) are the job's argument."""

    name: str
    prompt: str
    max_new_tokens: int
    phrase: str | None = None
    box: object = None

    @classmethod
    def caption(cls, prompt: str, max_new_tokens: int) -> "TextJob":
        return cls("caption", prompt, max_new_tokens)

    @classmethod
    def ground(cls, phrase: str, max_new_tokens: int) -> "TextJob":
        phrase = tasks.check_phrase(phrase)
        return cls("ground", tasks.ground_prompt(phrase), max_new_tokens, phrase=phrase)

    @classmethod
    def describe(cls, box, max_new_tokens: int) -> "TextJob":
        tasks.normalise_box(box, (1 << 30, 1 << 30))  # a malformed box fails now, before any image is read
        return cls("describe", tasks.DESCRIBE_PROMPT, max_new_tokens, box=box)

    def prepare(self, image):
        """The per-image value the prompt needs: describe's box, normalised by this image's size (a pixel box
        outside the image is a ValueError, so an error record)."""
        if self.name != "describe":
            return None
        return tasks.normalise_box(self.box, image.size)

    def result_fields(self, text: str, cap: str, raw_entities, image_size, box) -> dict:
        """The record's fields for one generated text (the same as the one-image command's --json)."""
        if self.name == "ground":
            return tasks.ground_result(self.phrase, text, cap, raw_entities, image_size).to_dict()
        entities = [e.to_dict() for e in entities_to_pixel_boxes(raw_entities, image_size)]
        fields = {"text": text, "caption": cap, "entities": entities, "image_size": list(image_size)}
        if self.name == "describe":
            fields.update(box=list(box), pixel_box=list(box_to_pixels(box, image_size)), description=cap)
        return fields


def _generate_batch(model, processor, job: TextJob, batch: list[Loaded]):
    """Generate for the readable images of a batch: (decoded texts, generate's output).

    Every row has the same prompt, so the rows are of equal length and need no padding (describe's boxes differ
    per image, but each is the same four tokens). Left padding is still asked for, so rows of different prompts
    would be padded as batched generation needs: a left-padded row generates what it generates alone.
    """
    bboxes = [[item.extra] for item in batch] if job.name == "describe" else None
    inputs = processor(
        text=[job.prompt] * len(batch),
        images=[item.image for item in batch],
        bboxes=bboxes,
        padding=True,
        padding_side="left",
    )
    from .generation import generate

    out = generate(
        model,
        pixel_values=inputs["pixel_values"],
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        image_embeds_position_mask=inputs["image_embeds_position_mask"],
        max_new_tokens=job.max_new_tokens,
        output_scores=True,  # for each box's confidence (about B x V x 4 bytes per step, freed with the batch)
        return_dict_in_generate=True,
    )
    ids = np.asarray(to_numpy(out.sequences))
    return processor.batch_decode(ids, skip_special_tokens=True), out


def _text_records(model, processor, job: TextJob, batch: list[Loaded], decoded: list[str], out) -> list[dict]:
    """One ok record per generated row, each entity with its ``confidence`` (kosmos2_ref.confidence) from the
    scores of the run that wrote it."""
    eos = model.config.text_config.eos_token_id
    records = []
    for row, (item, text_with_prompt) in enumerate(zip(batch, decoded)):
        text = processor.post_process_generation(text_with_prompt, cleanup_and_extract=False)
        cap, raw = processor.post_process_generation(text_with_prompt)
        fields = job.result_fields(text, cap, raw, item.image.size, item.extra)
        confidences = run_confidences(out, row, processor, eos, raw)
        for entity, conf in zip(fields["entities"], confidences):
            entity["confidence"] = conf.to_dict() if conf is not None else None
        records.append({"path": item.path, "status": "ok", "job": job.name, "prompt": job.prompt, **fields})
    return records


def error_record(job: str, path: str, message: str) -> dict:
    return {"path": path, "status": "error", "job": job, "error": message}


def text_batch_records(
    model,
    processor,
    job: TextJob,
    chunk: list[str],
    on_error: str = "record",
    annotate: Callable[[dict, int, object], None] | None = None,
) -> list[dict]:
    """The records of one batch of image paths, in their order (errors in their place). ``processor`` must be
    a processor (see :func:`kosmos2_ref.tasks.model_processor`). Used by the local loop and by the Ray workers."""
    t0 = time.perf_counter()
    batch = load_batch(chunk, on_error, job.prepare)
    good = [item for item in batch if item.error is None]
    by_path = {}
    if good:
        decoded, out = _generate_batch(model, processor, job, good)
        for row, record in enumerate(_text_records(model, processor, job, good, decoded, out)):
            if annotate is not None:
                annotate(record, row, out)
            by_path[record["path"]] = record
    share = (time.perf_counter() - t0) / len(batch)
    records = []
    for item in batch:
        record = by_path.get(item.path) or error_record(job.name, item.path, item.error)
        if record["status"] == "ok":
            record["seconds"] = round(share, 4)
        records.append(record)
    return records


def run_text_job(
    model,
    processor,
    job: TextJob,
    paths: list[str],
    records: RecordFile,
    *,
    batch_size: int = TEXT_BATCH_SIZE,
    on_error: str = "record",
    progress: Progress | None = None,
    stop: StopOnInterrupt | None = None,
    annotate: Callable[[dict, int, object], None] | None = None,
) -> JobOutcome:
    """Run ``job`` over ``paths`` in batches, skipping those ``records`` already holds; write one record per image
    in input order, batch by batch.

    ``annotate(record, row, generate_output)`` (optional) may add fields to each ok record before it is written,
    from generate's output for the batch (``return_dict_in_generate=True``, with ``scores``; ``row`` is the
    record's row in it). Each entity already carries its ``confidence``.
    """
    processor = tasks.model_processor(model, processor)
    pending = [p for p in paths if p not in records.done]
    outcome = JobOutcome(total=len(paths), done=len(paths) - len(pending), errors=0)
    start = time.perf_counter()
    for chunk in _batches(pending, batch_size):
        batch_records = text_batch_records(model, processor, job, chunk, on_error, annotate)
        for record in batch_records:
            records.write(record)
        if count_batch(outcome, batch_records, progress, stop):
            break
    outcome.seconds = time.perf_counter() - start
    return outcome


def count_batch(
    outcome: JobOutcome, batch_records: list[dict], progress: Progress | None, stop: StopOnInterrupt | None
) -> bool:
    """Count a written batch; True when the job should stop here (Ctrl-C asked for it)."""
    errors = sum(r["status"] == "error" for r in batch_records)
    outcome.done += len(batch_records)
    outcome.errors += errors
    if progress is not None:
        progress.update(len(batch_records), errors)
    if stop is not None and stop.requested:
        outcome.interrupted = outcome.done < outcome.total
        return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# Embeddings


def embedding_row_shapes(model) -> tuple[tuple[int, int], tuple[int]]:
    """([Q, C], [D]): one image's embeddings (latent queries × text width) and its pooled CLIP vector."""
    cfg = model.config
    return (cfg.latent_query_num, cfg.text_config.embed_dim), (cfg.vision_config.hidden_size,)


def embed_batch(model, processor, chunk: list[str], on_error: str = "record"):
    """One batch of image paths -> (entries, embeds [b, Q, C], pooled [b, D]), float32, one row per entry of
    ``chunk`` in its order: an entry is {"path", "status"} (and "error"); error rows are zeros."""
    batch = load_batch(chunk, on_error)
    good = [i for i, item in enumerate(batch) if item.error is None]
    (q, c), (d,) = embedding_row_shapes(model)
    embeds = np.zeros((len(batch), q, c), dtype=np.float32)
    pooled = np.zeros((len(batch), d), dtype=np.float32)
    if good:
        pixel_values = processor(images=[batch[i].image for i in good])["pixel_values"]
        e, _, vision = model.encode_image(pixel_values)
        embeds[good] = np.asarray(to_numpy(e), dtype=np.float32)
        pooled[good] = np.asarray(to_numpy(vision.pooler_output), dtype=np.float32)
    entries = [
        {"path": item.path, "status": "ok"}
        if item.error is None
        else {"path": item.path, "status": "error", "error": item.error}
        for item in batch
    ]
    return entries, embeds, pooled


def write_embed_rows(files: EmbeddingFiles, rows: list[int], entries: list[dict], embeds, pooled) -> None:
    """Write a computed batch: each row's values, then its index record (in row order, errors in their place)."""
    for j, (row, entry) in enumerate(zip(rows, entries)):
        if entry["status"] == "ok":
            files.write_ok(row, entry["path"], embeds[j], pooled[j])
        else:
            files.write_error(row, entry["path"], entry["error"])


def run_embed_job(
    model,
    processor,
    paths: list[str],
    files: EmbeddingFiles,
    *,
    batch_size: int = EMBED_BATCH_SIZE,
    on_error: str = "record",
    progress: Progress | None = None,
    stop: StopOnInterrupt | None = None,
) -> JobOutcome:
    """Embed the rows of ``paths`` that ``files`` does not list yet, batch by batch, writing each row's values and
    then its index record. Nothing is kept in memory beyond the batch being computed."""
    processor = tasks.model_processor(model, processor)
    pending = [row for row in range(len(paths)) if row not in files.done]
    outcome = JobOutcome(total=len(paths), done=len(paths) - len(pending), errors=files.errors)
    start = time.perf_counter()
    for rows in _batches(pending, batch_size):
        entries, embeds, pooled = embed_batch(model, processor, [paths[r] for r in rows], on_error)
        write_embed_rows(files, rows, entries, embeds, pooled)
        if count_batch(outcome, entries, progress, stop):
            break
    outcome.seconds = time.perf_counter() - start
    return outcome


# ----------------------------------------------------------------------------------------------------------------
# The command line's side: options and the commands' batch paths


def add_batch_arguments(parser, batch_size: int, out_help: str, out_required: bool = False) -> None:
    """The options of a batch job: inputs (--recursive, --list), output (--out, --resume, --on-error), batching."""
    g = parser.add_argument_group("many images")
    g.add_argument("--recursive", action="store_true", help="include the images of sub-folders too")
    g.add_argument(
        "--list",
        metavar="FILE",
        default=None,
        help="also process the images listed in FILE: one path per line, relative to FILE's folder; "
        "blank lines and # comments are skipped",
    )
    g.add_argument("--out", metavar="FILE", required=out_required, default=None, help=out_help)
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the output of an interrupted run: skip the images it already holds",
    )
    g.add_argument(
        "--on-error",
        choices=ON_ERROR_CHOICES,
        default="record",
        help="an image that cannot be read: write an error record and go on (default), or stop",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        metavar="N",
        help=f"images per forward pass (default {batch_size})",
    )
    g.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: this process (default); ray: a pool of Ray workers, each loading the model once "
        "(pip install 'kosmos2-ref[ray]'); the outputs are the same files",
    )
    g.add_argument("--workers", type=int, default=2, metavar="N", help="--engine ray: workers (default 2)")
    g.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="--engine ray: the cluster to join (auto: the one `ray start` runs here); default: start "
        "Ray on this machine",
    )


def wants_batch(args) -> bool:
    """Whether a text command runs as a batch job (JSON Lines out) rather than on one image as before: several
    images, a folder, a list file or --out."""
    images = args.images
    return bool(len(images) != 1 or args.list or args.out or args.resume or Path(images[0]).expanduser().is_dir())


def check_batch_arguments(args) -> None:
    if args.batch_size < 1:
        raise JobError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 1:
        raise JobError(f"--workers must be at least 1, got {args.workers}")
    if args.engine != "ray" and args.address is not None:
        raise JobError("--address is for --engine ray")
    if not args.images and not args.list:
        raise JobError("no images given: pass IMAGE... (files or folders) or --list FILE")
    if getattr(args, "draw", None):
        raise JobError("--draw draws the boxes of one image; give one image file and no --out")


def interrupted_message(outcome: JobOutcome) -> str:
    return (
        f"kosmos2-ref: interrupted after {outcome.done} of {outcome.total} image(s); run the same command with "
        f"--resume to finish"
    )
