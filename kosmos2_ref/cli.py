"""The command line: ``kosmos2-ref`` (also ``python -m kosmos2_ref``).

    kosmos2-ref demo                                    caption the packaged photo and draw its boxes
                                                        (offline: the miniature on a generated scene)
    kosmos2-ref caption IMAGE [--prompt P]              grounded caption: phrases and their boxes
    kosmos2-ref ground IMAGE "a snowman"                where is it? (referring expression comprehension)
    kosmos2-ref describe IMAGE --box x1,y1,x2,y2        what is there? (referring expression generation)
    kosmos2-ref embed IMAGE... --out FILE.npy           image embeddings [N, 64, 2048] + pooled CLIP [N, 1024]
    kosmos2-ref convert SRC DST [--dtype bfloat16]      any loadable checkpoint (.bin too) -> a safetensors folder
    kosmos2-ref serve [--host H] [--port P]             a local web page for all of these (docs/web.md)

Many images: ``caption``, ``ground``, ``describe`` and ``embed`` take files, folders (``--recursive``) and
``--list FILE`` and run them in batches, writing as they go (JSON Lines, or .npy files filled row by row);
``--resume`` continues an interrupted run, and a bad image becomes an error record (kosmos2_ref.jobs).

Global options (before or after the command): ``--model PATH_OR_ID`` (default ``$KOSMOS2_REF_MODEL``, else
``microsoft/kosmos-2-patch14-224``, found in the Hugging Face cache or downloaded; ``mini`` is the packaged
miniature trained on synthetic shapes), ``--backend numpy|cupy``,
``--dtype float32|float16|bfloat16``, ``--max-new-tokens N``, ``--json``, ``--draw OUT.png``.

Errors (a missing or unreadable image, a bad box, a checkpoint that cannot be found) print one line
``kosmos2-ref: error: ...`` on stderr and exit with status 2; ``KOSMOS2_REF_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

from . import machine
from .hub import default_model
from .version import __version__

# Each command imports the modules it uses inside its function, so that a command loads only its own (the web
# server's, the converter's, Ray's for --engine ray) and starts sooner. None of these imports hides a cycle: the
# command line is the top of the package's import graph (tests/test_house_rules.py keeps it free of cycles).

PROG = "kosmos2-ref"
EXIT_ERROR = 2
DEFAULT_DEMO_DRAW = "kosmos2-demo.png"


class CLIError(ValueError):
    """A user error reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line too (with a pointer to --help)."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every command takes. On the subcommands their defaults are suppressed, so a value given after
    the command overrides one given before it, and one given before it is not reset."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g = parser.add_argument_group("model and output options")
    g.add_argument(
        "--model",
        metavar="PATH_OR_ID",
        default=d(None),
        help="checkpoint folder, Hugging Face id, or 'mini' (the packaged miniature trained on "
        "synthetic shapes) (default: $KOSMOS2_REF_MODEL, else microsoft/kosmos-2-patch14-224 "
        "from the HF cache, downloaded if online)",
    )
    g.add_argument(
        "--backend",
        choices=["numpy", "cupy"],
        default=d(None),
        help="array backend (default: $KOSMOS2_BACKEND, else numpy)",
    )
    g.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=d("float32"),
        help="storage dtype of the weight matrices; compute is float32 (default: float32)",
    )
    g.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        default=d(None),
        help="tokens to generate (default: 64; 16 for ground)",
    )
    g.add_argument("--json", action="store_true", default=d(False), help="print the result as JSON")
    g.add_argument("--draw", metavar="OUT.png", default=d(None), help="also write the image with the boxes drawn on it")
    g.add_argument(
        "--draw-confidence",
        action="store_true",
        default=d(False),
        help="with --draw: label each box with its probability (its two location tokens')",
    )


