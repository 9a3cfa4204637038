"""The streaming training loader: shards -> shuffled documents -> packed rows -> masked batches.

Sources. The shards come from one source, or from several mixed by weight (`data.mixture`). Each source is read
as below on its own; which one a row comes from depends only on the row's place in the run (`source_of`), so a
batch holds the sources' rows in proportion to their weights, and a small source simply runs more epochs.

Layout. Each rank has `max(1, num_workers)` slots (one per worker process); slot s of rank r reads, in
epoch e, every n-th unit of a permutation of all units seeded by (seed, e), where n = world * workers. A slot
never runs dry: after its units of epoch e it moves on to e + 1, so every rank yields as many batches as the
trainer asks for, however uneven the shards (a finite epoch per rank is what hangs DeepSpeed jobs).

Position. Documents are shuffled in blocks of `shuffle_block` read from one unit, each block permuted by a
seed derived from its place. A slot's position in a source is therefore five integers (epoch, unit, block
start, index in block, token offset in the document being packed); a resume re-reads each source's current
unit up to the end of its current block, and nothing else.

Exactness with workers. Every batch carries the state of its slot *after* that batch. The main process keeps
the state of the batches it has consumed (not what workers have prefetched) and which slot comes next; a
restart hands each worker its slot's state and rotates slots so the round-robin order continues unchanged.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction
import multiprocessing.util
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Generator, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from masktrain.data import masking
from masktrain.data.reader import DataError, Skips, Unit, expand_urls, read_unit
from masktrain.trainer.hang_dump import WORKER_STACKS, on_worker_stacks
from masktrain.trainer.signals import ignore_stops, stops_deferred

STATE_VERSION = 3
"""2: one source, its position fields in the slot's state (read by `upgraded`)."""
EPOCHS_SAMPLED = 8
"""Epochs whose unit assignments `Loader.uneven_epochs` averages."""


@dataclass
class SourceState:
    """A slot's position in one source."""

    epoch: int = 0
    unit: int = 0
    """Index into this slot's units of `epoch`."""
    block_start: int = 0
    """Documents of the unit before the current shuffle block."""
    in_block: int = 0
    """Index (in permuted order) of the document being packed."""
    in_doc: int = 0
    """Tokens of that document (boundary tokens included) already packed."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Bad data skipped so far, by reason."""
    unit_skipped: dict[str, int] = field(default_factory=dict)
    """`skipped` when the current unit began. A restart re-reads the unit from its start and counts its bad data
    again from there: once in all, and a problem that is new this time (a pipe failing) is counted too."""
    carry: list[list[int]] = field(default_factory=list)
    """Units other slots left part-read when the run moved to another layout (`Loader.resume`), as [epoch,
    unit, block_start, in_block, in_doc], read first; the first one's position is then the fields above."""
    done: dict[int, list[int]] = field(default_factory=dict)
    """Per epoch, units of this slot's share that slots of an earlier layout read (or that one carries)."""


@dataclass
class SlotState:
    batches: int = 0
    """Batches this slot has produced."""
    sources: list[SourceState] = field(default_factory=list)

    @classmethod
    def of(cls, state: dict) -> "SlotState":
        return cls(state["batches"], [SourceState(**source) for source in state["sources"]])

    @classmethod
    def fresh(cls, sources: int) -> "SlotState":
        return cls(0, [SourceState() for _ in range(sources)])


def source_of(position: int, weights: list[int]) -> int:
    """The source of the row at `position` in the run's sequence of rows, for integer weights: the sources are
    split in two halves, recursively, and a half gets the rows where its rounded share of the rows so far
    grows (Bresenham's line). So any stretch of rows holds each half its share to within one row: every
    stretch holds each of two sources its share to within a row, and each of n sources to within the depth,
    log2(n) rounded up, rows. Integers make it the same on every machine; no state makes resuming trivial."""
    first = 0
    while len(weights) > 1:
        half, total = len(weights) // 2, sum(weights)
        left = sum(weights[:half])
        before = (2 * position * left + total) // (2 * total)  # rows of the left half before this one
        if (2 * (position + 1) * left + total) // (2 * total) > before:
            position, weights = before, weights[:half]
        else:
            position, weights, first = position - before, weights[half:], first + half
    return first


def units_for(urls: list[str], n_slots: int) -> list[Unit]:
    """Shards as read units; with fewer shards than slots each shard is split by document index."""
    if not urls:
        raise DataError("no shards to read")
    parts = math.ceil(n_slots / len(urls))
    return [Unit(url, part, parts) for url in urls for part in range(parts)]


