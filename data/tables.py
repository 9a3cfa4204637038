"""Per-vocabulary tables the masking policies read (IDF weights, collocations): written atomically next to a
JSON record of what they were built from, and read back with errors that say how to build them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from masktrain.data.files import read_json, write_atomic, write_json


def save(path: str | Path, table: np.ndarray, record: dict) -> None:
    """Write `table` to `path` and `record` to `<path>.json`, each with `write_atomic`, so a crash never leaves
    half a table, nor a record beside a table that never reached the disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = io.BytesIO()
    np.save(content, table)
    write_atomic(path, content.getvalue())
    write_json(path.with_name(path.name + ".json"), record)


def load(path: str | Path, what: str, command: str, key: str, fingerprint: str = "") -> np.ndarray:
    """The array at `path`; a missing or unreadable file names the `command` that builds it and the config
    `key` that points elsewhere. Given the run tokenizer's `fingerprint`, a table whose record names another
    tokenizer is refused: a data folder's shards written again with a tokenizer of the same size leave its
    tables in place, counted with ids that now mean other tokens. (A table without a record, one of the
    researcher's own or built before records named the tokenizer, can't tell.)"""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what}; build it with `masktrain data {command} CONFIG` or set {key}")
    try:
        table = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # EOFError: an empty file
        raise ValueError(f"{path}: not a numpy table ({err})") from None
    if not isinstance(table, np.ndarray):
        table.close()
        raise ValueError(f"{path}: not a numpy table (an .npz archive of arrays; save one array with np.save)")
    built = (read_json(path.with_name(path.name + ".json")) or {}).get("tokenizer_sha256")
    if fingerprint and built not in (None, fingerprint):
        raise ValueError(f"{path}: built for another tokenizer (sha256 {str(built)[:12]}, the run's is "
                         f"{fingerprint[:12]}): its ids would mean other tokens; build it again with "
                         f"`masktrain data {command} CONFIG`")
    return table
