"""Per-vocabulary tables the masking policies read (IDF weights, collocations): written atomically next to a
JSON record of what they were built from, and read back with errors that say how to build them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from masktrain.data.files import write_atomic, write_json


def save(path: str | Path, table: np.ndarray, record: dict) -> None:
    """Write `table` to `path` and `record` to `<path>.json`, each with `write_atomic`, so a crash never leaves
    half a table, nor a record beside a table that never reached the disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = io.BytesIO()
    np.save(content, table)
    write_atomic(path, content.getvalue())
    write_json(path.with_name(path.name + ".json"), record)


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
