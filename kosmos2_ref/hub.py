"""Finding a checkpoint folder: a local folder, the Hugging Face cache, or a download when online.

``resolve_checkpoint("path/to/folder")`` returns the folder (it must hold ``config.json``).
``resolve_checkpoint("microsoft/kosmos-2-patch14-224")`` looks the id up in the standard Hugging Face cache, the
layout ``huggingface_hub`` writes and transformers reads::

    $HF_HUB_CACHE (else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub)
      models--microsoft--kosmos-2-patch14-224/
        refs/main                 the commit hash of the snapshot that "main" names
        snapshots/<hash>/         config.json, model.safetensors, tokenizer.json, ... (links into blobs/)

It takes the snapshot ``refs/main`` names (or ``refs/<revision>``, or ``snapshots/<revision>``), else the newest
snapshot that holds a complete checkpoint: ``config.json`` and weights (safetensors, or a PyTorch ``.bin`` when the
snapshot has no safetensors). ``need="processor"`` (what :meth:`Kosmos2Processor.from_pretrained` asks for) is
satisfied by the tokenizer and image-processor files alone, with or without weights. When the id is not cached it
downloads the files the package reads (:data:`ALLOW_PATTERNS`; the PyTorch ``.bin`` only for a repository without
safetensors, :data:`BIN_PATTERNS`) with ``huggingface_hub.snapshot_download`` -- an optional dependency,
``pip install 'kosmos2-ref[hub]'`` -- unless ``HF_HUB_OFFLINE=1``. Every way of failing raises
:class:`CheckpointNotFoundError` with one sentence saying what is missing and how to get it; network attempts are
bounded by short timeouts, so nothing hangs: a TCP probe (skipped behind a proxy), then the repository-info request
that resolves the revision to a commit (``model_info``, :data:`INFO_TIMEOUT_S`), then the download of that commit,
whose requests time out after ``etag_timeout`` and ``HF_HUB_DOWNLOAD_TIMEOUT``.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_MODEL_ID = "microsoft/kosmos-2-patch14-224"
MINI_MODEL = "mini"  # the miniature trained on synthetic shapes, shipped in kosmos2_ref/assets/mini
MINI_FOLDER = Path(__file__).resolve().parent / "assets" / "mini"

# The files of a Hub checkpoint this package reads; the 6.6 GB pytorch_model.bin is not among them.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "sentencepiece.bpe.model",
]
# The PyTorch weights, fetched only when a repository has no safetensors (read by kosmos2_ref.torch_pickle).
BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
# What a processor reads: the tokenizer (tokenizer.json, else the SentencePiece model) and the image settings.
PROCESSOR_PATTERNS = [
    "tokenizer.json",
    "sentencepiece.bpe.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
]
NEEDS = ("model", "processor")
CONNECT_TIMEOUT_S = 5.0  # the reachability probe, DNS included
INFO_TIMEOUT_S = 10.0  # the repository-info request that resolves the revision (model_info)
ETAG_TIMEOUT_S = 10.0  # huggingface_hub's metadata request; reads time out after HF_HUB_DOWNLOAD_TIMEOUT

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = {"1", "true", "yes", "on"}


class CheckpointNotFoundError(ValueError):
    """No checkpoint folder could be found for the given path or id."""


# ----------------------------------------------------------------------------------------------------------------
# Where the cache is


def default_model() -> str:
    """The checkpoint used when none is named: ``$KOSMOS2_REF_MODEL``, else :data:`DEFAULT_MODEL_ID`."""
    return os.environ.get("KOSMOS2_REF_MODEL") or DEFAULT_MODEL_ID


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, found as ``huggingface_hub`` finds it (it need not exist)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``) is set to 1/true/yes/on."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub repository id ``org/name`` (and not as a path like ``./x`` or ``/x``)."""
    return bool(_HUB_ID.match(text)) and ".." not in text


