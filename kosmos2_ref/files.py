"""The small files of a checkpoint folder: is one there, and why can it not be read.

``Path.is_file()`` answers False for a broken symbolic link, a folder or a pipe alike, so "is it there?" asked
that way turns "there, but broken" into "missing" (or into a silently skipped setting). :func:`file_present`
tells the two apart, :func:`read_bytes` / :func:`read_text` name the file and the reason when reading fails, and
:func:`read_json_object` reads the small JSON files (configs, tokenizer settings).
Each raises a ValueError that names the path, what is wrong and what was expected.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path


def _kind(path: Path) -> str:
    """What a path that exists but is no regular file is, in words."""
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def broken_link_message(path: Path) -> str:
    return (
        f"{str(path)!r} is a broken symbolic link: it points to {os.readlink(path)!r}, which does not exist "
        f"(an interrupted download or a deleted cache file?); fetch the file again or remove the link"
    )


def file_present(path: str | Path) -> bool:
    """True when ``path`` is a regular file (links followed), False when nothing is there; a ValueError when
    something is there that cannot be read as a file: a broken symbolic link, a folder, a pipe (whose reading
    would wait for a writer forever)."""
    path = Path(path)
    if path.is_file():
        return True
    if path.is_symlink() and not path.exists():
        raise ValueError(broken_link_message(path))
    if path.exists():
        raise ValueError(f"{str(path)!r} is {_kind(path)}; expected a file")
    return False


def read_bytes(path: str | Path) -> bytes:
    """The bytes of the file ``path``; a ValueError naming it when it is missing, broken or unreadable."""
    path = Path(path)
    if not file_present(path):
        raise ValueError(f"{str(path)!r} does not exist")
    try:
        return path.read_bytes()
    except OSError as err:  # PermissionError, EIO, ...
        raise ValueError(f"{str(path)!r} cannot be read: {err.strerror or err}") from None


def read_text(path: str | Path) -> str:
    """The UTF-8 text of the file ``path`` (see :func:`read_bytes`); a ValueError when it is not UTF-8."""
    try:
        return read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {err}") from None


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``, or a ValueError naming the file and what was wrong (unreadable, a broken
    link, not JSON, not an object)."""
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not a readable JSON file: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data