def shard_signature(urls: list[str]) -> str:
    """The shard list a position belongs to: its count and a hash of the shard names in order. A position is
    an index into the list, so another list (data added, prepared again) would resume somewhere else. Not the
    folders, so shards copied to another one (node-local disk) still resume exactly."""
    names = "\n".join(url.rstrip("/").rsplit("/", 1)[-1] for url in urls)
    return f"{len(urls)} shards, sha256 {hashlib.sha256(names.encode()).hexdigest()[:16]}"


def seed_int(*key: int) -> int:
    return int(masking.generator(*key).initial_seed())


def epoch_order(seed: int, epoch: int, units: int) -> np.ndarray:
    """The units in the order of `epoch`: slot s of n reads every n-th from the s-th on."""
    return np.random.default_rng(seed_int(seed, epoch)).permutation(units)


@dataclass
class Packing:
    seq_len: int
    start_id: int
    end_id: int


class SourceStream:
    """One slot's endless, resumable stream of packed rows from one source."""

    def __init__(self, units: list[Unit], slot: int, n_slots: int, seed: int, shuffle_block: int,
                 packing: Packing, strict: bool, state: SourceState, vocab_size: int = 0):
        self.units, self.slot, self.n_slots, self.vocab_size = units, slot, n_slots, vocab_size
        self.seed, self.shuffle_block, self.packing = seed, shuffle_block, packing
        self.state = state
        self.skips = Skips(strict, state.unit_skipped)

    def epoch_units(self, epoch: int) -> list[int]:
        return epoch_order(self.seed, epoch, len(self.units))[self.slot::self.n_slots].tolist()

    def documents(self) -> Iterator[np.ndarray]:
        """Documents with boundary tokens, in shuffled order, from the saved position on: first the carried
        units, then this slot's share of each epoch. While a document is out, the state points at it (the
        epoch/unit fields, or the first carried unit) and its block fields; `in_doc` is the packer's to advance."""
        s = self.state
        dry: set[int] = set()  # units read since this slot last found a document
        while True:
            while s.carry:
                epoch, unit_id = s.carry[0][:2]
                yield from self.read(epoch, unit_id)
                s.carry.pop(0)
                if s.carry:
                    s.block_start, s.in_block, s.in_doc = s.carry[0][2:]
                    # Part-read, so `read` keeps the baseline; this one is re-read (and its bad data counted)
                    # from its start, and a restart goes back to the counts before it.
                    s.unit_skipped = dict(self.skips.counts)
            units = self.epoch_units(s.epoch)
            done = set(s.done.get(s.epoch, ()))
            while s.unit < len(units):
                unit_id = units[s.unit]
                if unit_id not in done:
                    found = yield from self.read(s.epoch, unit_id)
                    dry = set() if found else dry | {unit_id}
                    # A slot's units change every epoch, so one that read nothing may just have drawn the empty
                    # parts of a shard; only once it has tried every unit is there nothing left to find.
                    if len(dry) == len(self.units):
                        ends = dict.fromkeys((self.units[0].url, self.units[-1].url))  # names the source
                        raise DataError(f"slot {self.slot}: no readable document in any of the {len(self.units)} "
                                        f"units of {' ... '.join(ends)} (skipped: {dict(self.skips.counts) or 'none'})")
                s.unit += 1
            s.done.pop(s.epoch, None)
            s.epoch += 1
            s.unit = 0

    def read(self, epoch: int, unit_id: int) -> Generator[np.ndarray, None, bool]:
        """A unit's documents from the state's block position on; returns whether it had any."""
        s, p = self.state, self.packing
        found = s.block_start > 0  # a unit resumed part-way had documents
        if s.block_start == s.in_block == s.in_doc == 0:  # a fresh unit, not one resumed part-way
            s.unit_skipped = dict(self.skips.counts)
        docs = read_unit(self.units[unit_id], self.skips, self.vocab_size)
        for _ in zip(range(s.block_start), docs):
            pass
        while block := [d for _, d in zip(range(self.shuffle_block), docs)]:
            found = True
            key = (self.seed, epoch, unit_id, s.block_start)
            order = np.random.default_rng(seed_int(*key)).permutation(len(block))
            while s.in_block < len(block):
                yield np.concatenate(([p.start_id], block[order[s.in_block]], [p.end_id])).astype(np.int64)
                s.in_block += 1
                s.in_doc = 0
            s.block_start += len(block)
            # Zeroed here too: a block re-read after a restart can come back shorter (a pipe that failed this
            # time), and the next document must then start from its first token.
            s.in_block = s.in_doc = 0
        # All three: a unit resumed part-way that came back empty left its position within a block, which would
        # skip the next unit's first documents.
        s.block_start = s.in_block = s.in_doc = 0
        return found

    def rows(self) -> Iterator[np.ndarray]:
        """Packed rows of seq_len tokens; a document runs on across row boundaries."""
        n = self.packing.seq_len
        row = np.empty(n, dtype=np.int64)
        filled = 0
        for doc in self.documents():
            offset = self.state.in_doc
            while offset < len(doc):
                take = min(n - filled, len(doc) - offset)
                row[filled:filled + take] = doc[offset:offset + take]
                filled += take
                offset += take
                self.state.in_doc = offset
                if filled == n:
                    yield row.copy()
                    filled = 0