def build_parser() -> argparse.ArgumentParser:
    from . import jobs

    parser = _Parser(
        prog=PROG,
        description="KOSMOS-2 in NumPy: grounded captions, phrase grounding, region descriptions and image embeddings.",
        epilog="Run `kosmos2-ref demo` to see it work.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    _add_task_commands(sub, jobs)
    _add_tool_commands(sub)
    return parser


def _add_task_commands(sub, jobs) -> None:
    """caption, ground, describe and embed: the model's jobs, each over one image or many."""
    images_help = (
        "image files or folders (a folder's images sorted by name); one image file and no --out "
        "prints the result as before, anything more writes JSON Lines"
    )
    text_out_help = "write the JSON Lines records to FILE (default: stdout), one per image as it finishes"

    p = sub.add_parser("caption", help="grounded caption of an image: the phrases it names and their boxes")
    p.add_argument("images", nargs="*", metavar="IMAGE", help=images_help)
    p.add_argument(
        "--prompt",
        default=None,
        help='prompt (default: "<grounding> An image of"; try "<grounding> Describe this image in detail:")',
    )
    jobs.add_batch_arguments(p, jobs.TEXT_BATCH_SIZE, text_out_help)
    _global_options(p, suppress=True)

    p = sub.add_parser("ground", help="find the boxes of a phrase (referring expression comprehension)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help=images_help)
    p.add_argument("phrase", help='what to find, e.g. "a snowman"')
    jobs.add_batch_arguments(p, jobs.TEXT_BATCH_SIZE, text_out_help)
    _global_options(p, suppress=True)

    p = sub.add_parser("describe", help="describe what is inside a box (referring expression generation)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help=images_help)
    p.add_argument(
        "--box",
        required=True,
        metavar="x1,y1,x2,y2",
        help="the region: normalised to [0, 1], or in pixels (of each image) when any value is above 1",
    )
    jobs.add_batch_arguments(p, jobs.TEXT_BATCH_SIZE, text_out_help)
    _global_options(p, suppress=True)

    p = sub.add_parser("embed", help="image embeddings [N, 64, 2048] and pooled CLIP vectors [N, 1024]")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders (a folder's images sorted)")
    jobs.add_batch_arguments(
        p,
        jobs.EMBED_BATCH_SIZE,
        out_required=True,
        out_help="FILE.npy: embeddings there, pooled vectors in FILE.pooled.npy and one record per finished row in "
        "FILE.index.jsonl, all written row by row (memory stays flat; resumable); FILE.npz: one archive "
        "with arrays image_embeds, pooled and names, held in memory and written at the end (small sets)",
    )
    _global_options(p, suppress=True)


def _add_tool_commands(sub) -> None:
    """convert, demo and serve."""
    p = sub.add_parser(
        "convert",
        help="write a safetensors checkpoint folder from any checkpoint this package "
        "loads (safetensors or pytorch_model.bin, a folder or a Hub id)",
    )
    p.add_argument("src", help="checkpoint folder or Hugging Face id")
    p.add_argument("dst", help="the new folder to write (must not exist; it appears only when complete)")
    p.add_argument(
        "--dtype",
        dest="convert_dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="convert every tensor to this dtype (default: keep each as stored)",
    )

    p = sub.add_parser(
        "demo",
        help="caption the packaged sample photo and draw its boxes (real weights if "
        "available; else the miniature, trained on synthetic shapes, captions a "
        "generated scene)",
    )
    p.add_argument("--image", default=None, help="caption this image instead of the packaged one")
    _global_options(p, suppress=True)

    p = sub.add_parser(
        "serve",
        help="a local web page and JSON API: caption, ground, describe a drawn box, the "
        "connector's attention (docs/web.md)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--max-upload-mb", type=float, default=10.0, metavar="MB", help="largest image upload accepted (default 10)"
    )
    p.add_argument(
        "--queue",
        type=int,
        default=4,
        metavar="N",
        help="requests that may wait for the model; more get 503 (default 4)",
    )
    p.add_argument("--quiet", action="store_true", help="no access log on stderr")
    _global_options(p, suppress=True)


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _check_image_path(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"image not found: {path!r}")
    if p.is_dir():
        raise CLIError(f"{path!r} is a folder; expected an image file")
    return p


def _check_output(option: str, value: str, what: str, path: Path | None = None, subject: str | None = None) -> Path:
    """Fail now, before the model loads, if an output cannot be written: it is a folder (or some other non-file),
    or its folder is missing, not a folder or not writable. ``path`` is a file derived from ``value`` (default:
    ``value`` itself); the message starts with ``subject`` (default: the option and the value the user gave)."""
    target = Path(path or value).expanduser()
    subject = subject or f"{option} {value!r}"
    if target.is_dir():
        raise CLIError(f"{subject} is a folder; expected {what}")
    if target.exists() and not target.is_file():
        raise CLIError(f"{subject} exists and is not a regular file; expected {what}")
    folder = target.parent
    if not folder.exists():
        raise CLIError(f"{option} {value!r}: folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise CLIError(f"{option} {value!r}: {str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {value!r}: folder {str(folder)!r} is not writable")
    return target


def _load_model(args, model_id: str | None = None):
    from .model import Kosmos2

    return Kosmos2.from_pretrained(model_id or args.model or default_model(), backend=args.backend, dtype=args.dtype)


def _run_text_batch(args, job) -> int:
    """``caption``/``ground``/``describe`` over many images: JSON Lines to ``--out`` (or stdout), by this process
    (kosmos2_ref.jobs) or by Ray workers (``--engine ray``: kosmos2_ref.ray_jobs). Returns the exit status: 0, or
    130 when Ctrl-C stopped the run (its records are written; ``--resume`` finishes it)."""
    from . import jobs

    jobs.check_batch_arguments(args)
    if args.out:
        _check_output("--out", args.out, "a .jsonl file to write")
    paths = jobs.collect_inputs(args.images, args.recursive, args.list)
    if args.engine == "ray":
        from .ray_jobs import import_ray  # Ray is optional: imported only for --engine ray

        import_ray()  # installed? say so before anything is written
    records = jobs.RecordFile(args.out, args.resume, job.name, job.prompt)
    try:
        progress = jobs.Progress(job.name, len(paths), already_done=sum(p in records.done for p in paths))
        if args.engine == "ray":
            from . import ray_jobs  # only for --engine ray (it needs the optional Ray)

            with jobs.StopOnInterrupt() as stop:
                outcome = ray_jobs.run_text_job(
                    args.model or default_model(),
                    job,
                    paths,
                    records,
                    **_ray_options(args),
                    progress=progress,
                    stop=stop,
                )
        else:
            model = _load_model(args)
            with jobs.StopOnInterrupt() as stop:
                outcome = jobs.run_text_job(
                    model,
                    None,
                    job,
                    paths,
                    records,
                    batch_size=args.batch_size,
                    on_error=args.on_error,
                    progress=progress,
                    stop=stop,
                )
    finally:
        records.close()
    progress.finish(outcome.interrupted)
    if outcome.interrupted:
        print(jobs.interrupted_message(outcome), file=sys.stderr)
        return 130
    return 0


def _run_embed_batch(args) -> tuple[int, dict]:
    """``embed --out FILE.npy`` over many images, streamed to disk (``--engine ray``: by Ray workers). Returns
    (exit status, summary)."""
    from . import jobs

    jobs.check_batch_arguments(args)
    for path, what in zip(jobs.embedding_paths(args.out), ("a .npy file", "a .npy file", "a .jsonl index")):
        subject = None if path == Path(args.out).expanduser() else f"--out {args.out!r}: its file {str(path)!r}"
        _check_output("--out", args.out, f"{what} to write", path, subject)
    paths = jobs.collect_inputs(args.images, args.recursive, args.list)
    if args.engine == "ray":
        from .ray_jobs import import_ray  # Ray is optional: imported only for --engine ray

        import_ray()
    model = _load_model(args)  # memory-mapped: cheap, and it gives the shapes (ray: the workers compute)
    embeds_row, pooled_row = jobs.embedding_row_shapes(model)
    files = jobs.EmbeddingFiles(args.out, paths, embeds_row, pooled_row, resume=args.resume)
    try:
        progress = jobs.Progress("embed", len(paths), already_done=len(files.done))
        with jobs.StopOnInterrupt() as stop:
            outcome = _embed_on_engine(args, model, paths, files, progress, stop)
    finally:
        files.close()
    progress.finish(outcome.interrupted)
    summary = {
        "out": str(files.embeds_path),
        "pooled_out": str(files.pooled_path),
        "index": str(files.index_path),
        "count": len(paths),
        "done": outcome.done,
        "errors": outcome.errors,
        "image_embeds_shape": files.header["image_embeds_shape"],
        "pooled_shape": files.header["pooled_shape"],
        "images": paths,
        "model": model.name_or_path,
    }
    if outcome.interrupted:
        print(jobs.interrupted_message(outcome), file=sys.stderr)
        return 130, summary
    return 0, summary


def _ray_options(args) -> dict:
    """The options a job on Ray workers takes from the command line (beside the model, inputs and output)."""
    return {
        "backend": args.backend,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "address": args.address,
        "on_error": args.on_error,
    }


def _embed_on_engine(args, model, paths, files, progress, stop):
    """The embedding job on the engine ``--engine`` names: this process, or Ray workers."""
    from . import jobs

    if args.engine == "ray":
        from . import ray_jobs  # only for --engine ray (it needs the optional Ray)

        return ray_jobs.run_embed_job(
            args.model or default_model(),
            paths,
            files,
            **_ray_options(args),
            progress=progress,
            stop=stop,
        )
    return jobs.run_embed_job(
        model,
        None,
        paths,
        files,
        batch_size=args.batch_size,
        on_error=args.on_error,
        progress=progress,
        stop=stop,
    )


def _max_new(args, default: int) -> int:
    return default if args.max_new_tokens is None else args.max_new_tokens


def _fmt_box(box) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in box) + ")"


def _print_entities(entities, out) -> None:
    if not entities:
        print("  (no grounded phrases)", file=out)
        return
    width = max(len(e.phrase) for e in entities)
    for e in entities:
        for box, px in zip(e.boxes, e.pixel_boxes):
            print(f"  {e.phrase:<{width}}  {_fmt_box(box)}  pixels {tuple(px)}", file=out)


def _draw(image_path: Path, entities, out_path: str, image=None, confidence: bool = False) -> Path:
    from .draw import draw_entities, save_image
    from .processing.image import load_image

    img = image if image is not None else load_image(image_path)
    target = Path(out_path).expanduser()
    try:
        save_image(draw_entities(img, entities, confidence=confidence), target)
    except OSError as exc:  # name what the user gave, not the temporary file
        raise CLIError(f"--draw {out_path!r}: cannot write it: {exc.strerror or _one_line(exc)}") from exc
    return target


def _stream_to_stdout(args):
    """A text callback that writes to stdout as tokens arrive, when stdout is a terminal and not --json."""
    if args.json or not sys.stdout.isatty():
        return None

    def on_text(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    return on_text


def _emit_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


# ----------------------------------------------------------------------------------------------------------------
# Commands


def _caption_result(args, model, image, prompt: str, label: str = ""):
    """Caption ``image`` (a path or a PIL image), streaming to a terminal."""
    from . import tasks

    stream = _stream_to_stdout(args)
    if stream is not None and label:
        sys.stdout.write(label + " ")
    result = tasks.caption(
        model,
        str(image) if isinstance(image, Path) else image,
        prompt=prompt,
        max_new_tokens=_max_new(args, tasks.DEFAULT_MAX_NEW_TOKENS),
        on_text=stream,
    )
    return result, stream is not None


def cmd_caption(args) -> int:
    from . import jobs
    from .tasks import DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_NEW_TOKENS

    prompt = DEFAULT_CAPTION_PROMPT if args.prompt is None else args.prompt  # "" is a prompt too: the image alone
    if jobs.wants_batch(args):
        job = jobs.TextJob.caption(prompt, _max_new(args, DEFAULT_MAX_NEW_TOKENS))
        return _run_text_batch(args, job)
    image_path = _check_image_path(args.images[0])
    model = _load_model(args)
    result, streamed = _caption_result(args, model, image_path, prompt)
    drawn = _draw(image_path, result.entities, args.draw, confidence=args.draw_confidence) if args.draw else None
    if args.json:
        _emit_json(
            {
                **result.to_dict(),
                "image": str(image_path),
                "model": model.name_or_path,
                **({"drawn": str(drawn)} if drawn else {}),
            }
        )
        return 0
    if streamed:
        print()
    else:
        print(result.caption)
    _print_entities(result.entities, sys.stdout)
    if drawn:
        print(f"boxes drawn to {drawn}", file=sys.stderr)
    return 0


def cmd_ground(args) -> int:
    from . import jobs, tasks

    if not args.images and not args.list:  # argparse gave the only argument to the phrase
        raise CLIError(f"ground needs images and a phrase: {PROG} ground IMAGE... PHRASE (got only {args.phrase!r})")
    if jobs.wants_batch(args):
        job = jobs.TextJob.ground(args.phrase, _max_new(args, tasks.GROUND_MAX_NEW_TOKENS))
        return _run_text_batch(args, job)
    image_path = _check_image_path(args.images[0])
    model = _load_model(args)
    result = tasks.ground(
        model, str(image_path), args.phrase, max_new_tokens=_max_new(args, tasks.GROUND_MAX_NEW_TOKENS)
    )
    # the caption's entity for the prompt's phrase (it carries the boxes' confidences)
    entities = [e for e in result.entities if e.span[0] == 0 and e.phrase == result.phrase][:1] if result.boxes else []
    drawn = _draw(image_path, entities, args.draw, confidence=args.draw_confidence) if args.draw else None
    if args.json:
        _emit_json(
            {
                **result.to_dict(),
                "image": str(image_path),
                "model": model.name_or_path,
                **({"drawn": str(drawn)} if drawn else {}),
            }
        )
        return 0
    if result.boxes:
        print(f"{result.phrase}:")
        for box, px in zip(result.boxes, result.pixel_boxes):
            print(f"  {_fmt_box(box)}  pixels {tuple(px)}")
    else:
        print(f"{result.phrase}: no box (the model wrote {result.caption!r})")
    if drawn:
        print(f"boxes drawn to {drawn}", file=sys.stderr)
    return 0


def cmd_describe(args) -> int:
    from . import jobs, tasks
    from .processing.image import load_image

    if jobs.wants_batch(args):
        job = jobs.TextJob.describe(args.box, _max_new(args, tasks.DEFAULT_MAX_NEW_TOKENS))
        return _run_text_batch(args, job)
    image_path = _check_image_path(args.images[0])
    image = load_image(str(image_path))
    box = tasks.normalise_box(args.box, image.size)  # a bad box fails before the model loads
    model = _load_model(args)
    result = tasks.describe(model, image, box, max_new_tokens=_max_new(args, tasks.DEFAULT_MAX_NEW_TOKENS))
    drawn = None
    if args.draw:
        region = tasks.Entity(result.description, (0, len(result.description)), [result.box], [result.pixel_box])
        drawn = _draw(image_path, [region], args.draw, image)
    if args.json:
        _emit_json(
            {
                **result.to_dict(),
                "image": str(image_path),
                "model": model.name_or_path,
                **({"drawn": str(drawn)} if drawn else {}),
            }
        )
        return 0
    print(result.description)
    print(f"  box {_fmt_box(result.box)}  pixels {tuple(result.pixel_box)}")
    if drawn:
        print(f"box drawn to {drawn}", file=sys.stderr)
    return 0


def _save_outputs(option: str, value: str, outputs) -> None:
    """Write the outputs all or nothing. ``outputs`` is a list of (path, write), ``write(f)`` filling an open binary
    file. Each is written to a temporary file beside its path; only when all are written are they moved into place.
    On any failure the temporaries are removed and the old outputs are left as they were (one already moved is put
    back from a hard link kept until the end); an OSError is reported naming ``option`` and the output path."""
    staged: list[tuple[Path, Path]] = []  # (temporary, path)
    backups: dict[Path, Path] = {}  # path -> a link to its old contents
    moved: list[Path] = []
    current = outputs[0][0]
    try:
        for current, write in outputs:
            tmp = current.with_name(f".{current.name}.partial")
            staged.append((tmp, current))  # before the file exists: a signal after open leaves none
            with open(tmp, "wb") as f:
                write(f)
        for _tmp, current in staged[:-1]:  # the last one moved needs no way back
            if current.is_file():
                backup = current.with_name(f".{current.name}.old")
                if backup.is_file() or backup.is_symlink():
                    backup.unlink()
                try:
                    os.link(current, backup)
                except OSError:  # no hard links on this file system
                    import shutil

                    shutil.copy2(current, backup)
                backups[current] = backup
        for tmp, current in staged:
            os.replace(tmp, current)
            moved.append(current)
    except BaseException as exc:
        for path in reversed(moved):
            if path in backups:
                os.replace(backups.pop(path), path)
            else:
                path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CLIError(
                f"{option} {value!r}: cannot write {str(current)!r}: {exc.strerror or _one_line(exc)} "
                f"(no output was changed)"
            ) from exc
        raise
    finally:
        for leftover in [tmp for tmp, _ in staged] + list(backups.values()):
            if leftover.is_file():
                leftover.unlink()


def embed_outputs(out: str) -> tuple[Path, Path | None]:
    """--out FILE.npy -> (FILE.npy, FILE.pooled.npy); --out FILE.npz -> (FILE.npz, None)."""
    path = Path(out).expanduser()
    if path.suffix.lower() == ".npz":
        return path, None
    if path.suffix.lower() != ".npy":
        raise CLIError(f"--out {out!r}: expected a .npy or .npz file name")
    return path, path.with_name(path.name[:-4] + ".pooled.npy")


def cmd_embed(args) -> int:
    out, pooled_out = embed_outputs(args.out)
    if pooled_out is None:
        return _embed_npz(args, out)
    code, summary = _run_embed_batch(args)
    if args.json:
        _emit_json(summary)
    else:
        errors = f" ({summary['errors']} could not be read: see the index)" if summary["errors"] else ""
        print(
            f"embedded {summary['done']} of {summary['count']} image(s){errors}: image_embeds "
            f"{tuple(summary['image_embeds_shape'])}, pooled {tuple(summary['pooled_shape'])} -> {out}, "
            f"{pooled_out} and {summary['index']}"
        )
    return code


def _embed_npz(args, out: Path) -> int:
    """embed --out FILE.npz: every embedding held in memory and written at the end, all or nothing (for small
    sets; an image that cannot be read stops the run)."""
    import numpy as np

    from . import jobs, tasks

    _check_output("--out", args.out, "a .npz file to write")  # before the slow part
    jobs.check_batch_arguments(args)
    if args.resume or args.engine != "local":
        raise CLIError(
            f"--resume and --engine ray need --out FILE.npy (streamed row by row); {args.out!r} is written at the end"
        )
    paths = jobs.collect_inputs(args.images, args.recursive, args.list)
    model = _load_model(args)
    result = tasks.embed(model, paths, batch_size=args.batch_size)
    _save_outputs(
        "--out",
        args.out,
        [(out, lambda f: np.savez(f, image_embeds=result.image_embeds, pooled=result.pooled, names=np.array(paths)))],
    )
    summary = {
        "out": str(out),
        "pooled_out": str(out),
        "count": len(paths),
        "image_embeds_shape": list(result.image_embeds.shape),
        "pooled_shape": list(result.pooled.shape),
        "images": paths,
        "model": model.name_or_path,
    }
    if args.json:
        _emit_json(summary)
    else:
        print(
            f"embedded {len(paths)} image(s): image_embeds {tuple(result.image_embeds.shape)}, "
            f"pooled {tuple(result.pooled.shape)} -> {out}"
        )
    return 0


def demo_image() -> Path:
    """The photo shipped in the package (microsoft/unilm's two_dogs.jpg)."""
    return Path(__file__).resolve().parent / "assets" / "two_dogs.jpg"


DEMO_SCENE_SEED = 3  # the generated scene the miniature captions in the demo
DEMO_SCENE_SIZE = 224


def cmd_demo(args) -> int:
    from .hub import MINI_MODEL, CheckpointNotFoundError, is_miniature, resolve_checkpoint
    from .tasks import DEFAULT_CAPTION_PROMPT

    image_path = _check_image_path(args.image) if args.image else demo_image()
    if not image_path.is_file():
        raise CLIError(f"the packaged demo image is missing: {str(image_path)!r}")
    if not args.draw:  # main() checked a --draw given; check the default before the slow part
        _check_output(
            "--draw",
            DEFAULT_DEMO_DRAW,
            "an image file to write (choose another with --draw)",
            subject=f"the demo's output {DEFAULT_DEMO_DRAW!r} (the --draw default)",
        )
    explicit = args.model or os.environ.get("KOSMOS2_REF_MODEL")
    if explicit:
        model = _load_model(args, explicit)  # the user asked for it: failing is an error
    else:
        try:
            folder = resolve_checkpoint(default_model())
        except CheckpointNotFoundError as exc:
            why = _one_line(exc).split(": ")[0]  # what is missing, without the how-to-get-it advice
            print(
                f"{PROG}: real weights unavailable ({why}); showing the miniature instead: a small Kosmos-2 "
                f"trained on synthetic shapes, on a generated scene",
                file=sys.stderr,
            )
            folder = resolve_checkpoint(MINI_MODEL)
        model = _load_model(args, str(folder))
    miniature = is_miniature(getattr(model, "folder", None))
    scene = None
    if miniature and not args.image:  # the miniature knows shapes, not photos: show it a scene of its world
        from . import world

        scene = world.make_scene(DEMO_SCENE_SEED, image_size=DEMO_SCENE_SIZE)
        image = world.render(scene)
        shown = f"a generated scene (seed {DEMO_SCENE_SEED})"
    else:
        image, shown = image_path, image_path.name
    label = "[miniature]" if miniature else ""
    result, streamed = _caption_result(args, model, image, DEFAULT_CAPTION_PROMPT, label)
    drawn = _draw(
        image_path,
        result.entities,
        args.draw or DEFAULT_DEMO_DRAW,
        image=image if scene is not None else None,
        confidence=args.draw_confidence,
    )
    if args.json:
        where = {"image": None, "scene": _scene_dict(scene)} if scene is not None else {"image": str(image_path)}
        _emit_json(
            {**result.to_dict(), **where, "model": model.name_or_path, "miniature": miniature, "drawn": str(drawn)}
        )
        return 0
    if streamed:
        print()
    else:
        print(f"{label} {result.caption}" if label else result.caption)
    _print_entities(result.entities, sys.stdout)
    print(f"{label + ' ' if label else ''}boxes drawn on {shown} -> {drawn}")
    return 0


def _scene_dict(scene) -> dict:
    return {
        "seed": scene.seed,
        "size": scene.image_size,
        "objects": [{"colour": o.colour, "shape": o.shape, "box": list(o.box)} for o in scene.objects],
    }


def cmd_serve(args) -> int:
    from .demo import demo_checkpoint, is_demo_checkpoint
    from .hub import CheckpointNotFoundError, resolve_checkpoint
    from .server import serve
    from .service import DEFAULT_MAX_NEW_TOKENS, ModelService

    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be from 0 to 65535, got {args.port}")
    if not args.max_upload_mb > 0:
        raise CLIError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.queue < 0:
        raise CLIError(f"--queue must be 0 or more, got {args.queue}")
    explicit = args.model or os.environ.get("KOSMOS2_REF_MODEL")
    if explicit:
        model = _load_model(args, explicit)
    else:  # as `demo` does: the real weights, else a labelled random model
        try:
            folder = resolve_checkpoint(default_model())
        except CheckpointNotFoundError as exc:
            print(
                f"{PROG}: real weights unavailable ({_one_line(exc)}); serving a small RANDOM-weight model "
                f"instead (its captions are noise; pass --model to choose one)",
                file=sys.stderr,
            )
            folder = demo_checkpoint()
        model = _load_model(args, str(folder))
    service = ModelService(
        model,
        random_weights=is_demo_checkpoint(getattr(model, "folder", None)),
        max_waiting=args.queue,
        default_max_new_tokens=_max_new(args, DEFAULT_MAX_NEW_TOKENS),
    )
    try:
        serve(service, args.host, args.port, int(args.max_upload_mb * 1024 * 1024), args.quiet)
    except OSError as exc:  # the port is taken, the address is not this machine's, ...
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or _one_line(exc)}") from exc
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint

    dst = convert_checkpoint(args.src, args.dst, args.convert_dtype)
    size = sum(f.stat().st_size for f in dst.iterdir())
    print(f"wrote {dst} ({size / 1e6:.1f} MB): {', '.join(sorted(f.name for f in dst.iterdir()))}")
    return 0


COMMANDS = {
    "caption": cmd_caption,
    "ground": cmd_ground,
    "describe": cmd_describe,
    "embed": cmd_embed,
    "demo": cmd_demo,
    "serve": cmd_serve,
    "convert": cmd_convert,
}


class Terminated(BaseException):
    """SIGTERM arrived. Raised in the main thread so that cleanup runs as for Ctrl-C (a half-written output's
    temporary file is removed), where the default action would end the process at once and leave it behind."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises():
    """While the command runs, SIGTERM raises :class:`Terminated` (main thread only; the old handler is put back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0, or 2 for an error reported in one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with _sigterm_raises():
        return _run(args)


def _run(args) -> int:
    try:
        # a process of its own: keep freed memory for reuse (a full-size image encoding then takes no page faults
        # instead of ~20 thousand), unless KOSMOS2_REF_KEEP_FREED_MEMORY=0
        machine.keep_freed_memory_unless_told_not_to()
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        if args.draw:  # check the target before the slow part
            target = _check_output("--draw", args.draw, "an image file to write")
            import PIL.Image

            if target.suffix.lower() not in PIL.Image.registered_extensions():
                raise CLIError(f"--draw {args.draw!r}: unknown image extension; use .png or .jpg")
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a shell reports a command ended by it
    except BrokenPipeError:  # the reader went away (`kosmos2-ref caption x.png --json | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so Python's final flush of stdout does not fail again
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by a closed pipe
    except (ValueError, OSError, ImportError, MemoryError) as exc:
        if os.environ.get("KOSMOS2_REF_DEBUG"):
            raise
        msg = _one_line(exc) or type(exc).__name__
        if isinstance(exc, MemoryError):
            msg = "out of memory (try --dtype bfloat16 or float16)"
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
