"""The validation set: every validation document exactly once, split across ranks by document index.

Unlike training, validation is finite and unshuffled; rows are packed the same way and the last one is
padded. Ranks may end up with different batch counts: the trainer pads with empty batches so every rank runs
the same number of forward passes (ZeRO-3 gathers parameters collectively).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch

from masktrain.data.loader import Packing
from masktrain.data.reader import Unit, expand_urls, read_unit


def rank_documents(urls: list[str], rank: int, world_size: int, skip: Callable[..., None],
                   vocab_size: int = 0) -> Iterator[np.ndarray]:
    index = 0
    for url in expand_urls(urls):
        for doc in read_unit(Unit(url), skip, vocab_size):
            if index % world_size == rank:
                yield doc
            index += 1


def validation_batches(urls: list[str], rank: int, world_size: int, micro_batch_size: int, packing: Packing,
                       pad_id: int, make: Callable[[torch.Tensor, int], dict[str, torch.Tensor]],
                       skip: Callable[..., None], limit: int = 0,
                       vocab_size: int = 0) -> list[dict[str, torch.Tensor]]:
    """This rank's validation batches (at most `limit` if > 0); `make(rows, index)` masks them. With a limit,
    reading stops once the limited batches are full: a large validation split is not read whole by every
    rank for a few batches."""
    needed = limit * micro_batch_size * packing.seq_len if limit else math.inf
    stream, read = [], 0
    for doc in rank_documents(urls, rank, world_size, skip, vocab_size):
        if read >= needed:
            break
        stream.append(np.concatenate(([packing.start_id], doc, [packing.end_id])))
        read += len(stream[-1])
    tokens = np.concatenate(stream) if stream else np.empty(0, dtype=np.int64)
    rows_needed = -(-len(tokens) // packing.seq_len)
    rows = np.full((rows_needed, packing.seq_len), pad_id, dtype=np.int64)
    rows.reshape(-1)[:len(tokens)] = tokens
    batches = []
    for index, start in enumerate(range(0, rows_needed, micro_batch_size)):
        if limit and index >= limit:
            break
        chunk = torch.from_numpy(rows[start:start + micro_batch_size])
        batches.append(make(chunk, index))
    return batches
