"""Masking policies: pure, vectorized tensor functions over a packed batch.

A policy chooses which tokens to corrupt (`select`); `corrupt` then applies the mask/random/keep split.
No I/O, no global state: every random draw comes from the `torch.Generator` passed in, which callers seed
from (run seed, rank, batch index) so the same batch always gets the same mask.

Speed. Exact counts need "the k lowest random keys of each row". A full argsort costs O(T log T) per row and
was the bottleneck; one `topk` over the row (O(T), k varying per row handled by dummy columns, see
`take_lowest`) gives the same set several times faster, and faster still on integer keys (`random_keys`).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable

import torch

INF = float("inf")
IGNORE = -100
"""Label at positions that carry no loss (PyTorch's ignore index)."""
KEY_BITS = 30
NEVER = 2**31 - 1
"""An int32 key above every random key: marks entries that must not be taken."""
LATE = 2.0**120
"""A race time no positive importance weight reaches in practice (only weights below 1e-35 do), finite in float32
even when tripled."""


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
    word_break: torch.Tensor | None = None
    """bool[size]: whitespace pieces without the marker (newline and tab bytes); the token after one starts a
    word. Sentencepiece only marks spaces, so without this "-1\n>>>" would be one word."""

    @cached_property
    def maskable(self) -> torch.Tensor:
        """bool[size]: not special (cached: masking looks it up for every batch)."""
        return ~self.special

    @cached_property
    def regular_ids(self) -> torch.Tensor:
        """The ids random replacement draws from (cached: masking needs them for every batch)."""
        return torch.nonzero(self.maskable).flatten()


def generator(*key: int) -> torch.Generator:
    """A generator seeded by a stable hash of integers, e.g. (seed, rank, batch_index)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(key)}q", *key), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] for a per-id table; `index_select` is several times faster than advanced indexing."""
    return table.index_select(0, ids.reshape(-1)).view(ids.shape)


def candidates(ids: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """bool[B, T]: positions a policy may select (never specials or padding)."""
    return lookup(vocab.maskable, ids)


def target_counts(cand: torch.Tensor, rate: float) -> torch.Tensor:
    """Per-row number of tokens to select: round(rate * candidates), as long[B], rounded as BERT's
    create_pretraining_data rounds (without its floor of one token and its max_predictions_per_seq cap: a row
    of a handful of candidates may get none). Rows of equal length round alike, so on short rows the realized
    rate is off by up to 0.5 / n (128-token rows at 5%: 4.8%); `exact: false` (independent draws) has no such
    offset."""
    return torch.round(cand.sum(dim=1).double() * rate).long()


def random_bits(count: int, lane: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """`count` integers uniform over all values of `lane` (int16 or int32), cut from full-range 64-bit draws: four
    or two per draw, which makes them 3x or 1.5x cheaper than `torch.rand`."""
    per_draw = 64 // (8 * lane.itemsize)
    words = torch.empty((-(-count // per_draw),), dtype=torch.int64).random_(-2**63, None, generator=gen)
    return words.view(lane)[:count]


def random_keys(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """int32[shape] uniform on [0, 2**30), for ranking: a row of 512 has a tie with probability 1e-4 and one at
    the selection boundary almost never, and `topk` on int32 is 1.5x faster than on float32."""
    return (random_bits(math.prod(shape), torch.int32, gen) & (2**KEY_BITS - 1)).view(shape)


def draw(shape: tuple[int, ...], rate: float, gen: torch.Generator) -> torch.Tensor:
    """bool[shape]: each entry independently True with probability `rate` (quantized to 1/65536)."""
    threshold = round(rate * 2**16)
    if threshold >= 2**16:  # past int16's range: every entry
        return torch.ones(shape, dtype=torch.bool)
    return random_bits(math.prod(shape), torch.int16, gen).view(shape) < threshold - 2**15


def take_lowest(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool[B, N]: in each row, the `counts[row]` entries with the lowest scores (int keys or floats).

    Rows may want different counts; each row gets `max - count` dummy columns scoring below everything, so one
    `topk` of the common size serves every row and the dummies absorb the surplus. Entries scoring NEVER (int)
    or +inf (float) are only taken when a row asks for more entries than it has others.
    """
    rows, width = scores.shape
    k = int(counts.max()) if rows else 0
    if k == 0:
        return torch.zeros(scores.shape, dtype=torch.bool)
    below, above = (-INF, INF) if scores.is_floating_point() else (-1, NEVER)
    dummies = torch.where(torch.arange(k) < (k - counts).unsqueeze(1), below, above).to(scores.dtype)
    picked = torch.cat([scores, dummies], dim=1).topk(k, dim=1, largest=False, sorted=False).indices
    return torch.zeros((rows, width + k), dtype=torch.bool).scatter_(1, picked, True)[:, :width]


def goes_in(before: torch.Tensor, size: torch.Tensor, budget: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """bool[B, N]: which of a row's pieces (units or spans, in the order they are drawn; `before` holds the sizes
    of those ahead of each) go in. Pieces wholly within `budget[row]` do, those past it do not, and the one that
    crosses it does with probability equal to the share of it the budget covers: the expected total is the
    budget exactly. (Taking the crossing piece when the budget covers its middle looks unbiased but is not: it
    lost 0.25 tokens per 128-token row to exact ties at 5% whole-word masking, and on 16-token rows covered
    under half the tokens asked for with spans of mean length 3.8, longer than the budget.)"""
    share = torch.rand((before.shape[0], 1), generator=gen, dtype=torch.float64)
    return (before + size * share < budget.unsqueeze(1)) & (size > 0)


def take_in_order(scores: torch.Tensor, sizes: torch.Tensor, budget: torch.Tensor,
                  gen: torch.Generator) -> torch.Tensor:
    """bool[B, N]: units taken in increasing score order until their sizes add up to `budget[row]` (see
    `goes_in`): the total lands within one unit of the budget and equals it on average. Units with size 0 are
    never taken. With sizes all 1 this is exactly `take_lowest`."""
    rows, width = scores.shape
    # Every unit has size >= 1, so at most `budget` units are ever taken.
    k = min(int(budget.max()) if rows else 0, width)
    if k == 0:
        return torch.zeros(scores.shape, dtype=torch.bool)
    order = scores.topk(k, dim=1, largest=False, sorted=True).indices
    size = sizes.gather(1, order)
    take = goes_in(size.cumsum(dim=1) - size, size, budget, gen)
    return torch.zeros(scores.shape, dtype=torch.bool).scatter_(1, order, take)


@dataclass(frozen=True)
class PolicyOptions:
    """Per-policy knobs (from `MaskingConfig`); each policy reads the ones it needs."""

    exact: bool = True
    span_mean: float = 3.8
    span_max: int = 10
    importance: torch.Tensor | None = None
    """float[vocab]: selection weight per id for the importance policy."""
    collocations: torch.Tensor | None = None
    """int64[n], sorted: keys (`pair_keys`) of the adjacent word pairs the pmi policy masks as one unit."""

    @cached_property
    def span_cdf(self) -> torch.Tensor:
        """Cumulative distribution of span lengths 1..span_max (see `span_length_probs`)."""
        return torch.cumsum(span_length_probs(self.span_mean, self.span_max), dim=0).float()


def span_length_probs(mean: float, longest: int) -> torch.Tensor:
    """float64[longest]: P(length = 1..longest) ∝ q^(length-1), the geometric distribution cut at `longest`
    and renormalized (SpanBERT's p = 0.2 cut at 10 is q = 0.8, mean 3.8), with q solved so that the mean is
    exactly `mean`. The mean grows with q from 1 (q = 0) to `longest` (q -> inf), so any mean in between has
    one q, found by bisection on log q."""
    lengths = torch.arange(1, longest + 1, dtype=torch.float64)
    if mean <= 1.0 or longest == 1:
        return (lengths == 1).double()
    if mean >= longest:
        return (lengths == longest).double()

    def probs(log_q: float) -> torch.Tensor:
        return torch.softmax((lengths - 1) * log_q, dim=0)

    low, high = -50.0, 50.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if float((probs(middle) * lengths).sum()) < mean:
            low = middle
        else:
            high = middle
    return probs(0.5 * (low + high))


def select_random(ids: torch.Tensor, vocab: Vocab, rate: float, gen: torch.Generator,
                  opts: PolicyOptions) -> torch.Tensor:
    """Uniformly random tokens: exactly round(rate * n) per row, or each independently with probability rate."""
    cand = candidates(ids, vocab)
    if not opts.exact:
        return cand & draw(ids.shape, rate, gen)
    return take_lowest(random_keys(ids.shape, gen).masked_fill_(~cand, NEVER), target_counts(cand, rate))


def word_index(ids: torch.Tensor, vocab: Vocab, cand: torch.Tensor) -> torch.Tensor:
    """long[B, T]: index within its row of the word each token belongs to.

    A word starts at a word-start piece, after a word-break piece, at the row's first token (a word cut by
    packing counts as its own word), and at and after every non-candidate, so a word never holds a special
    token.
    """
    starts = lookup(vocab.word_start, ids) | ~cand
    starts[:, 1:] |= ~cand[:, :-1]
    if vocab.word_break is not None:
        starts[:, 1:] |= lookup(vocab.word_break, ids[:, :-1])
    starts[:, 0] = True
    return starts.cumsum(dim=1) - 1


def group_sizes(groups: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """long[B, T]: candidates in each group (word or unit) of a row, indexed by group."""
    return torch.zeros(groups.shape, dtype=torch.long).scatter_add_(1, groups, cand.long())


def select_units(units: torch.Tensor, cand: torch.Tensor, rate: float, gen: torch.Generator,
                 opts: PolicyOptions) -> torch.Tensor:
    """Whole units (`units[b, t]`: the unit of token t): every candidate of a chosen unit together. The rate
    counts tokens: units are taken in random order until round(rate * n) tokens are reached (within one unit,
    and exactly on average), or each unit independently with probability rate."""
    if opts.exact:
        sizes = group_sizes(units, cand)
        keys = random_keys(units.shape, gen).masked_fill_(sizes == 0, NEVER)
        chosen = take_in_order(keys, sizes, target_counts(cand, rate), gen)
    else:
        chosen = draw(units.shape, rate, gen)
    return chosen.gather(1, units) & cand


def select_whole_word(ids: torch.Tensor, vocab: Vocab, rate: float, gen: torch.Generator,
                      opts: PolicyOptions) -> torch.Tensor:
    """Whole words: every piece of a chosen word together (see `select_units`)."""
    cand = candidates(ids, vocab)
    return select_units(word_index(ids, vocab, cand), cand, rate, gen, opts)


# Odd 64-bit multipliers (from splitmix64): hashing wraps around in int64, identically in every process.
PIECE_MULTIPLIER = 0x9E3779B97F4A7C15 - 2**64
PAIR_MULTIPLIER = 0xBF58476D1CE4E5B9 - 2**64


@lru_cache(maxsize=8)
def piece_powers(length: int) -> torch.Tensor:
    """int64[length]: PIECE_MULTIPLIER ** offset, wrapped to 64 bits (computed exactly in Python)."""
    powers, value = [], 1
    for _ in range(length):
        powers.append(value - 2**64 if value >= 2**63 else value)
        value = value * PIECE_MULTIPLIER % 2**64
    return torch.tensor(powers, dtype=torch.int64)


def word_hashes(ids: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """int64[B, T]: a hash of each word's piece sequence, indexed by word: the sum of id * M ** (offset in the
    word), wrapping in int64 (the same in every process and in `masktrain data collocations`)."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    starts = torch.ones(ids.shape, dtype=torch.bool)
    starts[:, 1:] = words[:, 1:] != words[:, :-1]
    offsets = positions - torch.cummax(torch.where(starts, positions, 0), dim=1).values
    # Powers up to the longest word only, rounded up to a power of two so a few sizes serve every call: the
    # row's length would be a shard's tokens (tens of millions) in `masktrain data collocations`.
    longest = int(offsets.max()) + 1 if offsets.numel() else 1
    pieces = ids * lookup(piece_powers(1 << (longest - 1).bit_length()), offsets)
    return torch.zeros(ids.shape, dtype=torch.int64).scatter_add_(1, words, pieces)


def word_table(ids: torch.Tensor, vocab: Vocab, cand: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(word of each token, hash of each word, whether each word holds candidates), the last two indexed by
    word: what both the pmi policy and `masktrain data collocations` see of a row."""
    words = word_index(ids, vocab, cand)
    return words, word_hashes(ids, words), group_sizes(words, cand) > 0


def pair_keys(hashes: torch.Tensor) -> torch.Tensor:
    """int64[B, T - 1]: the key of each pair of adjacent words (w, w + 1), from their hashes."""
    return hashes[:, :-1] * PAIR_MULTIPLIER + hashes[:, 1:]


def select_pmi(ids: torch.Tensor, vocab: Vocab, rate: float, gen: torch.Generator,
               opts: PolicyOptions) -> torch.Tensor:
    """PMI spans: whole words, where adjacent words that form a collocation (a word pair of high pointwise
    mutual information in the training data, from `masktrain data collocations`) are one unit, chained into
    longer n-grams when pairs overlap; units then go as in `select_units`. After PMI-Masking (Levine et al.,
    ICLR 2021), which masks correlated n-grams together so the model cannot fill them in from each other."""
    table = opts.collocations
    if table is None or len(table) == 0:
        raise ValueError("the pmi policy needs a collocation table (data.masking.collocation_table; build it "
                         "with `masktrain data collocations CONFIG`)")
    cand = candidates(ids, vocab)
    words, hashes, real = word_table(ids, vocab, cand)
    keys = pair_keys(hashes)
    found = lookup(table, torch.searchsorted(table, keys).clamp_(max=len(table) - 1)) == keys
    unit_starts = torch.ones(ids.shape, dtype=torch.bool)
    unit_starts[:, 1:] = ~(found & real[:, :-1] & real[:, 1:])
    return select_units((unit_starts.cumsum(dim=1) - 1).gather(1, words), cand, rate, gen, opts)


def select_span(ids: torch.Tensor, vocab: Vocab, rate: float, gen: torch.Generator,
                opts: PolicyOptions) -> torch.Tensor:
    """Contiguous spans with geometric lengths (mean `span_mean`, at most `span_max`), as in SpanBERT, drawn
    until rate * n tokens are covered; exact cuts the last span to fit round(rate * n), otherwise the last span
    is kept whole (cut only at the row's end) or dropped so that the count is rate * n on average (`goes_in`),
    with no rounding offset.

    Spans are laid out over the row's candidates only (specials and padding are skipped, never covered),
    uniformly at random and never touching, so every span stays a separate run of its drawn length. A span
    that reaches a document boundary goes on after the boundary's special tokens.
    """
    cand = candidates(ids, vocab)
    n = cand.sum(dim=1)
    budget = target_counts(cand, rate) if opts.exact else n.double() * rate
    rows = ids.shape[0]
    most = math.ceil(budget.max()) if rows else 0
    if most == 0:
        return torch.zeros(ids.shape, dtype=torch.bool)

    # Span lengths: at most `budget` spans are needed since each covers at least one token.
    lengths = torch.searchsorted(opts.span_cdf, torch.rand((rows, most), generator=gen), right=True) + 1
    lengths.clamp_(max=opts.span_max)
    before = lengths.cumsum(dim=1) - lengths
    # Never more tokens than the budget (exact) or the row has. Otherwise the crossing span goes in by the length
    # it keeps after that cut: by its drawn length, rows near a rate of 1 fell short (a 16-token row at 1.0: 95%).
    lengths = torch.minimum(lengths, (budget if opts.exact else n).unsqueeze(1) - before).clamp_(min=0)
    keep = before < budget.unsqueeze(1) if opts.exact else goes_in(before, lengths, budget, gen)
    lengths.masked_fill_(~keep, 0)
    # The kept lengths in random order, first: the last one (cut to the budget, or the one that crossed it) would
    # otherwise always be laid out rightmost, making the masking denser or sparser towards a row's end.
    lengths = lengths.gather(1, random_keys(lengths.shape, gen).masked_fill_(~keep, NEVER).argsort(dim=1))
    spans = keep.sum(dim=1)
    covered = lengths.sum(dim=1)

    # Each span is followed by one uncovered gap token (the last one may fall past the row's end), so the
    # layout is n + 1 slots: free tokens plus spans. Rows too full for gaps (rates near 1) go without them.
    gap = (n + 1 - covered - spans >= 0).long()
    free = n - covered + gap * (1 - spans)
    slots = free + spans
    slot_keys = random_keys((rows, int(slots.max())), gen)
    slot_keys.masked_fill_(torch.arange(slot_keys.shape[1]) >= slots.unsqueeze(1), NEVER)
    is_span = take_lowest(slot_keys, spans)

    # The i-th span slot gets the i-th length; slot extents laid end to end give each span's start.
    nth = (is_span.cumsum(dim=1) - 1).clamp_(min=0)
    span_len = torch.where(is_span, lengths.gather(1, nth), 0)
    extent = torch.where(is_span, span_len + gap.unsqueeze(1), 1)
    start = extent.cumsum(dim=1) - extent
    # +1 at each span's start, -1 past its end; a running sum > 0 marks covered candidates. A row's extents add
    # up to at most n + 1, so its edges fall within n + 2 columns (the clamp only moves the zero-valued adds
    # of a shorter row's unused slots).
    width = int(n.max()) + 2
    edges = torch.zeros((rows, width), dtype=torch.long)
    edges.scatter_add_(1, start.clamp_(max=width - 1), is_span.long())
    edges.scatter_add_(1, (start + span_len).clamp_(max=width - 1), -is_span.long())
    inside = edges.cumsum(dim=1) > 0
    # Back from "k-th candidate of the row" to token positions.
    rank = (cand.cumsum(dim=1) - 1).clamp_(min=0)
    return inside.gather(1, rank) & cand


def select_importance(ids: torch.Tensor, vocab: Vocab, rate: float, gen: torch.Generator,
                      opts: PolicyOptions) -> torch.Tensor:
    """Tokens drawn with probability proportional to an importance weight (e.g. IDF from `masktrain data
    importance`), without replacement: exactly round(rate * n) per row by the exponential race (each token
    scores Exp(1) / weight and the lowest win, which is Gumbel top-k), or each token independently with
    probability rate * weight / mean weight of its row (capped at 1)."""
    if opts.importance is None:
        raise ValueError("the importance policy needs a weight table (data.masking.importance_table; build it "
                         "with `masktrain data importance CONFIG`)")
    cand = candidates(ids, vocab)
    weight = lookup(opts.importance, ids).masked_fill_(~cand, 0.0)
    uniform = torch.rand(ids.shape, generator=gen)
    if not opts.exact:
        mean = weight.sum(dim=1, keepdim=True) / cand.sum(dim=1, keepdim=True).clamp(min=1)
        return cand & (uniform < rate * weight / mean.clamp(min=1e-12))
    # 1 - uniform lies in (0, 1]: its log is finite. Weight-0 candidates race last, yet ahead of the +inf of
    # non-candidates (a tie there would let topk pick a special) and in random order among themselves: their
    # times lie in [2 LATE, 3 LATE), above every positive weight's time, which is capped at LATE.
    times = (-torch.log1p(-uniform) / weight).clamp_(max=LATE)
    scores = torch.where(weight > 0, times, LATE * (2 + uniform))
    return take_lowest(scores.masked_fill_(~cand, INF), target_counts(cand, rate))


POLICIES: dict[str, Callable[..., torch.Tensor]] = {
    "random": select_random,
    "whole_word": select_whole_word,
    "span": select_span,
    "importance": select_importance,
    "pmi": select_pmi,
}


def corrupt(ids: torch.Tensor, selected: torch.Tensor, vocab: Vocab, mask_prob: float, random_prob: float,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style corruption of the selected tokens: [MASK] / random token / unchanged (default 80/10/10).

    Returns (inputs, labels): labels hold the original token at selected positions and IGNORE elsewhere. Draws
    only for the selected tokens (15% of the batch, not all of it), and both outputs are written at the
    selected positions found once; the random replacement is a regular token, never a special one.
    """
    where = selected.reshape(-1).nonzero().squeeze(1)
    originals = ids.reshape(-1).index_select(0, where)
    split = torch.rand(originals.shape, generator=gen)
    regular = vocab.regular_ids
    random_tokens = regular.index_select(0, torch.randint(len(regular), originals.shape, generator=gen))
    values = torch.where(split < mask_prob, vocab.mask_id,
                         torch.where(split < mask_prob + random_prob, random_tokens, originals))
    inputs = ids.clone().view(-1).scatter_(0, where, values).view(ids.shape)
    labels = torch.full((ids.numel(),), IGNORE, dtype=ids.dtype).scatter_(0, where, originals).view(ids.shape)
    return inputs, labels
