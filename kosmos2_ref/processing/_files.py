"""Reading the small JSON files of a checkpoint folder (shared by the image and text processors)."""
from __future__ import annotations

import json
from pathlib import Path

from ..files import read_text


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
