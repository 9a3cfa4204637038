"""Tokenized documents -> WebDataset shards plus a JSON manifest.

Each sample is one document: `<key>.tokens.npy`, the token ids as a 1-D uint16 (uint32 for vocabularies
over 65,536) numpy array, readable by plain `webdataset` and `tar`. Word starts for whole-word masking are
derived from the pieces (`Tokenizer.vocab().word_start`), so they need no space in the shards.

The train/validation split hashes each document's text, so it does not depend on input order. Within a split,
documents pass through a seeded shuffle buffer so that each shard mixes the input's files and sources (the
loader shuffles only within a shard). Headers carry no time stamp: the same input and seed give
byte-identical shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

from masktrain.data.files import fsync_path, write_json
from masktrain.data.reader import TOKENS_KEY, DataError

MANIFEST = "manifest.json"
STAGING = ".writing"
"""The folder in each split's folder where `write_dataset` puts new shards until they replace the earlier ones
(on the split folder's own file system, which may be another's than the dataset folder's, so renames work);
in a tokenizer's folder, where `build_tokenizer` writes its files."""
STAGED_MANIFEST = MANIFEST + ".new"  # a write's manifest, whole on disk before the earlier dataset is taken out
SPLITS = ("train", "val")
SHARD_PATTERN = "shard-{:06d}.tar"
TAR_BLOCK = 512


@dataclass
class ShardInfo:
    path: str
    """Relative to the dataset folder."""
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    sha256: str = ""
    """Of the file as written: `verify_shards` finds a copy cut short or changed."""


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def is_validation(text: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 1_000_000 < val_fraction * 1_000_000


def npy_bytes(array: np.ndarray) -> bytes:
    """What np.save writes for a 1-D array (format 1.0), ~7x faster than np.save for a short document."""
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%d,), }" % (array.dtype.str, len(array))
    header += " " * (63 - (10 + len(header)) % 64) + "\n"  # numpy pads the header to a multiple of 64
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + array.tobytes()


