"""Tokenized documents -> WebDataset shards plus a JSON manifest.

Each sample is one document: `<key>.tokens.npy`, the token ids as a 1-D uint16 (uint32 for vocabularies
over 65,536) numpy array, readable by plain `webdataset` and `tar`. Word starts for whole-word masking are
derived from the pieces (`Tokenizer.vocab().word_start`), so they need no space in the shards.
The split into train/validation hashes each document's text, so it does not depend on input order.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SHARD_PATTERN = "shard-{:06d}.tar"


@dataclass
class ShardInfo:
    path: str
    """Relative to the dataset folder."""
    documents: int = 0
    tokens: int = 0
    bytes: int = 0


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


class SplitWriter:
    """Writes one split's shards, starting a new shard once the current one reaches `shard_bytes`."""

    def __init__(self, root: Path, split: str, shard_bytes: int, dtype: np.dtype):
        self.root, self.split, self.shard_bytes, self.dtype = root, split, shard_bytes, dtype
        self.info = SplitInfo()
        self.writer: wds.TarWriter | None = None
        self.count = 0
        (root / split).mkdir(parents=True, exist_ok=True)

    def write(self, tokens: list[int]) -> None:
        if self.writer is None or self.info.shards[-1].bytes >= self.shard_bytes:
            self.roll()
        array = np.asarray(tokens, dtype=self.dtype)
        self.writer.write({"__key__": f"{self.count:010d}", "tokens.npy": array})
        shard = self.info.shards[-1]
        shard.documents += 1
        shard.tokens += len(tokens)
        # What reached the file so far (tar buffers at most one 10 KiB record).
        shard.bytes = os.path.getsize(self.root / shard.path)
        self.count += 1

    def roll(self) -> None:
        self.close()
        relative = f"{self.split}/{SHARD_PATTERN.format(len(self.info.shards))}"
        self.info.shards.append(ShardInfo(path=relative))
        # mtime fixed so the same input gives byte-identical shards.
        self.writer = wds.TarWriter(str(self.root / relative), mtime=0.0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.info.shards[-1].bytes = os.path.getsize(self.root / self.info.shards[-1].path)


def write_dataset(docs: Iterable[tuple[str, list[int]]], root: str | Path, vocab_size: int,
                  shard_bytes: int, val_fraction: float, extra: dict | None = None) -> dict:
    """Write (text, token ids) pairs into `root/{train,val}/shard-*.tar`; returns the manifest."""
    root = Path(root)
    dtype = token_dtype(vocab_size)
    writers = {split: SplitWriter(root, split, shard_bytes, dtype) for split in SPLITS}
    empty = 0
    for text, tokens in docs:
        if not tokens:
            empty += 1
            continue
        writers["val" if is_validation(text, val_fraction) else "train"].write(tokens)
    for writer in writers.values():
        writer.close()
    manifest = {
        "version": 1,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "splits": {split: {"documents": w.info.documents, "tokens": w.info.tokens,
                           "shards": [asdict(s) for s in w.info.shards]} for split, w in writers.items()},
        "skipped": {"no tokens": empty},
        **(extra or {}),
    }
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(root / MANIFEST)
    return manifest


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run `masktrain data prepare` or set data.train_shards")
    return json.loads(path.read_text())


def manifest_urls(root: str | Path, split: str) -> list[str]:
    """Absolute shard paths of one split, in manifest order."""
    manifest = read_manifest(root)
    return [str(Path(root) / shard["path"]) for shard in manifest["splits"][split]["shards"]]


def tokenize_stream(texts: Iterable[str], tokenizer, batch_docs: int = 256,
                    threads: int = 1) -> Iterator[tuple[str, list[int]]]:
    """(text, ids) pairs, tokenizing `batch_docs` documents at a time on `threads` threads, in input order."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_docs:
            yield from zip(batch, tokenizer.encode(batch, threads=threads))
            batch = []
    if batch:
        yield from zip(batch, tokenizer.encode(batch, threads=threads))