class SlotStream:
    """One slot's endless, resumable stream of batches, each row from the source `source_of` picks for its
    place in the sequence of rows. A slot reads that sequence on from `phase` batches in, so its own rows hold
    each source's share (each slot reads its own units of every source: all must go through each source at
    the same pace, as they do through a single one, or a source's epoch would leave some unread); and the
    phases lay the batches of one optimizer step side by side in it (`LoaderSpec.phase`), so the step's rows
    hold the shares too."""

    def __init__(self, sources: list[list[Unit]], weights: list[int], slot: int, n_slots: int, phase: int,
                 seed: int, shuffle_block: int, packing: Packing, strict: bool, state: SlotState,
                 vocab_size: int = 0):
        self.weights, self.phase, self.state = weights, phase, state
        self.streams = [SourceStream(units, slot, n_slots, seed, shuffle_block, packing, strict, source, vocab_size)
                        for units, source in zip(sources, state.sources)]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        rows = [stream.rows() for stream in self.streams]
        while True:
            start = (self.state.batches + self.phase) * batch_size
            batch = [next(rows[source_of(start + row, self.weights)]) for row in range(batch_size)]
            self.state.batches += 1
            for stream in self.streams:
                stream.state.skipped = dict(stream.skips.counts)
            yield np.stack(batch)


