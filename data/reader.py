"""Reading documents out of one shard, through webdataset's tar iterators, with bad data counted.

A corrupt or truncated tar, an unreadable member or an empty document is skipped and counted by reason;
under `strict` it raises `DataError` naming the shard URL and the member.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import braceexpand
import numpy as np
import webdataset as wds

TOKENS_KEY = "tokens.npy"


class DataError(RuntimeError):
    """Bad data under strict mode, or no readable data at all."""


class Skips:
    """Counts bad data by reason, or raises `DataError` naming it under strict mode."""

    def __init__(self, strict: bool, counts: dict[str, int] | None = None):
        self.strict = strict
        self.counts: Counter = Counter(counts or {})
        self.paused = False
        """While True nothing is counted: re-reading data whose problems were counted before a restart."""

    def __call__(self, reason: str, where: str) -> None:
        if self.strict:
            raise DataError(f"{reason}: {where}")
        if not self.paused:
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


def decode_tokens(sample: dict) -> np.ndarray:
    if TOKENS_KEY not in sample:
        raise ValueError(f"no {TOKENS_KEY} member (has: {', '.join(k for k in sample if not k.startswith('__'))})")
    array = np.load(io.BytesIO(sample[TOKENS_KEY]), allow_pickle=False)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"expected a 1-D integer array, got {array.dtype} {array.shape}")
    return array


def read_unit(unit: Unit, skip: Callable[[str, str], None]) -> Iterator[np.ndarray]:
    """The unit's documents as integer arrays, in shard order. Bad data goes to `skip(reason, where)`, which
    counts it or raises."""

    def on_shard_error(exn: Exception) -> bool:
        skip("corrupt shard", f"{unit.url}: {exn}")
        return True

    samples = wds.tarfile_samples([{"url": unit.url}], handler=on_shard_error)
    for index, sample in enumerate(samples):
        if index % unit.parts != unit.part:
            continue
        member = f"{unit.url}: member {sample.get('__key__')}.{TOKENS_KEY}"
        try:
            tokens = decode_tokens(sample)
        except Exception as err:  # anything np.load can raise on bad bytes
            skip("bad sample", f"{member}: {err}")
            continue
        if len(tokens) == 0:
            skip("empty document", member)
            continue
        yield tokens