def repo_folder(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/models--org--name``."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()
    return cache / ("models--" + repo_id.replace("/", "--"))


# ----------------------------------------------------------------------------------------------------------------
# Looking in the cache


def _named(folder: Path, name: str) -> str:
    """``name`` as a missing file is named in messages: "(a broken symbolic link)" added when it is one, so that a
    message never says a folder has no file that a listing of it shows."""
    path = folder / name
    return f"{name} (a broken symbolic link to {os.readlink(path)!r})" if path.is_symlink() else name


def broken_links(folder: Path) -> list[str]:
    """The files of ``folder`` that this package reads (:data:`ALLOW_PATTERNS`, :data:`BIN_PATTERNS`) and that are
    broken symbolic links."""
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    return [
        _named(folder, p.name)
        for p in entries
        if p.is_symlink()
        and not p.exists()
        and any(fnmatch.fnmatch(p.name, pattern) for pattern in ALLOW_PATTERNS + BIN_PATTERNS)
    ]


def _missing_weights(folder: Path) -> list[str]:
    """The weight files ``folder`` lacks, looked for in the order the loader prefers them (weights.WEIGHT_FILES):
    a single file, else an index and every shard it names; safetensors, else PyTorch ``.bin``."""
    import json

    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / single).is_file():
            return []
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return []  # a corrupt index is reported by the weights loader, with the file named
            return [_named(folder, s) for s in shards if not (folder / s).is_file()]
    if (folder / "model.safetensors").is_symlink():  # there, but a broken link
        return [_named(folder, "model.safetensors")]
    return ["model.safetensors (or pytorch_model.bin)"]


