"""Files replaced whole or not at all, and on disk before anything that points to them: a power loss must not
leave a manifest, recipe or `latest` naming files whose bytes never reached the disk (a rename can reach it
before the data it names)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path


def write_atomic(path: Path, content: str | bytes, tmp_name: str = "") -> None:
    """Replaces `path` whole or not at all, durably; the content goes first to `tmp_name` beside it (default:
    the name + ".tmp")."""
    tmp = path.with_name(tmp_name or path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: no part-written file left beside `path`
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory to make renames inside it durable (they live in the directory). A file
    system that cannot sync a directory (some FUSE mounts say EINVAL) keeps its renames as it can: as SQLite
    does, that is not an error."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS) or not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def sync_tree(path: Path, done: frozenset[Path] | set[Path] = frozenset()) -> None:
    """fsync the files under `path` not in `done` (resolved paths), then every folder (their entries are the
    files' names), so a rename that publishes `path` never precedes its contents on disk."""
    entries = sorted(path.rglob("*"))
    for file in entries:
        if file.is_file() and file.resolve() not in done:
            fsync_path(file)
    for folder in [*(e for e in entries if e.is_dir()), path]:
        fsync_path(folder)


def write_json(path: Path, obj: dict) -> None:
    """Indented JSON, written with `write_atomic`."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> dict | None:
    """The record at `path`, or None when there is none or it is unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
