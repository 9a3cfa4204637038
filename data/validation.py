"""The validation set: every validation document exactly once, the same batches and masks at any world size.

Unlike training, validation is finite and unshuffled. The split is packed into rows and cut into batches as
one rank alone would; batch g goes to rank g % world_size and is masked by a seed of g alone. So the batches,
their masks and the loss over them do not depend on how many ranks share them (curves of runs on other node
counts, or of a run resumed on another, compare), only on seq_len and micro_batch_size. Ranks may end up with
different batch counts: the trainer pads with empty batches so every rank runs the same number of forward
passes (ZeRO-3 gathers parameters collectively).
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from masktrain.data.loader import Packing
from masktrain.data.reader import Unit, expand_urls, read_unit


def documents(urls: list[str], packing: Packing, skip: Callable[..., None], vocab_size: int) -> Iterator[np.ndarray]:
    """Every validation document with its boundary tokens, in order."""
    for url in expand_urls(urls):
        for doc in read_unit(Unit(url), skip, vocab_size):
            yield np.concatenate(([packing.start_id], doc, [packing.end_id]))


def chunks(docs: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The concatenated documents in pieces of `size` tokens; the last piece may be shorter."""
    held: list[np.ndarray] = []
    count = 0
    for doc in docs:
        held.append(doc)
        count += len(doc)
        if count >= size:
            joined = np.concatenate(held)
            whole = len(joined) // size * size
            yield from joined[:whole].reshape(-1, size)
            held, count = [joined[whole:]], len(joined) - whole
    if count:
        yield np.concatenate(held)


def validation_batches(urls: list[str], rank: int, world_size: int, micro_batch_size: int, packing: Packing,
                       pad_id: int, make: Callable[[torch.Tensor, int], dict[str, torch.Tensor]],
                       skip: Callable[..., None], limit: int = 0,
                       vocab_size: int = 0) -> list[dict[str, torch.Tensor]]:
    """This rank's validation batches, of at most `limit` batches in all (0: the whole split); `make(rows, g)`
    masks global batch g. Reading stops once the limited batches are full."""
    batches = []
    pieces = chunks(documents(urls, packing, skip, vocab_size), micro_batch_size * packing.seq_len)
    for index, tokens in enumerate(itertools.islice(pieces, limit or None)):
        if index % world_size == rank:
            rows = np.full((-(-len(tokens) // packing.seq_len), packing.seq_len), pad_id, dtype=np.int64)
            rows.reshape(-1)[:len(tokens)] = tokens
            batches.append(make(torch.from_numpy(rows), index))
    return batches
