"""Reading documents out of one shard, with bad data counted by reason instead of lost.

Shards are opened with webdataset's `gopen`, so a URL is a path, a `pipe:` command (object storage through
`pipe:aws s3 cp ... -`) or anything else webdataset opens. The tar is read here rather than through
`webdataset.tarfile_samples` because Python's tarfile ends an archive quietly at a truncated or garbled header
after the first member, and webdataset passes that on: a shard cut at a member boundary would lose its tail
without a word. Here every archive must end with tar's end-of-archive block, and nothing but zeros may follow
it. A gzip'd shard is inflated here rather than by tarfile, whose stream mode never checks gzip's CRC (a
flipped bit became other token ids, read as good) and inflates only the first member (bgzip writes many; `cat`
of two .tar.gz makes two). A member's CRC is checked at its end, after its documents were read: the shard is
counted as corrupt then, as a truncated one is counted after the documents before the cut.

A truncated, corrupt or empty tar, a member that is not a token array (or not a file), a token id outside the
vocabulary and an empty document are skipped and counted by reason; under `strict` they raise `DataError`
naming the shard URL and the member.
"""

from __future__ import annotations

import contextlib
import io
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import braceexpand
import numpy as np
from webdataset import gopen
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

from masktrain.data.corpus import DataError

TOKENS_KEY = "tokens.npy"
# Errors that reading a shard can raise: tar structure, I/O and pipe exits, gzip streams.
READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)


class Skips:
    """Counts bad data by reason, or raises `DataError` naming it under strict mode."""

    def __init__(self, strict: bool, counts: dict[str, int] | None = None):
        self.strict = strict
        self.counts: Counter = Counter(counts or {})

    def __call__(self, reason: str, where: str, count: bool = True) -> None:
        """`count=False` reports a problem another reader counts (the same shard read for another slot)."""
        if self.strict:
            raise DataError(f"{reason}: {where}")
        if count:
            self.counts[reason] += 1


@dataclass(frozen=True)
class Unit:
    """What one loader slot reads at a time: a shard, or every `parts`-th document of it (starting at `part`)
    when there are fewer shards than slots."""

    url: str
    part: int = 0
    parts: int = 1


def expand_urls(patterns: list[str]) -> list[str]:
    """Brace patterns (`shard-{000000..000127}.tar`) expanded, in order; `pipe:` commands included."""
    return [url for pattern in patterns for url in braceexpand.braceexpand(pattern)]


class EndAwareInfo(tarfile.TarInfo):
    """Records the header error that ended the member list, which tarfile swallows after the first member."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as err:
            archive.end_error = err
            raise


def end_problem(err: Exception | None) -> str | None:
    """Why an archive whose member list ended is bad, or None for tar's end-of-archive block."""
    if isinstance(err, tarfile.EOFHeaderError):
        return None
    if isinstance(err, tarfile.InvalidHeaderError):
        return "corrupt shard"
    return "truncated shard"  # no end-of-archive block: the data stops at or inside a header


