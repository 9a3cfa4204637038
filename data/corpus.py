"""Raw text sources -> a deterministic stream of documents (str), with bad input counted, not fatal.

Sources: plain text (documents separated by blank lines), .gz of any of these, JSON lines (one document per
line, text in a configurable field), directories (recursively, sorted), globs, and `builtin:python-docs`:
English text that every Python install ships (pydoc topics and the standard library's docstrings), read with
`ast` so no module is imported.
"""

from __future__ import annotations

import ast
import codecs
import glob
import gzip
import json
import os
import sysconfig
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

BUILTIN = "builtin:python-docs"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".jsonl", ".json")
LONG_DOCUMENT_LINES = 10_000
"""A plain-text document of more lines than this is likely a file of one document per line, read as one: said
once per file (it is kept: a long text without blank lines is not wrong)."""


class InputError(ValueError):
    """Bad input under --strict: names the file and the line or document."""


class DataError(RuntimeError):
    """Bad shard data under strict mode, or no readable data at all (raised by the reader and the loader; it
    lives here, beside InputError, so the CLI can catch both without importing torch)."""


@dataclass
class CorpusStats:
    """What was read and what was skipped, by reason, with the first place of each (for the log)."""

    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)
    long_documents: dict[str, int] = field(default_factory=dict)
    """path -> lines of its first document longer than LONG_DOCUMENT_LINES."""

    def skip(self, reason: str, where: str, strict: bool, detail: str = "") -> None:
        """`where`: path, with :line (and :column) where there is one; `detail`: what the reader said."""
        said = f" ({detail})" if detail else ""
        if strict:
            raise InputError(f"{where}: {reason}{said}")
        self.skipped[reason] += 1
        self.first.setdefault(reason, where + said)


def expand_inputs(inputs: list[str], other_files: list[str] | None = None) -> list[str]:
    """Files in a stable order; directories are walked, globs expanded; a missing path is an error. A file
    named twice (a folder and a glob inside it) is read once, where it first comes. The files in folders that
    are not read (`directory_files`) are added to `other_files`."""
    files: list[str] = []
    for item in inputs:
        if not item.strip():  # Path("") is the working directory
            raise InputError(f"{item!r}: an empty input path (a shell variable that is not set?)")
        if item == BUILTIN:
            files.append(item)
        elif Path(item).is_dir():  # before globbing: "[" is legal in a file name
            files.extend(directory_files(item, other_files))
        elif Path(item).is_file():
            files.append(item)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise InputError(f"{item}: the pattern matches no file")
            # A folder the pattern matches (`corpus/*` matches `corpus/images`) may hold no text; the pattern
            # as a whole must find some.
            found = [path for match in matches
                     for path in (directory_files(match, other_files, required=False) if Path(match).is_dir()
                                  else [match])]
            if not found:
                raise InputError(f"{item}: the pattern matches no text file ({', '.join(TEXT_SUFFIXES)}, .gz), "
                                 "and no folder holding one")
            files.extend(found)
        elif os.path.exists(item):
            raise InputError(f"{item}: not a file or folder (a pipe or a device: inputs are read more than once)")
        elif os.path.islink(item):
            raise InputError(f"{item}: a link to no file (broken, or a loop of links)")
        elif item.startswith("builtin:"):
            raise InputError(f"{item}: no such built-in corpus; the one there is: {BUILTIN}")
        else:
            raise InputError(f"{item}: no such file or directory")
    unique, seen = [], set()
    for path in files:
        if (real := path if path == BUILTIN else os.path.realpath(path)) not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def directory_files(directory: str, other_files: list[str] | None = None, required: bool = True) -> list[str]:
    """The text files below `directory`, sorted, through linked folders too (each real folder once, by the
    first of its names in sorted order, so a link to a parent ends); other files (images, archives) are not
    documents, and go to `other_files` to be counted. A broken link is kept: reading it counts it as an
    unreadable file. `required`: a folder without a text file is an error."""
    found, visited = [], set()
    for folder, subfolders, names in os.walk(directory, followlinks=True):
        subfolders.sort()  # the listing's order is the file system's
        if (real := os.path.realpath(folder)) in visited:
            subfolders.clear()
            continue
        visited.add(real)
        for path in (Path(folder) / name for name in names):
            if is_text_file(path) and (path.is_file() or path.is_symlink()):
                found.append(path)
            elif other_files is not None and path.is_file():
                other_files.append(str(path))
    found = sorted(map(str, found))
    if not found and required:
        raise InputError(f"{directory}: the directory holds no text file ({', '.join(TEXT_SUFFIXES)}, .gz)")
    return found


def is_text_file(path: Path) -> bool:
    name = path.name.removesuffix(".gz")
    return name.endswith(TEXT_SUFFIXES)