@dataclass
class Batcher:
    """Token rows -> model inputs for one objective. The rate comes from the step the batch belongs to and the
    generator from (seed, rank, batch index), so the mask depends only on the batch, never on who computes it.
    Batch `first_index` belongs to optimizer step `first_step` (see `Loader.align`)."""

    make: Callable[..., dict[str, torch.Tensor]]
    spec: object
    schedule: Callable[[int], float]
    seed: int
    rank: int
    grad_accum: int
    first_step: int = 0
    first_index: int = 0

    def __call__(self, ids: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        rate = self.schedule(self.first_step + (index - self.first_index) // self.grad_accum)
        return self.make(ids, self.spec, rate, masking.generator(self.seed, self.rank, index))


@dataclass
class Source:
    """Shards read as one stream, and their share of the rows."""

    urls: list[str]
    weight: float = 1.0
    contents: str = ""
    """A digest of what the shards hold beyond their names, when known (the manifest's counts per shard): a
    data position resumes only on the same."""
    name: str = ""
    """What messages call it (the dataset folder), when there are several."""


@dataclass
class LoaderSpec:
    """Everything a rank's loader needs, picklable for worker processes."""

    sources: list[Source]
    rank: int
    world_size: int
    num_workers: int
    seed: int
    micro_batch_size: int
    shuffle_block: int
    packing: Packing
    strict: bool = False
    vocab_size: int = 0
    """Token ids must be below this (a corrupt shard's garbage ids would crash the embedding); 0: unchecked."""
    grad_accum: int = 1
    """Batches of each rank in one optimizer step: the mixture lays each step's side by side (`phase`)."""

    @property
    def slots_per_rank(self) -> int:
        return max(1, self.num_workers)

    def phase(self, local: int) -> int:
        """Where slot `local` of this rank starts in the mixture's sequence of rows, in batches (`SlotStream`).
        A step takes grad_accum batches from each rank, batch i of a rank from its slot i % slots_per_rank.
        When the slots divide grad_accum, a step takes q = grad_accum / slots batches from every slot: q apart,
        the slots of all ranks cover one stretch. When grad_accum divides the slots, a step takes one batch
        from grad_accum consecutive slots of each rank: those are laid side by side, rank after rank. Otherwise
        no phases give every step one stretch, and the micro-batches of one index, rank after rank, get it."""
        slots, accum, rank, world = self.slots_per_rank, self.grad_accum, self.rank, self.world_size
        if accum % slots == 0:
            return accum // slots * (local * world + rank)
        if slots % accum == 0:
            return local // accum * accum * world + rank * accum + local % accum
        return local * world + rank

    @property
    def shares(self) -> list[float]:
        total = sum(source.weight for source in self.sources)
        return [source.weight / total for source in self.sources]

    @property
    def integer_weights(self) -> list[int]:
        """The weights as the smallest integers in the same ratio, taken as written in decimal (0.7 and 0.3 are
        exactly 7:3, not the floats' nearest binary fractions)."""
        weights = [Fraction(repr(source.weight)) for source in self.sources]
        scaled = [int(weight * math.lcm(*(w.denominator for w in weights))) for weight in weights]
        return [weight // math.gcd(*scaled) for weight in scaled]


class SlotDataset(IterableDataset):
    """Runs in each worker: the stream of the slot assigned to it, batches tagged with slot and state."""

    def __init__(self, spec: LoaderSpec, units: list[list[Unit]], states: list[SlotState], rotate: int,
                 batcher: Batcher | None):
        self.spec, self.units, self.states, self.rotate, self.batcher = spec, units, states, rotate, batcher

    def __iter__(self):
        info = get_worker_info()
        spec = self.spec
        local = ((info.id if info else 0) + self.rotate) % spec.slots_per_rank
        n_slots = spec.world_size * spec.slots_per_rank
        state = SlotState.of(asdict(self.states[local]))
        stream = SlotStream(self.units, spec.integer_weights, spec.rank * spec.slots_per_rank + local, n_slots,
                            spec.phase(local), spec.seed, spec.shuffle_block, spec.packing, spec.strict, state,
                            spec.vocab_size)
        try:
            for rows in stream.batches(spec.micro_batch_size):
                index = (state.batches - 1) * spec.slots_per_rank + local
                ids = torch.from_numpy(rows)
                batch = self.batcher(ids, index) if self.batcher else {"input_ids": ids}
                yield {"slot": local, "index": index, "state": asdict(state), "batch": batch}
        except DataError as err:
            # Handed over for the main process to raise: an exception raised in a worker reaches it wrapped in
            # a traceback dump, and leaves the DataLoader seconds of shutdown timeouts.
            yield {"error": str(err)}


def init_worker(worker_id: int) -> None:
    """Loader workers ignore preemption signals: SLURM signals every process of a job, and a worker that died of
    it would crash its rank before the rank had saved its checkpoint (`Loader.close` stops them instead). They
    print their stacks when a hung rank's watchdog asks (`hang_dump.on_worker_stacks`). Workers start with
    these signals blocked (`Loader.start`)."""
    ignore_stops()
    on_worker_stacks()


def stop_workers(workers: list) -> None:
    """Kill the given loader workers that are still alive (they ignore SIGTERM)."""
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()


class Loader:
    """A rank's training batches, with `state_dict`/`load_state_dict` for exact resume."""

    def __init__(self, spec: LoaderSpec, batcher: Batcher, mask_in_workers: bool = True, prefetch: int = 2):
        self.spec, self.batcher = spec, batcher
        self.mask_in_workers, self.prefetch = mask_in_workers, prefetch
        urls = [expand_urls(source.urls) for source in spec.sources]
        self.units = [units_for(source, spec.world_size * spec.slots_per_rank) for source in urls]
        self.shards = [shard_signature(source) for source in urls]
        self.states = [SlotState.fresh(len(spec.sources)) for _ in range(spec.slots_per_rank)]
        self.consumed = 0
        self.iterator: Iterator | None = None

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.iterator is None:
            self.iterator = self.start()
        item = next(self.iterator)
        if "error" in item:
            self.iterator = None  # stops the worker processes now
            raise DataError(item["error"])
        if item["index"] != self.consumed:
            raise RuntimeError(f"loader order broken: got batch {item['index']}, expected {self.consumed}")
        self.states[item["slot"]] = SlotState.of(item["state"])
        self.consumed += 1
        batch = item["batch"]
        return batch if self.mask_in_workers else self.batcher(batch["input_ids"], item["index"])

    def worker_pids(self) -> list[int]:
        return [worker.pid for worker in getattr(self.iterator, "_workers", ()) if worker.is_alive()]

    def close(self) -> None:
        """Stop the worker processes: releasing the iterator shuts them down in order, then any still stuck
        (e.g. in a `pipe:` read) is killed, since they ignore the SIGTERM DataLoader would fall back to."""
        workers = list(getattr(self.iterator, "_workers", ()))  # where DataLoader keeps its processes
        self.iterator = None
        stop_workers(workers)

    def start(self) -> Iterator:
        rotate = self.consumed % self.spec.slots_per_rank
        dataset = SlotDataset(self.spec, self.units, self.states, rotate,
                              self.batcher if self.mask_in_workers else None)
        workers = self.spec.num_workers
        # A preemption signal reaching a worker before its worker_init_fn waits instead of killing it.
        with stops_deferred(WORKER_STACKS):
            iterator = iter(DataLoader(dataset, batch_size=None, num_workers=workers,
                                       prefetch_factor=self.prefetch if workers else None,
                                       persistent_workers=False,
                                       # A private generator: DataLoader otherwise draws worker seeds from the
                                       # global RNG, which would shift dropout after every (re)start.
                                       generator=torch.Generator(),
                                       worker_init_fn=init_worker))
        if workers:
            # Multiprocessing's exit hook terminates, then joins, all children: workers ignoring SIGTERM would
            # be waited for forever. Its finalizers of priority >= 0 run first (in the main process and in
            # processes multiprocessing started, where atexit never runs); this one also runs, after the
            # orderly shutdown, when the iterator is released.
            multiprocessing.util.Finalize(iterator, stop_workers, args=(list(iterator._workers),), exitpriority=10)
        return iterator

    def align(self, step: int) -> None:
        """The next batch belongs to optimizer step `step`, which sets the masking rate from here on. After an
        exact resume this changes nothing; after one that trainer.allow_config_change let restart the data
        stream, or change grad_accum, the batch count no longer tells the step, and the schedule would jump."""
        self.batcher = replace(self.batcher, first_step=step, first_index=self.consumed)
        self.iterator = None  # workers hold a copy of the batcher

    def uneven_epochs(self, shard_tokens: list[list[int] | None] | None = None, run_tokens: int = 0) -> str:
        """A note for the log when a source's epoch does not spread evenly over the slots of all ranks, else ''
        (also when `shard_tokens` shows that the run's `run_tokens` end within the source's first epoch).

        Each slot reads its own units of an epoch, then goes on to the next, and all slots read at the same pace:
        when together they have read an epoch's worth of tokens, the slots given more than the mean are still in
        their last units while others have begun the next epoch. Their excess is what is still unread then.
        `shard_tokens` (per source, the manifest's per shard in list order, or None) weighs the units, which
        otherwise count as equal: shards are cut by bytes and each document costs a tar header, so their tokens
        vary far more than their sizes, and counting units alone missed 5-10% of an epoch going unread.
        Averaged over the first epochs, as the assignment changes every epoch."""
        notes = []
        for index, (units, share) in enumerate(zip(self.units, self.spec.shares)):
            tokens = shard_tokens[index] if shard_tokens else None
            if note := self.uneven_source(units, tokens, int(run_tokens * share)):
                notes.append(self.named(index, note))
        return "; ".join(notes)

    def named(self, index: int, note: str) -> str:
        """A note on source `index`, headed by its name when there are several."""
        source = self.spec.sources[index]
        return f"{source.name or f'source {index}'}: {note}" if len(self.spec.sources) > 1 else note

    def uneven_source(self, units: list[Unit], shard_tokens: list[int] | None, run_tokens: int) -> str:
        slots = self.spec.world_size * self.spec.slots_per_rank
        weighed = shard_tokens is not None and len(shard_tokens) * units[0].parts == len(units)
        tokens = np.repeat(np.asarray(shard_tokens, dtype=np.float64), units[0].parts) if weighed else \
            np.ones(len(units))
        total = tokens.sum()
        if total <= 0 or weighed and run_tokens and run_tokens < total:
            return ""
        shares = []
        for epoch in range(EPOCHS_SAMPLED):
            order = epoch_order(self.spec.seed, epoch, len(units))
            # As epoch_units deals them.
            per_slot = np.bincount(np.arange(len(units)) % slots, weights=tokens[order], minlength=slots)
            shares.append(np.clip(per_slot - total / slots, 0, None).sum() / total)
        share = float(np.mean(shares))
        if share < 0.01:
            return ""
        return (f"{len(units)} read units over {slots} loader slots ({len(units) / slots:.2f} each per epoch"
                f"{', weighed by their tokens' if weighed else ''}): when an epoch's worth of "
                f"tokens has been read, about {share:.0%} of its tokens are still unread while others are being "
                "read a second time; more units per slot even this out (smaller data.prepare.shard_bytes, or "
                "fewer slots: ranks x max(1, data.num_workers))")

    def skipped(self) -> dict[str, int]:
        total: Counter = Counter()
        for state in self.states:
            for source in state.sources:
                total.update(source.skipped)
        return dict(total)

    def recorded(self) -> dict:
        """What a position is only valid for, besides the layout: each source's shard list, contents and share
        of the rows, and the seed and shuffle block that order the units and documents."""
        return {"sources": [{"shards": shards, "contents": source.contents, "weight": share}
                            for shards, source, share in zip(self.shards, self.spec.sources, self.spec.shares)],
                "seed": self.spec.seed, "shuffle_block": self.spec.shuffle_block}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "world_size": self.spec.world_size, "rank": self.spec.rank,
                "num_workers": self.spec.num_workers, **self.recorded(), "consumed": self.consumed,
                "slots": [asdict(s) for s in self.states]}

    def upgraded(self, state: dict) -> dict:
        """A saved state as this version writes it. Version 2 had one source: its slots' position fields become
        their only source's. A seed or shuffle block it predates is taken to be this loader's; a shard list or
        contents it predates stays unknown (None), and matches any (`same_source`)."""
        if state.get("version") != 2:
            return state
        state = {"seed": self.spec.seed, "shuffle_block": self.spec.shuffle_block, **state, "version": STATE_VERSION}
        state["sources"] = [{"shards": state.pop("shards", None), "contents": state.pop("contents", None),
                             "weight": 1.0}]
        state["slots"] = [{"batches": slot["batches"], "sources": [{k: v for k, v in slot.items() if k != "batches"}]}
                          for slot in state["slots"]]
        return state

    def load_state_dict(self, state: dict) -> None:
        state = self.upgraded(state)
        expected = {"version": STATE_VERSION, "world_size": self.spec.world_size, "rank": self.spec.rank,
                    "num_workers": self.spec.num_workers, **self.recorded()}
        if changed := differences(state, expected):
            raise ValueError(f"cannot resume the data position exactly: {changed}")
        self.states = [SlotState.of(s) for s in state["slots"]]
        self.consumed = state["consumed"]
        self.iterator = None

    def resume(self, saved: list[dict], allowed: bool = False) -> str:
        """Position this rank from a checkpoint's loader states of every rank: exactly where this rank left off
        when the layout (ranks x workers) and the sources are the same; else continued (see `continue_from`),
        and a note for the log says so. Sources that changed (another mixture, or a folder prepared again,
        which no config key shows) only when `allowed` (trainer.allow_config_change). ValueError when it
        cannot go on (other seed or shuffle block, or no source the same)."""
        saved = [self.upgraded(state) for state in saved]
        first = saved[0]
        changed = differences(first, {"sources": self.recorded()["sources"]})
        same_layout = len(saved) == self.spec.world_size and first.get("num_workers") == self.spec.num_workers
        if (same_layout and not changed) or (changed and not (allowed and self.found_sources(first))):
            self.load_state_dict(saved[self.spec.rank])  # raises naming what changed, if anything did
            return ""
        return self.continue_from(saved)

    def found_sources(self, state: dict) -> dict[int, int]:
        """{index here: index in `state`} of the sources a saved state has too: the same shard list and contents,
        where a state records them (`upgraded`); a saved source that could be more than one of these is none."""
        candidates = {index: [old for old, source in enumerate(state.get("sources", [])) if same_source(source, new)]
                      for index, new in enumerate(self.recorded()["sources"])}
        claims = Counter(old for found in candidates.values() for old in found)
        return {index: found[0] for index, found in candidates.items() if len(found) == 1 and claims[found[0]] == 1}

    def continue_from(self, saved: list[dict]) -> str:
        """Continue the data of a run that had another layout of ranks and workers, or another mixture, from its
        ranks' states, without reading a document twice or leaving one out: each source found in the checkpoint
        goes on from where the old slots were (`continue_source`); a source new to the run, changed, or whose
        shards the new layout splits otherwise (fewer shards than loader slots) starts at its beginning, as long
        as another goes on; one no longer listed is no longer read. Batch indices (and with them mask seeds) go
        on from the saved count, and the rows' sources from there, with the new weights."""
        first = saved[0]
        recorded = self.recorded()
        for key in ("version", "seed", "shuffle_block"):
            value = STATE_VERSION if key == "version" else recorded[key]
            if key in first and first[key] != value:
                raise ValueError(f"cannot continue the data position: {key} was {first[key]} now {value}")
        found = self.found_sources(first)
        if not found:
            changed = differences(first, {"sources": recorded["sources"]})
            raise ValueError(f"cannot continue the data position: {changed}")
        if len(saved) != first["world_size"] or [state["rank"] for state in saved] != list(range(len(saved))):
            raise ValueError("cannot continue the data position: the checkpoint lacks some ranks' loader states")
        old_slots = first["world_size"] * max(1, first["num_workers"])
        slots, per_rank = self.spec.world_size * self.spec.slots_per_rank, self.spec.slots_per_rank
        old = [SlotState.of(slot) for state in saved for slot in state["slots"]]
        positions: list[list[SourceState]] = []  # per source, this rank's slots' positions
        notes, restarts = [], []
        carried = set()  # the saved sources whose positions (and skip counts) go on here
        for index in range(len(self.spec.sources)):
            if index not in found:
                positions.append([SourceState() for _ in range(per_rank)])
                notes.append(self.named(index, "new or changed, read from its beginning"))
            elif old_slots == slots:  # a slot's stream depends on its number alone: each goes on as it was
                positions.append([old[self.spec.rank * per_rank + local].sources[found[index]]
                                  for local in range(per_rank)])
                carried.add(found[index])
                notes.append(self.named(index, "goes on from its position"))
            else:
                try:
                    states, note = self.continue_source(self.units[index], [st.sources[found[index]] for st in old])
                    carried.add(found[index])
                except ValueError as err:
                    restarts.append(str(err))
                    states, note = [SourceState() for _ in range(per_rank)], f"{err}, so it is read from its beginning"
                positions.append(states)
                notes.append(self.named(index, note))
        if len(restarts) == len(found):  # nothing would go on: the run's data restarts, as for a single source
            raise ValueError(f"cannot continue the data position: {'; '.join(restarts)}")
        if dropped := len(first["sources"]) - len(found):
            notes.append(f"{dropped} source{'s' * (dropped > 1)} of the checkpoint no longer read (or changed)")
        consumed = max(state["consumed"] for state in saved)
        # Batch i of the rank comes from slot i % per_rank: its count so far continues from `consumed`.
        self.states = [SlotState(batches=consumed // per_rank + (local < consumed % per_rank),
                                 sources=[states[local] for states in positions]) for local in range(per_rank)]
        self.consumed = consumed
        self.iterator = None
        # What the saved sources whose positions end here (no longer read, changed, or read again from their
        # beginning) skipped stays in the run's totals.
        self.keep_counts([source for slot in old for index, source in enumerate(slot.sources) if index not in carried])
        moved = (first["world_size"], first["num_workers"]) != (self.spec.world_size, self.spec.num_workers)
        layout = f" from {old_slots} loader slot{'s' * (old_slots > 1)} on {slots}" if moved else ""
        return f"data position continued{layout}: " + "; ".join(notes)

    def restart(self, saved: list[dict]) -> None:
        """Read the data from its beginning, as a new run would, after a change allowed on resume that no
        position survives (another seed or shuffle block, or no source the same), keeping the counts of bad data
        the checkpoint's ranks skipped: the data is read again, but the run's totals never go down."""
        self.states = [SlotState.fresh(len(self.spec.sources)) for _ in range(self.spec.slots_per_rank)]
        self.consumed = 0
        self.iterator = None
        self.keep_counts([source for state in saved for slot in self.upgraded(state)["slots"]
                          for source in SlotState.of(slot).sources])

    def keep_counts(self, ended: list[SourceState]) -> None:
        """Keep the skip counts of saved positions that do not go on in the run's totals, held by rank 0's first
        slot as a layout change's counts are (`continue_source`)."""
        counts = sum((Counter(source.skipped) for source in ended), Counter())
        if counts and self.spec.rank == 0:
            held = self.states[0].sources[0]
            self.states[0].sources[0] = replace(held, skipped=dict(counts + Counter(held.skipped)),
                                                unit_skipped=dict(counts + Counter(held.unit_skipped)))

    def continue_source(self, units: list[Unit], old: list[SourceState]) -> tuple[list[SourceState], str]:
        """This rank's slots' positions in one source, continued from those of the old slots (all ranks') and
        a note. Across all new slots: units the old slots finished in their current epochs are skipped
        (`SourceState.done`), those they were part-way through are finished first from where they stopped
        (`SourceState.carry`, dealt round-robin), and the rest of those epochs is read by the new slots' shares
        as usual. Skip counts add up in rank 0's first slot."""
        old_slots, slots = len(old), self.spec.world_size * self.spec.slots_per_rank
        shards = len(units) // units[0].parts
        if math.ceil(old_slots / shards) != units[0].parts:  # as units_for splits them
            raise ValueError(f"with {old_slots} loader slots its {shards} shards were split into other parts than "
                             f"over {slots}")
        orders: dict[int, np.ndarray] = {}

        def share(epoch: int, slot: int, slots: int) -> list[int]:
            if epoch not in orders:
                orders[epoch] = epoch_order(self.spec.seed, epoch, len(units))
            return orders[epoch][slot::slots].tolist()

        # A slot moved here before begins at its own epoch; what it carries may come from later ones.
        low = min(min([st.epoch] + [c[0] for c in st.carry]) for st in old)
        read: defaultdict[int, set[int]] = defaultdict(set)  # per epoch from `low` on: units no one is to begin
        part_read: list[list[int]] = []
        base: Counter = Counter()
        for slot, st in enumerate(old):
            inside = bool(st.carry) or (st.block_start, st.in_block, st.in_doc) != (0, 0, 0)
            # A part-read unit is read again from its start by the slot that finishes it, counting its bad data.
            base.update(st.unit_skipped if inside else st.skipped)
            part_read += [[*c[:2], st.block_start, st.in_block, st.in_doc] if i == 0 else list(c)
                          for i, c in enumerate(st.carry)]
            for epoch in range(low, st.epoch):
                read[epoch].update(share(epoch, slot, old_slots))
            current = share(st.epoch, slot, old_slots)
            read[st.epoch].update(current[:st.unit])
            if inside and not st.carry:
                part_read.append([st.epoch, current[st.unit], st.block_start, st.in_block, st.in_doc])
            for epoch, done in st.done.items():
                read[epoch].update(done)
        for epoch, unit, *_ in part_read:
            read[epoch].add(unit)  # finished by its carrier, not by the slot whose share it is
        part_read.sort()

        states = []
        for local in range(self.spec.slots_per_rank):
            slot = self.spec.rank * self.spec.slots_per_rank + local
            carry = part_read[slot::slots]
            done = {epoch: sorted(read[epoch].intersection(share(epoch, slot, slots))) for epoch in read}
            skipped = dict(base) if slot == 0 else {}
            block_start, in_block, in_doc = carry[0][2:] if carry else (0, 0, 0)
            states.append(SourceState(epoch=low, unit=0, block_start=block_start, in_block=in_block, in_doc=in_doc,
                                      skipped=skipped, unit_skipped=dict(skipped), carry=carry,
                                      done={e: ids for e, ids in done.items() if ids}))
        epochs = f"{low}" if max(read, default=low) == low else f"{low}-{max(read)}"
        return states, (f"of epoch {epochs}, {sum(map(len, read.values())) - len(part_read)} units already read "
                        f"are skipped and {len(part_read)} part-read ones are finished first")


def same_source(saved: dict, current: dict) -> bool:
    """Whether a saved source is the current one: its shard list and contents, each where recorded."""
    return all(saved.get(key) in (None, current[key]) for key in ("shards", "contents"))


def differences(saved: dict, expected: dict) -> str:
    """What a saved state records otherwise than `expected`, as "key was X now Y", sources by their fields (those
    it does not record, None, differ from none)."""
    changes = []
    for key, value in expected.items():
        old = saved.get(key)
        if key == "sources" and old is not None and len(old) == len(value):
            several = len(value) > 1
            changes += [f"{f'source {i} ' * several}{field} was {a[field]} now {b[field]}"
                        for i, (a, b) in enumerate(zip(old, value)) for field in b
                        if a.get(field) not in (None, b[field])]
        elif old != value:
            changes.append(f"{key} was {old} now {value}")
    return ", ".join(changes)