class SplitWriter:
    """Writes one split's shards, starting a new shard once the current one reaches `shard_bytes`.

    Documents wait in a buffer of `shuffle_buffer` and leave it in a seeded random order (0: input order)."""

    def __init__(self, root: Path, split: str, shard_bytes: int, shuffle_buffer: int, seed: int):
        self.root, self.split, self.shard_bytes = root, split, shard_bytes
        self.buffer, self.rng = shuffle_buffer, np.random.default_rng(seed)
        self.held: list[np.ndarray] = []
        self.info = SplitInfo()
        self.writer: wds.TarWriter | None = None
        self.count = 0
        (root / split / STAGING).mkdir(parents=True, exist_ok=True)

    def add(self, tokens: np.ndarray) -> None:
        if len(self.held) < self.buffer:
            self.held.append(tokens)
            return
        if self.buffer:
            pick = int(self.rng.integers(self.buffer))
            self.held[pick], tokens = tokens, self.held[pick]
        self.write(tokens)

    def write(self, tokens: np.ndarray) -> None:
        if self.writer is None or self.info.shards[-1].bytes >= self.shard_bytes:
            self.roll()
        payload = npy_bytes(tokens)
        self.writer.write({"__key__": f"{self.count:010d}", TOKENS_KEY: payload})
        shard = self.info.shards[-1]
        shard.documents += 1
        shard.tokens += len(tokens)
        shard.bytes += TAR_BLOCK + -(-len(payload) // TAR_BLOCK) * TAR_BLOCK  # header + padded data
        self.count += 1

    def roll(self) -> None:
        self.close_shard()
        relative = f"{self.split}/{SHARD_PATTERN.format(len(self.info.shards))}"
        self.info.shards.append(ShardInfo(path=relative))
        # An integer mtime keeps headers plain ustar: a float one costs each member a 1 KiB pax header. The path is
        # absolute, as gopen would take a folder named like `run-06-01T12:30` for a URL scheme.
        self.writer = wds.TarWriter(str(staged(self.root, relative).absolute()), mtime=0)

    def close_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            shard = self.info.shards[-1]
            path = staged(self.root, shard.path)
            fsync_path(path)  # before the manifest that records it: see publish_dataset
            shard.bytes, shard.sha256 = file_size_and_sha256(path)

    def abandon(self) -> None:
        """Close the open shard after a failed write, once: tarfile would try to flush it again when collected, and
        print that error too."""
        if self.writer is not None:
            with contextlib.suppress(OSError):
                self.writer.close()
            self.writer = None

    def close(self) -> None:
        for pick in self.rng.permutation(len(self.held)):
            self.write(self.held[pick])
        self.held = []
        self.close_shard()


def write_dataset(docs: Iterable[tuple[str, np.ndarray]], root: str | Path, vocab_size: int,
                  shard_bytes: int, val_fraction: float, shuffle_buffer: int = 0, seed: int = 0) -> dict:
    """Write (text, token ids) pairs into `root/{train,val}/.writing/shard-*.tar`; returns the manifest, which
    the caller completes and passes to `publish_dataset` once the input's own counts are known. Until then the
    folder's earlier shards and manifest are untouched, so a write that fails (or finds no documents) loses
    nothing; `discard_staged` removes what it wrote."""
    root = Path(root)
    discard_staged(root)  # a write that died before
    dtype = token_dtype(vocab_size)
    writers = {split: SplitWriter(root, split, shard_bytes, shuffle_buffer, seed + index)
               for index, split in enumerate(SPLITS)}
    empty = 0
    try:
        for text, tokens in docs:
            if len(tokens) == 0:
                empty += 1
                continue
            writers["val" if is_validation(text, val_fraction) else "train"].add(np.asarray(tokens, dtype=dtype))
        for writer in writers.values():
            writer.close()
    except BaseException as err:
        for writer in writers.values():
            writer.abandon()
        discard_staged(root)
        if isinstance(err, OSError):  # a full disk or quota: its message names no file, and came as a traceback
            raise DataError(f"{root}: writing the shards failed ({err}); the folder is as it was") from None
        raise
    manifest = {
        "version": 1,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "splits": {split: {"documents": w.info.documents, "tokens": w.info.tokens,
                           "shards": [asdict(s) for s in w.info.shards]} for split, w in writers.items()},
        "skipped": {"no tokens": empty},
    }
    return manifest


def file_size_and_sha256(path: Path, hashed: bool = True) -> tuple[int, str]:
    """(size, sha256) of a file, opened once; without `hashed` its bytes are not read and the sha256 is "", but
    the open still finds a file this user cannot read."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest() if hashed else ""
        return os.fstat(handle.fileno()).st_size, digest


def verify_shards(root: str | Path, workers: int = 4) -> tuple[list[str], dict[str, int]]:
    """(problems, totals) of the shards a dataset folder's manifest lists: each must be there with the size it was
    written with and, where the manifest records one (shards written before it did have none), the same sha256.
    Files are hashed `workers` at a time (hashing releases the interpreter)."""
    root = Path(root)
    shards = [shard for split in SPLITS for shard in read_manifest(root)["splits"][split]["shards"]]

    def problem(shard: dict) -> str | None:
        path = root / shard["path"]
        try:
            size, digest = file_size_and_sha256(path, hashed=bool(shard.get("sha256")))
        except FileNotFoundError:
            return f"{path}: missing"
        except OSError as err:
            return f"{path}: unreadable ({err.strerror or err})"
        if "bytes" in shard and size != shard["bytes"]:
            return (f"{path}: {size:,} bytes, the manifest records {shard['bytes']:,}: cut short or changed since "
                    "it was written")
        if digest != shard.get("sha256", ""):
            return (f"{path}: sha256 {digest[:16]}..., the manifest records {shard['sha256'][:16]}...: its bytes "
                    "changed since it was written")
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = [found for found in pool.map(problem, shards) if found]
    return problems, {"shards": len(shards), "hashed": sum(bool(s.get("sha256")) for s in shards),
                      "bytes": sum(s.get("bytes", 0) for s in shards)}


def staged(root: Path, relative: str) -> Path:
    """Where the shard the manifest will list as `relative` (split/name) is written before it is published."""
    split, name = relative.split("/")
    return root / split / STAGING / name


def discard_staged(root: str | Path) -> None:
    for split in SPLITS:
        shutil.rmtree(Path(root) / split / STAGING, ignore_errors=True)
    (Path(root) / STAGED_MANIFEST).unlink(missing_ok=True)


def publish_dataset(root: str | Path, manifest: dict) -> None:
    """Put the shards `write_dataset` staged in place of the folder's earlier ones, then the manifest. Until it
    is in place the folder has no manifest, so a publish that dies is never reused; and no shard of an earlier,
    larger write stays behind for a brace pattern in data.train_shards to pick up. The manifest is written
    before anything is taken out: a disk too full for it leaves the folder as it was."""
    root = Path(root)
    try:
        write_json(root / STAGED_MANIFEST, manifest)
    except OSError as err:
        discard_staged(root)
        raise DataError(f"{root}: writing the manifest failed ({err}); the folder is as it was") from None
    (root / MANIFEST).unlink(missing_ok=True)
    # Each step is on disk before the next: a power loss must not keep the old manifest over new shards, nor a
    # new manifest over shards whose bytes or names were lost (close_shard synced the bytes).
    fsync_path(root)
    for old in itertools.chain.from_iterable((root / split).glob("shard-*.tar") for split in SPLITS):
        old.unlink()
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            staged(root, shard["path"]).rename(root / shard["path"])
        fsync_path(root / split)
    (root / STAGED_MANIFEST).replace(root / MANIFEST)
    fsync_path(root)
    discard_staged(root)


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run `masktrain data prepare` or set data.train_shards")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable manifest ({err}); remove it, then run `masktrain data prepare` "
                        "again") from None
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not (isinstance(splits, dict) and all(
            isinstance(splits.get(split), dict) and isinstance(splits[split].get("shards"), list)
            and all(shard_record(shard) for shard in splits[split]["shards"]) for split in SPLITS)):
        raise DataError(f"{path}: not a masktrain manifest (it needs splits.train and splits.val, each with a list "
                        "of shards that have a path, and a whole number of bytes and a sha256 text where they "
                        "record them); remove it, then run `masktrain data prepare` again")
    return manifest


def shard_record(shard) -> bool:
    """Whether `shard` is a manifest's record of a shard, as `write_dataset` writes them."""
    return (isinstance(shard, dict) and isinstance(shard.get("path"), str)
            and type(shard.get("bytes", 0)) is int and isinstance(shard.get("sha256", ""), str))


def manifest_urls(root: str | Path, split: str) -> list[str]:
    """Absolute shard paths of one split, in manifest order."""
    return shard_paths(root, read_manifest(root)["splits"][split]["shards"])


def shard_paths(root: str | Path, shards: list[dict]) -> list[str]:
    """The absolute paths of a manifest's record of shards, in `root`: the loader opens them with gopen, which
    would take a relative `run-06-01T12:30/train/...` for a URL of scheme `run-06-01t12`."""
    return [str((Path(root) / shard["path"]).absolute()) for shard in shards]


def tokenize_stream(texts: Iterable[str], tokenizer, threads: int = 1,
                    batch_docs: int = 1024) -> Iterator[tuple[str, np.ndarray]]:
    """(text, ids) pairs in input order. Batches of `batch_docs` documents are encoded on sentencepiece's own
    `threads` in a background thread, while the caller writes the previous batch and reads the next:
    sentencepiece releases the GIL, so encoding overlaps the Python work (benchmarks/bench_shards.py)."""
    texts = iter(texts)
    with ThreadPoolExecutor(1) as encoder:
        pending = None
        while True:
            batch = list(itertools.islice(texts, batch_docs))
            ahead = encoder.submit(tokenizer.encode, batch, threads) if batch else None
            if pending is not None:
                yield from zip(pending[0], pending[1].result())
            if ahead is None:
                return
            pending = (batch, ahead)