class Unread:
    """A stream with the bytes read from its start (to tell its format) put back in front."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        """As many bytes as asked for (tarfile tells a compression by the magic in its first read of 512)."""
        if size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + self.stream.read(size - len(data)) if len(data) < size else data


class Inflated:
    """A gzip'd stream inflated member after member, each member's CRC and length checked by zlib (which raises
    `zlib.error` on a mismatch); zeros may pad the members. Input that stops inside a member ends the output
    after the bytes before the cut, with `cut` set: `gzip.GzipFile` raises there instead, and tarfile's read
    would drop those bytes with the error."""

    def __init__(self, stream):
        self.stream, self.pending, self.cut = stream, b"", False
        self.inflater, self.fresh = zlib.decompressobj(wbits=31), True

    def read(self, size: int = -1) -> bytes:
        """The next inflated bytes, at most `size` (-1: all the rest); b"" at the end."""
        if size < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        while size:
            if self.inflater.eof:  # a member ended, checked: another may follow
                # All the input left, which unconsumed_tail may hold part of a second time.
                self.pending = self.inflater.unused_data
                self.inflater, self.fresh = zlib.decompressobj(wbits=31), True
            if self.fresh:
                self.pending = self.pending.lstrip(b"\0")
            if not self.pending:
                self.pending = self.stream.read(1 << 16)
                if not self.pending:
                    self.cut = not self.fresh
                    return b""
                continue
            data = self.inflater.decompress(self.pending, size)
            self.pending, self.fresh = self.inflater.unconsumed_tail, False
            if data:
                return data
        return b""


def tar_input(stream):
    """What tarfile reads from the shard's `stream`: a gzip'd one inflated by `Inflated` (see the module's notes)."""
    head = stream.read(2)
    return Inflated(Unread(head, stream)) if head == b"\x1f\x8b" else Unread(head, stream)


def past_the_end(stream) -> bool:
    """Whether tarfile's (decompressing) tar `stream`, read to its end, holds anything but zeros after the
    end-of-archive block, or after its first compressed member (bzip2, xz). `cat a.tar b.tar` (or of two
    .tar.gz) makes the first: tar and tarfile stop at the first end block, and the members of b would be lost
    without a word."""
    found = False
    while chunk := stream.read(1 << 16):
        found = found or chunk.count(0) != len(chunk)
    rest = getattr(getattr(stream, "cmp", None), "unused_data", b"")
    return found or rest.count(0) != len(rest)


def read_problem(err: Exception, member: str | None) -> str:
    """The reason to count for an error raised while reading an archive (tarfile has no class per cause)."""
    if member is None:
        return "unreadable shard"
    if isinstance(err, EOFError) or "unexpected end of data" in str(err):
        return "truncated shard"
    if isinstance(err, OSError):
        return "unreadable shard"  # the read itself failed part-way: a pipe's command exited, a disk error
    return "corrupt shard"


def members(url: str, skip: Callable[..., None], count: bool = True) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in the tar at `url`. A problem with the archive itself goes to
    `skip(reason, where, count)` once, after the members read before it."""
    name, position, problem, detail, stream, files, others = None, "", None, "", None, 0, 0
    try:
        stream = gopen(url, "rb")
        source = tar_input(stream)
        with tarfile.open(fileobj=source, mode="r|*", tarinfo=EndAwareInfo) as archive:
            for info in archive:
                name, position = info.name, "in"
                data = archive.extractfile(info).read() if info.isreg() else None
                position = "after"
                archive.members = []  # stream mode keeps every header otherwise
                if data is not None:
                    files += 1
                    yield name, data
                elif not info.isdir():  # folders are how `tar` lists a tree; a link's data is elsewhere
                    others += 1
                    skip("bad sample", f"{url}: member {name} is not a regular file", count)
            problem = end_problem(getattr(archive, "end_error", None))
            if problem is None and past_the_end(archive.fileobj):
                problem = "data after end of shard"
            elif problem is None and getattr(source, "cut", False):  # the tar's end came, gzip's own end not
                problem = "truncated shard"
            elif problem is None and files == others == 0:
                # A file of zeros (what a crash can leave of a file being written) reads as an empty archive.
                problem, detail = "empty shard", ": no file in it"
        if problem is None:
            # A pipe's command may still be writing the padding after the end block; reading it lets the
            # command exit cleanly, so the exit status that close() checks means something.
            while stream.read(1 << 16):
                pass
        stream, opened = None, stream
        opened.close()
    except READ_ERRORS as err:
        problem, detail = read_problem(err, name), f": {err}"
    finally:
        if stream is not None:  # left early (error, or the reader stopped): the status no longer matters
            with contextlib.suppress(*READ_ERRORS):
                stream.close()
    if problem is not None:
        where = f"{url}: {'at the start' if name is None else f'{position} member {name}'}{detail}"
        skip(problem, where, count)


def samples(url: str, skip: Callable[..., None], count: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for consecutive members sharing a key, as webdataset groups them. webdataset
    drops a member with no extension without a word and fails the shard on a repeated one; here both are
    skipped as bad samples, the repeat after its first copy. `__name__` members are webdataset's metadata."""
    key, sample = None, {}
    for name, data in members(url, skip, count):
        prefix, suffix = base_plus_ext(name)
        if prefix is None:
            if not (name.startswith(meta_prefix) and name.endswith(meta_suffix) and "/" not in name):
                skip("bad sample", f"{url}: member {name} has no extension, so it belongs to no sample", count)
            continue
        if prefix != key and sample:
            yield key, sample
            sample = {}
        key = prefix
        if suffix in sample:
            skip("bad sample", f"{url}: member {name} repeats the one before it; the first is kept", count)
            continue
        sample[suffix] = data
    if sample:
        yield key, sample


# The header numpy writes for a 1-D array. Parsing it here is ~20x faster than np.load, whose
# ast.literal_eval of the header costs more than everything else the loader does with a document.
NPY_1D = re.compile(rb"\x93NUMPY\x01\x00..\{'descr': '([<>|][iu][1248])', 'fortran_order': False, "
                    rb"'shape': \((\d+),\), \} *\n", re.S)


def decode_tokens(data: bytes) -> np.ndarray:
    """A 1-D integer array from .npy bytes; raises ValueError on anything else."""
    header = NPY_1D.match(data)
    if header is None:
        array = np.load(io.BytesIO(data), allow_pickle=False)  # any other .npy layout
    else:
        array = np.frombuffer(data, dtype=np.dtype(header.group(1).decode()), offset=header.end())
        if len(array) != int(header.group(2)):
            raise ValueError(f"{len(array)} values where the header says {int(header.group(2))}")
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"expected a 1-D integer array, got {array.dtype} {array.shape}")
    return array


def read_unit(unit: Unit, skip: Callable[..., None], vocab_size: int = 0) -> Iterator[np.ndarray]:
    """The unit's documents as integer arrays, in shard order. Bad data goes to `skip(reason, where)`, which
    counts it or raises; ids must be below `vocab_size` when it is > 0."""
    # Every part of a shard reads the whole archive; only part 0 counts the archive's own problems.
    for index, (key, sample) in enumerate(samples(unit.url, skip, count=unit.part == 0)):
        if index % unit.parts != unit.part:
            continue
        member = f"{unit.url}: member {key}.{TOKENS_KEY}"
        if TOKENS_KEY not in sample:
            skip("bad sample", f"{unit.url}: sample {key} has no {TOKENS_KEY} (has: {', '.join(sample)})")
            continue
        try:
            tokens = decode_tokens(sample[TOKENS_KEY])
        except Exception as err:  # anything np.load can raise on bad bytes
            skip("bad sample", f"{member}: {err}")
            continue
        if len(tokens) == 0:
            skip("empty document", member)
            continue
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or (vocab_size and high >= vocab_size):
            skip("bad sample", f"{member}: token id {low if low < 0 else high} outside the vocabulary "
                               f"({vocab_size or 'ids must be >= 0'})")
            continue
        yield tokens
