"""Per-vocabulary tables the masking policies read (IDF weights, collocations): written atomically next to a
JSON record of what they were built from, and read back with errors that say how to build them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def save(path: str | Path, table: np.ndarray, record: dict) -> None:
    """Write `table` to `path` and `record` to `<path>.json`, each under a temporary name renamed into place, so
    a crash never leaves half a table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, table)
    os.replace(tmp, path)
    write_json(path.with_name(path.name + ".json"), record)


def write_json(path: Path, obj: dict) -> None:
    """Indented JSON under a temporary name renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """The record at `path`, or None when there is none or it is unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load(path: str | Path, what: str, command: str, key: str) -> np.ndarray:
    """The array at `path`; a missing or unreadable file names the `command` that builds it and the config
    `key` that points elsewhere."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what}; build it with `masktrain data {command} CONFIG` or set {key}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a numpy table ({err})") from None
