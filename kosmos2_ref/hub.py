"""Finding a checkpoint folder. (A local folder for now; Hub-cache lookup is added with the command line.)"""
from __future__ import annotations

from pathlib import Path


class CheckpointNotFoundError(ValueError):
    """No checkpoint folder could be found for the given path or id."""


def resolve_checkpoint(path, **_) -> Path:
    """A local folder holding ``config.json`` -> its Path; otherwise a clear error."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise CheckpointNotFoundError(f"checkpoint folder {str(folder)!r} has no config.json")
        return folder
    raise CheckpointNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