def _missing_processor_files(folder: Path) -> list[str]:
    """What a processor folder lacks: a tokenizer and the image-processor settings."""
    missing = []
    if not any((folder / f).is_file() for f in ("tokenizer.json", "sentencepiece.bpe.model")):
        missing.append("tokenizer.json (or sentencepiece.bpe.model)")
    if not any((folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        missing.append("preprocessor_config.json")
    return missing


def missing_files(folder: Path, need: str = "model") -> list[str]:
    """The files a snapshot lacks for ``need``: for ``"model"``, ``config.json`` and the weights (one file, or an
    index and its shards); for ``"processor"``, the tokenizer and image-processor files. Empty when complete."""
    if need == "processor":
        return _missing_processor_files(folder)
    missing = [] if (folder / "config.json").is_file() else [_named(folder, "config.json")]
    return missing + _missing_weights(folder)


def _snapshot_named(repo: Path, revision: str) -> Path | None:
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        if commit and (repo / "snapshots" / commit).is_dir():
            return repo / "snapshots" / commit
    if (repo / "snapshots" / revision).is_dir():  # a commit hash given as the revision
        return repo / "snapshots" / revision
    return None


def find_in_cache(
    repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None, need: str = "model"
) -> tuple[Path | None, Path | None]:
    """Look ``repo_id`` up in the cache: (a complete snapshot or None, an incomplete candidate or None).

    The snapshot named by ``refs/<revision or main>`` wins when complete; without a revision, the newest complete
    snapshot comes next. The second value is the best snapshot found that lacks files, to name them in errors.
    Complete means complete for ``need`` (:func:`missing_files`).
    """
    repo = repo_folder(repo_id, cache_dir)
    snapshots = repo / "snapshots"
    named = _snapshot_named(repo, revision or "main")
    if named is not None and not missing_files(named, need):
        return named, None
    if revision is not None:
        return None, named
    candidates = (
        sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        if snapshots.is_dir()
        else []
    )
    for snap in candidates:
        if not missing_files(snap, need):
            return snap, None
    partial = named or next((s for s in candidates if (s / "config.json").is_file()), None)
    return None, partial


# ----------------------------------------------------------------------------------------------------------------
# Downloading


def _endpoint_reachable(timeout: float = CONNECT_TIMEOUT_S) -> tuple[bool, str]:
    """Can we open a TCP connection to the Hub endpoint within ``timeout`` seconds (DNS included)?

    The probe runs in a daemon thread because name resolution itself has no timeout. With a proxy configured the
    direct probe means nothing, so it is skipped and huggingface_hub's own timeouts apply.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True, ""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: dict = {}

    def probe():
        import socket

        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result["ok"] = True
        except Exception as exc:  # any failure means "not reachable"; a probe thread must never raise
            result["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if result.get("ok"):
        return True, ""
    return False, result.get("error", f"no answer from {host}:{port} within {timeout:g} s")


def _first_sentence(text: str, limit: int = 200) -> str:
    """The first sentence of an exception message, on one line, so our error stays one sentence."""
    flat = " ".join(str(text).split())
    return flat.split(". ")[0].rstrip(".")[:limit]


def _offline_reason() -> str:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var].strip()}"
    return "offline mode"


def _get_help(repo_id: str) -> str:
    return (
        f"download it where there is network with `hf download {repo_id}` (pip install 'kosmos2-ref[hub]') "
        f"and copy the cache folder here, or pass a local checkpoint folder"
    )


def _download_error(exc: Exception, repo_id: str, where: str) -> CheckpointNotFoundError:
    """What a failed download means, in words: a timeout, an id or revision that is not there, or anything else."""
    kind = type(exc).__name__
    first = _first_sentence(exc)
    if "Timeout" in kind:  # httpx's ReadTimeout, ConnectTimeout, ...
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        return CheckpointNotFoundError(
            f"{where} and the Hugging Face Hub ({endpoint}) did not answer in time ({kind}: {first}): "
            f"{_get_help(repo_id)}"
        )
    if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "HFValidationError"):
        return CheckpointNotFoundError(
            f"{repo_id!r} is not a local folder and could not be fetched from the Hugging Face Hub ({kind}: "
            f"{first}): check the id and revision (or the path, if a local folder was meant), log in with "
            f"`hf auth login` if the repository is gated, or pass a local checkpoint folder"
        )
    return CheckpointNotFoundError(f"{where} and downloading it failed ({kind}: {first}): {_get_help(repo_id)}")


def _import_hub(where: str):
    """huggingface_hub, imported only when a download is needed (an optional extra: ``kosmos2-ref[hub]``)."""
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointNotFoundError(
            f"{where} and huggingface_hub, needed to download it, is not installed: run "
            f"`pip install 'kosmos2-ref[hub]'`, or pass a local checkpoint folder"
        ) from None
    return huggingface_hub


def download(
    repo_id: str,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    need: str = "model",
) -> Path:
    """Download the files of :data:`ALLOW_PATTERNS` of ``repo_id`` into the Hugging Face cache (with progress
    bars on stderr) and return the snapshot folder; :class:`CheckpointNotFoundError` when that cannot be done.

    :func:`resolve_checkpoint` calls it only once ``repo_id`` is known not to be a local folder, so the errors say
    that too: an id like ``models/kosmos2`` may well be a mistyped relative path, not a Hub id. For
    ``need="processor"`` only :data:`PROCESSOR_PATTERNS` are fetched; for a model whose repository has no
    safetensors, a second request fetches :data:`BIN_PATTERNS`.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()
    where = f"{repo_id!r} is neither a local folder nor in the Hugging Face cache ({cache})"
    huggingface_hub = _import_hub(where)
    ok, why = _endpoint_reachable()
    if not ok:
        raise CheckpointNotFoundError(
            f"{where} and the Hugging Face Hub cannot be reached ({why}): {_get_help(repo_id)}"
        )
    what = "processor files" if need == "processor" else "safetensors weights, config and tokenizer files"
    print(f"kosmos2-ref: downloading {repo_id} from the Hugging Face Hub into {cache} ({what} only)", file=sys.stderr)

    def fetch(patterns):
        return Path(
            huggingface_hub.snapshot_download(
                repo_id,
                revision=commit,
                cache_dir=str(cache),
                allow_patterns=patterns,
                etag_timeout=ETAG_TIMEOUT_S,
                token=token,
                library_name="kosmos2-ref",
            )
        )

    try:
        # snapshot_download would resolve the revision with no timeout; resolved here first, it skips that request
        commit = huggingface_hub.model_info(repo_id, revision=revision, token=token, timeout=INFO_TIMEOUT_S).sha
        folder = fetch(PROCESSOR_PATTERNS if need == "processor" else ALLOW_PATTERNS)
        if need == "model" and _missing_weights(folder) and not list(folder.glob("*.safetensors*")):
            print(
                f"kosmos2-ref: {repo_id} has no safetensors weights; downloading its pytorch_model.bin", file=sys.stderr
            )
            folder = fetch(BIN_PATTERNS)
    except Exception as exc:  # huggingface_hub raises many types (HTTP, OS, validation); all mean "not here"
        raise _download_error(exc, repo_id, where) from None
    _write_ref(repo_folder(repo_id, cache), revision or "main", commit)
    lacking = missing_files(folder, need)
    if lacking:
        kind = "a Kosmos-2 processor" if need == "processor" else "a Kosmos-2 checkpoint"
        raise CheckpointNotFoundError(
            f"{repo_id!r} was downloaded to {folder} but has no {', '.join(lacking)}: "
            f"it is not {kind} this package can read"
        )
    return folder


def _write_ref(repo: Path, revision: str, commit: str) -> None:
    """``refs/<revision>`` -> ``commit``, as snapshot_download writes it for a branch or tag (a download by commit
    writes none), so that the cache lookup finds this snapshot under the name it was asked by."""
    if revision == commit or not commit:
        return
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit, encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# The entry point


def mini_folder() -> Path:
    """The packaged miniature's folder (weights, config, tokenizer and image settings). The name ``"mini"``
    always means it; a local folder called mini is ``"./mini"``."""
    folder = MINI_FOLDER
    missing = missing_files(folder) if folder.is_dir() else ["the folder"]
    if missing:
        raise CheckpointNotFoundError(
            f"the miniature model {MINI_MODEL!r} is incomplete in this installation: "
            f"{str(folder)!r} lacks {', '.join(missing)}; reinstall kosmos2-ref"
        )
    return folder


def is_miniature(folder) -> bool:
    """Whether ``folder`` holds the miniature (its ``mini.json`` says what it is and how it was trained)."""
    return folder is not None and (Path(folder) / "mini.json").is_file()


def resolve_checkpoint(
    path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    need: str = "model",
) -> Path:
    """A local folder holding ``config.json``, or a Hub id -> the checkpoint folder (see the module docstring).

    ``revision`` picks a branch, tag or commit of a Hub id; ``cache_dir`` overrides the cache folder;
    ``local_files_only=True`` (or ``HF_HUB_OFFLINE=1``) never touches the network. Raises
    :class:`CheckpointNotFoundError` (a ``ValueError``) naming what is missing and how to get it. ``need`` is
    ``"model"`` (config.json and weights) or ``"processor"`` (tokenizer and image-processor files).
    """
    if need not in NEEDS:
        raise ValueError(f"need must be one of {NEEDS}, got {need!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointNotFoundError(
            f"the checkpoint must be a folder path or a Hub id like {DEFAULT_MODEL_ID!r} "
            f"(a str or os.PathLike), got {path!r}"
        )
    if not isinstance(path, str):
        path = os.fspath(path)
    if path == MINI_MODEL:
        return mini_folder()
    folder = Path(path).expanduser()
    if folder.is_dir():
        broken = broken_links(folder)
        if broken:
            raise CheckpointNotFoundError(
                f"checkpoint folder {str(folder)!r} holds broken symbolic links: "
                f"{', '.join(broken)}; fetch those files again or remove the links"
            )
        if not (folder / "config.json").is_file():
            raise CheckpointNotFoundError(f"checkpoint folder {str(folder)!r} has no config.json")
        return folder
    if folder.exists():
        raise CheckpointNotFoundError(
            f"checkpoint path {str(folder)!r} is a file; expected a folder holding config.json and model.safetensors"
        )
    if not is_hub_id(path):
        raise CheckpointNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")

    found, partial = find_in_cache(path, revision, cache_dir, need)
    if found is not None:
        return found
    offline = local_files_only or is_offline()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()
    if offline:
        if partial is not None:
            what = (
                f"{path!r} is in the Hugging Face cache ({partial}) without {', '.join(missing_files(partial, need))}"
            )
        else:
            what = f"{path!r} is neither a local folder nor in the Hugging Face cache ({cache})" + (
                f" at revision {revision!r}" if revision else ""
            )
        reason = "local_files_only=True" if local_files_only else _offline_reason()
        raise CheckpointNotFoundError(f"{what}, and {reason} forbids downloading it: {_get_help(path)}")
    return download(path, revision=revision, cache_dir=cache_dir, token=token, need=need)
