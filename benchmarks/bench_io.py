"""Saving benchmark results: JSON written atomically (an interrupted run never leaves half a file)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def save_json(path: str | Path, result: dict) -> Path:
    """Write ``result`` as indented JSON to ``path`` (temp file + ``os.replace``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path
