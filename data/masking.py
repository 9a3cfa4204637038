"""Masking policies: pure, vectorized tensor functions over a packed batch.

A policy chooses which tokens to corrupt (`select`); `corrupt` then applies the mask/random/keep split.
No I/O, no global state: every random draw comes from the `torch.Generator` passed in, which callers seed
from (run seed, rank, batch index) so the same batch always gets the same mask.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Vocab:
    """What masking needs to know about a tokenizer's ids."""

    size: int
    pad_id: int
    mask_id: int
    special: torch.Tensor
    """bool[size]: ids that are never selected (padding, boundaries, [MASK], unknown)."""
    word_start: torch.Tensor
    """bool[size]: the piece begins a word (sentencepiece's "▁" marker); specials count as word starts."""

    @property
    def regular_ids(self) -> torch.Tensor:
        """The ids random replacement draws from."""
        return torch.nonzero(~self.special).flatten()


def generator(*key: int) -> torch.Generator:
    """A generator seeded by a stable hash of integers, e.g. (seed, rank, batch_index)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(key)}q", *key), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def candidates(ids: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """bool[B, T]: positions a policy may select (never specials or padding)."""
    return ~vocab.special[ids]


def target_counts(cand: torch.Tensor, rate: float) -> torch.Tensor:
    """Per-row number of tokens to select: round(rate * candidates), as long[B]."""
    return torch.round(cand.sum(dim=1, dtype=torch.float64) * rate).long()


def pick_lowest(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool[B, N]: in each row, the `counts[row]` entries with the lowest scores (exact, tie-free)."""
    order = scores.argsort(dim=1)
    take = torch.arange(scores.shape[1]).unsqueeze(0) < counts.unsqueeze(1)
    return torch.zeros_like(take).scatter_(1, order, take)


@dataclass(frozen=True)
class PolicyOptions:
    """Per-policy knobs (from `MaskingConfig`); each policy reads the ones it needs."""

    exact: bool = True
    span_mean: float = 3.0
    span_max: int = 10
    importance: torch.Tensor | None = None
    """float[vocab]: selection weight per id for the importance policy."""


def select_random(ids: torch.Tensor, vocab: Vocab, rate: float, gen: torch.Generator,
                  opts: PolicyOptions) -> torch.Tensor:
    """Uniformly random tokens: exactly round(rate * n) per row, or each independently with probability rate."""
    cand = candidates(ids, vocab)
    scores = torch.rand(ids.shape, generator=gen)
    if not opts.exact:
        return cand & (scores < rate)
    scores.masked_fill_(~cand, 2.0)
    return pick_lowest(scores, target_counts(cand, rate))


POLICIES: dict[str, Callable[..., torch.Tensor]] = {
    "random": select_random,
}


def corrupt(ids: torch.Tensor, selected: torch.Tensor, vocab: Vocab, mask_prob: float, random_prob: float,
            gen: torch.Generator) -> torch.Tensor:
    """BERT-style corruption of the selected tokens: [MASK] / random token / unchanged (default 80/10/10)."""
    draw = torch.rand(ids.shape, generator=gen)
    out = ids.clone()
    out[selected & (draw < mask_prob)] = vocab.mask_id
    to_random = selected & (draw >= mask_prob) & (draw < mask_prob + random_prob)
    regular = vocab.regular_ids
    picks = torch.randint(len(regular), (int(to_random.sum()),), generator=gen)
    out[to_random] = regular[picks]
    return out