def documents(inputs: list[str], text_field: str = "text", strict: bool = False,
              stats: CorpusStats | None = None, check_gz: bool = True) -> Iterator[str]:
    """Every document of every input, in order. Empty and undecodable documents are skipped and counted.
    `check_gz`: decompress each .gz whole before reading it (`check_gzip`); False for a reader that stops early,
    which keeps the documents read before a fault in a .gz (the count of the unreadable file says how many)."""
    stats = stats if stats is not None else CorpusStats()
    other_files: list[str] = []
    paths = expand_inputs(inputs, other_files)
    # Counted even under strict, never fatal (a folder may hold pictures beside its text): uncounted, a folder of
    # .parquet or .jsonl.zst parts beside a README trained on the README alone, "skipped nothing".
    for path in sorted({os.path.realpath(path): path for path in other_files}.values()):
        stats.skip("file of another kind", path, False, f"read are {', '.join(TEXT_SUFFIXES)} and their .gz")
    for path in paths:
        if path == BUILTIN:
            source = ((f"{BUILTIN} #{index}", text) for index, text in enumerate(builtin_documents()))
        else:
            source = file_documents(path, text_field, strict, stats, check_gz)
        for where, text in source:
            if not text.strip():
                stats.skip("empty document", where, strict)
                continue
            stats.documents += 1
            yield text


def open_binary(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def file_documents(path: str, text_field: str, strict: bool, stats: CorpusStats,
                   check_gz: bool) -> Iterator[tuple[str, str]]:
    """(where, text) for each document of one file; `where` is "path:line"."""
    is_jsonl = path.removesuffix(".gz").endswith((".jsonl", ".json"))
    kept_before = stats.documents  # `documents` counts each document of ours it keeps there
    try:
        if path.endswith(".gz") and os.path.getsize(path) == 0:  # gzip reads it as empty text
            raise EOFError("an empty file, where gzip's header should be (a download cut at its start?)")
        if check_gz and path.endswith(".gz"):
            check_gzip(path)
        with open_binary(path) as handle:
            if is_jsonl:
                yield from jsonl_documents(lines_of(handle), path, text_field, strict, stats)
            else:
                yield from paragraph_documents(lines_of(handle), path, strict, stats)
    except (OSError, EOFError, zlib.error) as err:  # truncated or corrupt .gz, unreadable file
        read = stats.documents - kept_before
        kept = f"; the {read:,} documents read before it were kept" if read else ""
        stats.skip("unreadable file", path, strict, f"{err}{kept}")


def check_gzip(path: str) -> None:
    """Decompress a .gz to its end before any of its documents is used. Gzip checks a member's CRC only at its
    end: a corrupt file first decompresses to garbage text, and a truncated one stops part-way, so the
    documents read before the error were kept while the file was counted as skipped. Costs one more
    decompression per read, a fraction of what tokenizing the text takes."""
    with gzip.open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass


def lines_of(handle: IO[bytes]) -> Iterator[bytes]:
    """The file's lines without the UTF-8 byte-order mark some editors write first, which would otherwise
    start the first document or make its JSON line invalid."""
    lines = iter(handle)
    yield next(lines, b"").removeprefix(codecs.BOM_UTF8)
    yield from lines


def jsonl_documents(lines: Iterable[bytes], path: str, text_field: str, strict: bool,
                    stats: CorpusStats) -> Iterator[tuple[str, str]]:
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            stats.skip("invalid UTF-8", f"{path}:{number}", strict, f"byte {err.start + 1} of the line")
            continue
        except json.JSONDecodeError as err:
            stats.skip("invalid JSON", f"{path}:{number}:{err.colno}", strict, err.msg)
            continue
        except (ValueError, RecursionError) as err:  # numbers past int's digit limit, nesting past the stack
            stats.skip("invalid JSON", f"{path}:{number}", strict, str(err))
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            stats.skip("missing text field", f"{path}:{number}", strict, f"no string field {text_field!r}")
            continue
        try:  # JSON escapes can spell a lone surrogate ("\ud800"), which no UTF-8 text holds
            text.encode("utf-8")
        except UnicodeEncodeError:
            stats.skip("invalid UTF-8", f"{path}:{number}", strict, "a lone surrogate escape")
            continue
        yield f"{path}:{number}", text


def paragraph_documents(lines: Iterable[bytes], path: str, strict: bool,
                        stats: CorpusStats) -> Iterator[tuple[str, str]]:
    """Documents separated by blank lines; a block with undecodable bytes is skipped whole."""
    block: list[bytes] = []
    start = 1
    for number, raw in enumerate(lines, 1):
        if raw.strip():
            if not block:
                start = number
            block.append(raw)
            continue
        if block:
            yield from decode_block(block, path, start, strict, stats)
            block = []
    if block:
        yield from decode_block(block, path, start, strict, stats)


def decode_block(block: list[bytes], path: str, line: int, strict: bool,
                 stats: CorpusStats) -> Iterator[tuple[str, str]]:
    if len(block) > LONG_DOCUMENT_LINES:
        stats.long_documents.setdefault(path, len(block))
    # A Windows file's line ends are the file's, not the document's: kept, each "\r" became a byte token.
    raw = b"".join(block).replace(b"\r\n", b"\n")
    try:
        yield f"{path}:{line}", raw.decode("utf-8").strip()
    except UnicodeDecodeError as err:  # named at the bad byte's line: the block may be a whole file
        bad_line = line + raw.count(b"\n", 0, err.start)
        stats.skip("invalid UTF-8", f"{path}:{bad_line}", strict, f"in the document that starts at line {line}")


def builtin_documents() -> Iterator[str]:
    """Python's own documentation: pydoc topics, then module/class/function docstrings of the stdlib."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip_parts = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    for path in sorted(stdlib.rglob("*.py")):
        if skip_parts.intersection(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    yield doc
