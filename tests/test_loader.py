"""The streaming loader: rank/worker split, equal batch counts, exact resume, URL kinds and bad data.

Shards here hold synthetic documents whose every token is the document's number (+ FIRST_ID), so packed rows
can be taken apart again and each document recognised.
"""

from __future__ import annotations

import bz2
import copy
import gzip
import io
import lzma
import math
import random
import re
import shutil
import tarfile
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds

from masktrain.data.batches import MaskSpec, mlm_batch
from masktrain.data.loader import (Batcher, Loader, LoaderSpec, Packing, SlotState, SlotStream, Source, SourceState,
                                   SourceStream, epoch_order, source_of, units_for)
from masktrain.data.masking import Vocab
from masktrain.data.reader import DataError, Skips, Unit, expand_urls, read_unit
from masktrain.trainer.engine import Runtime
from masktrain.trainer.train import restore_rank_state

START, END, FIRST_ID, VOCAB = 1, 2, 10, 4000
# Each takes seconds; a loader bug that never yields (a slot that finds no unit) fails here instead of hanging
# until the suite's 15-minute limit.
pytestmark = pytest.mark.timeout(120)


def write_shard(path: Path, docs: dict[int, int]) -> str:
    """A shard of documents {number: length}; every token of document n is FIRST_ID + n."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=0) as writer:
        for number, length in docs.items():
            writer.write({"__key__": f"{number:06d}", "tokens.npy": np.full(length, FIRST_ID + number, np.uint16)})
    return str(path)


def write_shards(root: Path, lengths: list[list[int]], first: int = 0) -> list[str]:
    """One shard per list of document lengths, documents numbered across shards from `first`."""
    urls, number = [], first
    for index, shard in enumerate(lengths):
        urls.append(write_shard(root / f"shard-{index:06d}.tar", dict(enumerate(shard, number))))
        number += len(shard)
    return urls


def spec_for(urls: list[str], rank: int = 0, world_size: int = 1, num_workers: int = 0, seq_len: int = 16,
             micro_batch_size: int = 2, shuffle_block: int = 4, strict: bool = False) -> LoaderSpec:
    return LoaderSpec(sources=[Source(urls)], rank=rank, world_size=world_size, num_workers=num_workers, seed=7,
                      micro_batch_size=micro_batch_size, shuffle_block=shuffle_block,
                      packing=Packing(seq_len, START, END), strict=strict, vocab_size=VOCAB)


# Module-level functions, not lambdas: worker processes started by spawn or forkserver receive them pickled.
def rows_only(ids: torch.Tensor, spec, rate: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": ids}


def wobbling_rate(step: int) -> float:
    return 0.15 + 0.01 * (step % 5)


def plain_batcher(rank: int = 0) -> Batcher:
    return Batcher(rows_only, None, wobbling_rate, 0, rank, 1)


def mlm_batcher(rank: int) -> Batcher:
    special = torch.arange(VOCAB) < FIRST_ID
    vocab = Vocab(size=VOCAB, pad_id=0, mask_id=6, special=special, word_start=torch.ones(VOCAB, dtype=torch.bool))
    return Batcher(mlm_batch, MaskSpec(vocab=vocab), wobbling_rate, 11, rank, 2)


def take(loader: Loader, n: int) -> tuple[list[dict], list[dict]]:
    """n batches and the loader's state after each."""
    batches, states = [], []
    for _ in range(n):
        batches.append(next(loader))
        states.append(copy.deepcopy(loader.state_dict()))
    return batches, states


def position(state: dict, slot: int = 0, source: int = 0) -> dict:
    """A slot's position in a source, from a loader's state_dict."""
    return state["slots"][slot]["sources"][source]


def version_2(state: dict, *without: str) -> dict:
    """A one-source state as version 2 saved it (each slot's position fields beside its batch count, the shard
    list and contents at the top), less the keys `without` (saved before they were recorded)."""
    (source,) = state["sources"]
    old = {**{k: v for k, v in state.items() if k not in ("sources", "slots")}, "version": 2,
           "shards": source["shards"], "contents": source["contents"],
           "slots": [{"batches": slot["batches"], **slot["sources"][0]} for slot in state["slots"]]}
    return {k: v for k, v in old.items() if k not in without}


MIXED = 1000
"""Documents of a mixture's second source are numbered from here."""


def mixture(tmp_path: Path, a: list[list[int]], b: list[list[int]], weights=(3, 1), **options) -> LoaderSpec:
    """Two sources, named a and b, b's documents numbered from MIXED. Each is told apart by its contents, as
    the manifests' counts tell prepared folders apart (their shards have the same names)."""
    spec = spec_for(write_shards(tmp_path / "a", a), **options)
    return replace(spec, sources=[Source(spec.sources[0].urls, weights[0], "a", name="a"),
                                  Source(write_shards(tmp_path / "b", b, MIXED), weights[1], "b", name="b")])


def from_b(batch: dict) -> list[int]:
    """Per row, 1 when it holds a document of source b."""
    return [int(any(number >= MIXED for number in document_numbers(row[None])))
            for row in batch["input_ids"].numpy()]


def assert_same_batches(got: list[dict], expected: list[dict], context: str) -> None:
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert a.keys() == b.keys(), context
        for key in a:
            assert torch.equal(a[key], b[key]), f"{context}: batch {index}, {key} differs"


def document_numbers(rows: np.ndarray) -> list[int]:
    """Numbers of the documents that start in these rows (concatenated in order)."""
    tokens = rows.reshape(-1)
    return [int(tokens[i + 1]) - FIRST_ID for i in np.flatnonzero(tokens[:-1] == START)]


def epoch_documents(urls: list[str], world_size: int, workers: int, epochs: int) -> list[Counter]:
    """Per epoch, how often each document came out of all slots of all ranks."""
    slots = world_size * max(1, workers)
    units = units_for(expand_urls(urls), slots)
    seen = [Counter() for _ in range(epochs)]
    for slot in range(slots):
        stream = SourceStream(units, slot, slots, 7, 3, Packing(16, START, END), False, SourceState(), VOCAB)
        for doc in stream.documents():
            if stream.state.epoch >= epochs:
                break
            seen[stream.state.epoch][int(doc[1]) - FIRST_ID] += 1
    return seen


@pytest.mark.parametrize("lengths, world_size, workers", [
    ([[5] * 7, [3] * 2, [9] * 11, [4] * 1, [6] * 5], 2, 2),  # uneven shards, more shards than slots
    ([[5] * 13, [7] * 4], 2, 3),                              # fewer shards than slots: split by document
    ([[4] * 9], 3, 0),                                        # one shard, three in-process ranks
])
def test_every_document_once_per_epoch_across_ranks_and_workers(tmp_path, lengths, world_size, workers):
    urls = write_shards(tmp_path, lengths)
    total = sum(len(shard) for shard in lengths)
    for epoch, seen in enumerate(epoch_documents(urls, world_size, workers, epochs=2)):
        assert seen == Counter(range(total)), f"epoch {epoch}"


def test_a_unit_count_that_slots_do_not_divide_is_reported_with_what_it_costs(tmp_path):
    """5 units over 4 slots: when all ranks together have read 5 shards' worth, the three slots with one unit
    have begun the next epoch while one is still in its second. The note's share is what goes unread then."""
    urls = write_shards(tmp_path, [[14] * 20] * 5)  # 16 tokens with boundaries: a row each
    loaders = [Loader(spec_for(urls, rank=rank, world_size=4, micro_batch_size=1), plain_batcher(rank))
               for rank in range(4)]
    seen = Counter()
    for _ in range(100 // 4):
        for loader in loaders:
            seen.update(document_numbers(next(loader)["input_ids"].numpy()))
    assert 0.12 <= (100 - len(seen)) / 100 <= 0.16 and any(count > 1 for count in seen.values())
    assert loaders[0].uneven_epochs().startswith("5 read units over 4 loader slots (1.25 each per epoch): when an "
                                                 "epoch's worth of tokens has been read, about 15% of its tokens")
    assert Loader(spec_for(urls[:4], world_size=4), plain_batcher()).uneven_epochs() == ""


def test_shards_of_unequal_tokens_are_reported_even_when_their_count_divides_evenly(tmp_path):
    """Two shards over two slots, one holding three times the other's tokens (shards are cut by bytes, and
    short documents spend most of theirs on tar headers): when both slots have read half the epoch, a quarter
    of it is still unread. Counting units alone saw nothing."""
    urls = write_shards(tmp_path, [[14] * 30, [14] * 10])
    loaders = [Loader(spec_for(urls, rank=rank, world_size=2, micro_batch_size=1), plain_batcher(rank))
               for rank in range(2)]
    seen = Counter()
    for _ in range(20):
        for loader in loaders:
            seen.update(document_numbers(next(loader)["input_ids"].numpy()))
    assert 40 - len(seen) == 10
    assert loaders[0].uneven_epochs() == ""
    assert loaders[0].uneven_epochs([[30 * 16, 10 * 16]]).startswith(
        "2 read units over 2 loader slots (1.00 each per epoch, weighed by their tokens): when an epoch's worth of "
        "tokens has been read, about 25% of its tokens are still unread")
    # A run that ends within its first epoch reads nothing twice.
    assert loaders[0].uneven_epochs([[30 * 16, 10 * 16]], run_tokens=39 * 16) == ""
    assert loaders[0].uneven_epochs([[30 * 16, 10 * 16]], run_tokens=40 * 16) != ""


def test_loader_batches_are_its_slots_streams_in_turn(tmp_path):
    """What the worker processes deliver is exactly the slots' streams, round-robin, which carries the
    split above over to the loader."""
    urls = write_shards(tmp_path, [[5] * 7, [30] * 3, [9] * 11])
    spec = spec_for(urls, rank=1, world_size=2, num_workers=2)
    got, _ = take(Loader(spec, plain_batcher(1)), 12)
    units = units_for(urls, 4)
    streams = [SlotStream([units], spec.integer_weights, 2 + local, 4, 2 * local + 1, 7, spec.shuffle_block,
                          spec.packing, False, SlotState.fresh(1), VOCAB).batches(spec.micro_batch_size)
               for local in range(2)]
    expected = [{"input_ids": torch.from_numpy(next(streams[i % 2]))} for i in range(12)]
    assert_same_batches(got, expected, "loader vs slot streams")


def rank_steps(rank: int, world_size: int, init_file: str, urls: list[str], steps: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    loader = Loader(spec_for(urls, rank=rank, world_size=world_size, num_workers=1), plain_batcher(rank))
    total = torch.zeros(1)
    for _ in range(steps):
        batch = next(loader)
        # A collective per step, as DeepSpeed does: a rank without a batch would hang the other one here.
        total += batch["input_ids"].sum()
        dist.all_reduce(total)
    epochs = [position(loader.state_dict(), slot)["epoch"] for slot in range(loader.spec.slots_per_rank)]
    torch.save({"steps": steps, "epochs": epochs}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_yields_the_same_number_of_batches_with_uneven_shards(tmp_path):
    # One shard holds a single short document, the other hundreds: each epoch one rank gets the tiny one.
    urls = write_shards(tmp_path / "shards", [[3], [40] * 300])
    out = str(tmp_path / "result")
    mp.start_processes(rank_steps, args=(2, str(tmp_path / "init"), urls, 30, out), nprocs=2, start_method="fork")
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert [r["steps"] for r in results] == [30, 30]
    # The rank that drew the tiny shard ran out of its first epoch and went on; the other is still in it.
    epochs = sorted(r["epochs"][0] for r in results)
    assert epochs[0] == 0 and epochs[1] >= 1, epochs


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("mixed", [False, True])
def test_resume_with_two_workers_is_bitwise_identical(tmp_path, rank, mixed):
    """After an odd number of batches the next one comes from the second worker: the restarted workers' slots
    must be rotated to continue the round-robin (a fixed list: one drawn at random missed that one run in four).
    Mixed with a second source, each keeps its own position."""
    lengths = [[random.Random(n).randrange(1, 40) for n in range(k, k + 9)] for k in range(0, 50, 9)]
    options = dict(rank=rank, world_size=2, num_workers=2, micro_batch_size=3)
    spec = mixture(tmp_path, lengths, [[7, 30, 2], [19, 5]], (0.7, 0.3), **options) if mixed else \
        spec_for(write_shards(tmp_path, lengths), **options)
    expected, states = take(Loader(spec, mlm_batcher(rank)), 24)
    for step in (1, 4, 5, 17):
        resumed = Loader(spec, mlm_batcher(rank))
        resumed.load_state_dict(states[step - 1])
        got, _ = take(resumed, 24 - step)
        resumed.close()
        assert_same_batches(got, expected[step:], f"rank {rank}, resumed after batch {step}")


def test_each_shuffle_block_and_epoch_is_permuted_its_own_way(tmp_path):
    """The permutation is keyed by the block's place (epoch, unit, block start): blocks of equal length must not
    all be shuffled alike, nor a block alike in every epoch."""
    urls = write_shards(tmp_path, [[6] * 16])
    loader = Loader(spec_for(urls, seq_len=8, micro_batch_size=8, shuffle_block=8), plain_batcher())
    order = [n for _ in range(4) for n in document_numbers(next(loader)["input_ids"].numpy())]
    blocks = [order[i:i + 8] for i in range(0, 32, 8)]
    assert [sorted(b) for b in blocks] == [list(range(8)), list(range(8, 16))] * 2
    patterns = [[n % 8 for n in block] for block in blocks]
    assert len({tuple(p) for p in patterns}) == 4, patterns


def test_masks_differ_between_ranks_for_the_same_rows_and_batch_index():
    """The generator is keyed by rank too: otherwise every data-parallel rank masked the same positions at
    every step whenever rows fill the sequence (the random policy's candidates are then alike)."""
    rows = torch.randint(FIRST_ID, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))
    masks = [mlm_batcher(rank)(rows, 3)["labels"] != -100 for rank in (0, 1)]
    assert masks[0].any() and not torch.equal(masks[0], masks[1])
    assert torch.equal(mlm_batcher(0)(rows, 3)["labels"], mlm_batcher(0)(rows, 3)["labels"])


def test_a_position_loads_only_into_the_layout_it_was_saved_in(tmp_path):
    """Slot positions are per rank and worker: another layout would read other slots' units from them."""
    urls = write_shards(tmp_path, [[5] * 6, [9] * 4, [3] * 8])
    loader = Loader(spec_for(urls, num_workers=2, world_size=2), plain_batcher())
    take(loader, 3)
    state = loader.state_dict()
    loader.close()
    for changed, message in (({"num_workers": 1}, "num_workers was 2 now 1"), ({"rank": 1}, "rank was 0 now 1"),
                             ({"world_size": 4}, "world_size was 2 now 4")):
        with pytest.raises(ValueError, match=message):
            other = Loader(replace(spec_for(urls, num_workers=2, world_size=2), **changed), plain_batcher())
            other.load_state_dict(state)


@pytest.mark.parametrize("doc_len, seq_len", [(6, 8), (37, 8), (3, 16)])
def test_resume_after_every_batch_including_block_unit_and_epoch_boundaries(tmp_path, doc_len, seq_len):
    """(6, 8): each document with its 2 boundary tokens fills a row exactly, so batches end exactly where
    documents, blocks, units and epochs end. (37, 8): documents span several rows and batches."""
    urls = write_shards(tmp_path, [[doc_len] * 4, [doc_len] * 5, [doc_len] * 2])
    spec = spec_for(urls, seq_len=seq_len, shuffle_block=3)
    expected, states = take(Loader(spec, plain_batcher()), 40)
    slots = [s["slots"][0]["sources"][0] for s in states]
    assert any(s["block_start"] > 0 for s in slots) and any(s["unit"] > 0 for s in slots)
    assert slots[-1]["epoch"] >= 1
    for step in range(1, 40):
        resumed = Loader(spec, plain_batcher())
        resumed.load_state_dict(states[step - 1])
        got, _ = take(resumed, min(6, 40 - step))
        assert_same_batches(got, expected[step:step + 6], f"resumed after batch {step}")


def test_a_shard_cut_short_before_a_restart_is_counted_and_packing_restarts_cleanly(tmp_path):
    """The restart re-reads the block it stopped in, but this time the shard ends early (as when a `pipe:`
    download fails): the document that was half packed is gone, and what follows must be whole documents."""
    (url,) = write_shards(tmp_path, [[5] * 12])
    spec = spec_for([url], seq_len=8, shuffle_block=6)
    _, states = take(Loader(spec, plain_batcher()), 12)
    state = next(s for s in states if position(s)["block_start"] == 6 and position(s)["in_block"] >= 2)
    with tarfile.open(url) as archive:
        cut = archive.getmembers()[8].offset
    Path(url).write_bytes(Path(url).read_bytes()[:cut])  # the second block now holds 2 documents, not 6
    resumed = Loader(spec, plain_batcher())
    resumed.load_state_dict(state)
    rows = torch.cat([b["input_ids"] for b in take(resumed, 2)[0]]).reshape(-1).numpy()
    assert resumed.skipped() == {"truncated shard": 1}
    starts = np.flatnonzero(rows == START)
    assert starts[0] == 0
    for begin, end in zip(starts[:-1], starts[1:]):
        assert rows[end - 1] == END and len(set(rows[begin + 1:end - 1])) == 1 and end - begin == 7


def test_a_shard_that_comes_back_empty_at_a_restart_leaves_the_next_shard_whole(tmp_path):
    """Stopped inside a shard's first block, the restart finds nothing left in it (truncated, or its `pipe:`
    failed this time): the position within that block must not carry into the next shard, whose first
    documents it would skip, uncounted."""
    urls = write_shards(tmp_path, [[5] * 6, [5] * 6])
    spec = spec_for(urls, seq_len=8, shuffle_block=6)
    batches, states = take(Loader(spec, plain_batcher()), 2)
    state = states[1]
    assert position(state)["block_start"] == 0 and position(state)["in_block"] >= 2
    first = int(batches[0]["input_ids"][0, 1]) - FIRST_ID  # the number of the first document read
    current, following = (urls[0], urls[1]) if first < 6 else (urls[1], urls[0])
    with tarfile.open(current) as archive:
        cut = archive.getmembers()[0].offset_data + 4  # inside the first document: none comes back
    Path(current).write_bytes(Path(current).read_bytes()[:cut])
    resumed = Loader(spec, plain_batcher())
    resumed.load_state_dict(state)
    stream = torch.cat([b["input_ids"] for b in take(resumed, 3)[0]]).reshape(-1).numpy()[:6 * 7]
    documents = stream.reshape(6, 7)
    assert (documents[:, 0] == START).all() and (documents[:, -1] == END).all()
    numbers = sorted(int(n) - FIRST_ID for n in documents[:, 1])
    assert numbers == (list(range(6, 12)) if following == urls[1] else list(range(6)))
    assert all(len(set(row[1:-1])) == 1 for row in documents)
    assert resumed.skipped()["truncated shard"] >= 1


def test_a_position_resumes_only_on_its_own_shard_list_wherever_the_shards_now_lie(tmp_path):
    urls = write_shards(tmp_path / "a", [[5] * 6, [9] * 4, [3] * 8])
    expected, states = take(Loader(spec_for(urls), plain_batcher()), 8)
    moved = [shutil.copy(url, tmp_path) for url in urls]  # the same shards, copied to node-local disk
    resumed = Loader(spec_for(moved), plain_batcher())
    resumed.load_state_dict(states[3])
    assert_same_batches(take(resumed, 4)[0], expected[4:8], "resumed from the copies")

    grown = write_shards(tmp_path / "b", [[5] * 6, [9] * 4, [3] * 8, [4] * 5])  # data added, prepared again
    with pytest.raises(ValueError, match="cannot resume the data position exactly: shards was 3 shards, sha256 "
                                         "[0-9a-f]+ now 4 shards"):
        Loader(spec_for(grown), plain_batcher()).load_state_dict(states[3])
    # The same shards ordered by another seed or shuffle block: the saved unit and block index other data.
    for changed, message in (({"seed": 8}, "seed was 7 now 8"), ({"shuffle_block": 3}, "shuffle_block was 4 now 3")):
        with pytest.raises(ValueError, match=f"cannot resume the data position exactly: {message}"):
            Loader(replace(spec_for(moved), **changed), plain_batcher()).load_state_dict(states[3])
    older = version_2(states[3], "shards", "seed", "shuffle_block")  # saved before these were recorded
    old_style = Loader(spec_for(moved), plain_batcher())
    old_style.load_state_dict(older)
    assert_same_batches(take(old_style, 4)[0], expected[4:8], "resumed from a state without the shard list")


def test_brace_patterns_and_pipe_commands_read_the_same_batches(tmp_path):
    urls = write_shards(tmp_path, [[5] * 6, [9] * 4, [3] * 8])
    for url in urls:
        Path(url + ".gz").write_bytes(gzip.compress(Path(url).read_bytes()))
    variants = {
        "paths": urls,
        "brace": [str(tmp_path / "shard-{000000..000002}.tar")],
        "pipe": [f"pipe:cat {url}" for url in urls],
        "gzip": [url + ".gz" for url in urls],
        "gzip pipe": [f"pipe:cat {url}.gz" for url in urls],
    }
    batches = {name: take(Loader(spec_for(u), plain_batcher()), 15)[0] for name, u in variants.items()}
    for name in variants:
        assert_same_batches(batches[name], batches["paths"], name)


COMPRESSED = {
    "gzip": gzip.compress,
    # Independent members, as bgzip (64 KiB each) and parallel gzip write: one valid gzip file.
    "gzip members of 700 bytes": lambda data: b"".join(gzip.compress(data[at:at + 700])
                                                      for at in range(0, len(data), 700)),
    "gzip members of 64 KiB": lambda data: b"".join(gzip.compress(data[at:at + 65280])
                                                    for at in range(0, len(data), 65280)),
    "bzip2": bz2.compress,
    "xz": lzma.compress,
}


@pytest.mark.parametrize("kind", sorted(COMPRESSED))
@pytest.mark.parametrize("through", ["file", "pipe"])
def test_a_compressed_shard_reads_as_its_tar(tmp_path, kind, through):
    data, _ = tar_bytes({number: 300 for number in range(200)})
    path = tmp_path / "shard.tar.z"
    path.write_bytes(COMPRESSED[kind](data))
    url = str(path) if through == "file" else f"pipe:cat {path}"
    docs = list(read_unit(Unit(url), Skips(strict=True), VOCAB))
    assert [int(doc[0]) - FIRST_ID for doc in docs] == list(range(200))


def tar_bytes(docs: dict[int, int]) -> tuple[bytes, list[tarfile.TarInfo]]:
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, mtime=0) as writer:
        for number, length in docs.items():
            writer.write({"__key__": f"{number:06d}", "tokens.npy": np.full(length, FIRST_ID + number, np.uint16)})
    data = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return data, archive.getmembers()


def bad_shards(root: Path) -> dict[str, tuple[str, str, str]]:
    """Shards with one problem each: name -> (url, reason counted, member the strict error names)."""
    root.mkdir(parents=True, exist_ok=True)
    data, members = tar_bytes({n: 5 for n in range(100, 104)})
    header = members[2].offset  # documents 100 and 101 come before it
    cases = {
        "cut_at_member": (data[:header], "truncated shard", "after member 000101.tokens.npy"),
        "cut_in_member": (data[:members[2].offset_data + 20], "truncated shard", "in member 000102.tokens.npy"),
        "garbled_header": (data[:header] + b"\xff" * 512 + data[header + 512:], "corrupt shard",
                           "after member 000101.tokens.npy"),
        "not_a_tar": (b"this is not a tar file" * 40, "unreadable shard", "at the start"),
        # What a crash can leave of a shard being written: its size, all zeros. tar reads it as an empty archive.
        "zeros": (bytes(len(data)), "empty shard", "at the start: no file in it"),
        # `cat` of two shards: tar stops at the first end block, which would drop the second shard's members.
        "concatenated": (data + tar_bytes({120: 5})[0], "data after end of shard", "after member 000103.tokens.npy"),
    }
    shards = {name: (str(root / f"{name}.tar"), reason, where) for name, (_, reason, where) in cases.items()}
    for name, (blob, _, _) in cases.items():
        Path(shards[name][0]).write_bytes(blob)
    # The same join of two gzip'd shards, read from a file and through a pipe.
    joined = root / "concatenated_gzip.tar.gz"
    joined.write_bytes(gzip.compress(data) + gzip.compress(tar_bytes({120: 5})[0]))
    shards["concatenated_gzip"] = (str(joined), "data after end of shard", "after member 000103.tokens.npy")
    shards["concatenated_gzip_pipe"] = (f"pipe:cat {joined}", "data after end of shard",
                                        "after member 000103.tokens.npy")
    # A gzip'd shard cut inside document 102: the documents before it still count. The compressor is flushed
    # there, so the cut does not depend on how zlib packs the rest.
    packer = zlib.compressobj(wbits=31)
    (root / "cut_gzip.tar.gz").write_bytes(packer.compress(data[:header]) + packer.flush(zlib.Z_FULL_FLUSH)
                                           + packer.compress(data[header:header + 600])
                                           + packer.flush(zlib.Z_SYNC_FLUSH))
    shards["cut_gzip"] = (str(root / "cut_gzip.tar.gz"), "truncated shard", "in member 000102.tokens.npy")
    # One byte changed in a gzip'd shard stored uncompressed (deflate's stored blocks), so the change reaches the
    # tokens intact: only gzip's CRC, checked at the member's end, tells. This shard is one tar record (10 KiB)
    # after the first block, dropped whole with the error.
    stored = bytearray(gzip.compress(data, compresslevel=0))
    stored[stored.index(np.full(5, FIRST_ID + 102, np.uint16).tobytes())] ^= 1
    (root / "corrupt_gzip.tar.gz").write_bytes(stored)
    # Cut just before gzip's trailer: the whole tar inflates, but its CRC never came.
    (root / "gzip_without_trailer.tar.gz").write_bytes(gzip.compress(data)[:-8])
    shards["gzip_without_trailer"] = (str(root / "gzip_without_trailer.tar.gz"), "truncated shard",
                                      "after member 000103.tokens.npy")
    shards["corrupt_gzip"] = (str(root / "corrupt_gzip.tar.gz"), "corrupt shard",
                              "in member 000100.tokens.npy: Error -3 while decompressing data: incorrect data check")

    def sample(name: str, payload: bytes, reason: str, member: str) -> None:
        buffer = io.BytesIO()
        with wds.TarWriter(buffer, mtime=0) as writer:
            writer.write({"__key__": "000110", "tokens.npy": np.full(4, FIRST_ID + 110, np.uint16)})
            writer.write({"__key__": member, "tokens.npy": payload})
        (root / f"{name}.tar").write_bytes(buffer.getvalue())
        shards[name] = (str(root / f"{name}.tar"), reason, f"member {member}.tokens.npy")

    sample("garbled_member", b"\x93NUMPY garbage" * 8, "bad sample", "000111")
    sample("empty_document", np_bytes(np.zeros(0, np.uint16)), "empty document", "000112")
    sample("id_outside_vocab", np_bytes(np.full(3, VOCAB + 5, np.uint16)), "bad sample", "000113")
    sample("negative_id", np_bytes(np.array([FIRST_ID, -3, FIRST_ID], np.int32)), "bad sample", "000114")

    def raw(name: str, members: list[tuple[str, int]], member: str) -> None:
        """A shard written member by member: (name, document number) each."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for member_name, number in [("__info__", 0), ("000110.tokens.npy", 110), *members]:
                payload = np_bytes(np.full(4, FIRST_ID + number, np.uint16))
                info = tarfile.TarInfo(member_name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
        (root / f"{name}.tar").write_bytes(buffer.getvalue())
        shards[name] = (str(root / f"{name}.tar"), "bad sample", f"member {member}")

    raw("repeated_member", [("000115.tokens.npy", 115), ("000115.tokens.npy", 116)], "000115.tokens.npy repeats")
    raw("no_extension", [("000117", 117)], "000117 has no extension")
    # A link's data is not in the shard. Folder entries (`tar` of a tree lists them) are no samples and no loss.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for kind, name in ((tarfile.DIRTYPE, "docs"), (tarfile.REGTYPE, "docs/000110.tokens.npy"),
                           (tarfile.SYMTYPE, "docs/000118.tokens.npy")):
            info, payload = tarfile.TarInfo(name), np_bytes(np.full(4, FIRST_ID + 110, np.uint16))
            info.type, info.size = kind, len(payload) if kind == tarfile.REGTYPE else 0
            archive.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)
    (root / "link_member.tar").write_bytes(buffer.getvalue())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("docs")
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
    (root / "folders_only.tar").write_bytes(buffer.getvalue())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("000119.tokens.npy")
        info.type, info.linkname = tarfile.SYMTYPE, "elsewhere.npy"
        archive.addfile(info)
    (root / "link_only.tar").write_bytes(buffer.getvalue())  # its link is counted, and that is all
    shards["link_only"] = (str(root / "link_only.tar"), "bad sample", "member 000119.tokens.npy is not a regular file")
    shards["folders_only"] = (str(root / "folders_only.tar"), "empty shard", "after member docs: no file in it")
    shards["link_member"] = (str(root / "link_member.tar"), "bad sample",
                             "member docs/000118.tokens.npy is not a regular file")
    shards["failing_pipe"] = (f"pipe:cat {root / 'missing.tar'} 2>/dev/null", "unreadable shard", "at the start")
    return shards


def np_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


SURVIVORS = {"concatenated": [100, 101, 102, 103], "concatenated_gzip": [100, 101, 102, 103],
             "concatenated_gzip_pipe": [100, 101, 102, 103], "gzip_without_trailer": [100, 101, 102, 103],
             "cut_gzip": [100, 101], "cut_at_member": [100, 101],
             "cut_in_member": [100, 101], "garbled_header": [100, 101],
             "garbled_member": [110], "empty_document": [110], "id_outside_vocab": [110], "negative_id": [110],
             "repeated_member": [110, 115], "no_extension": [110], "link_member": [110]}


def test_each_kind_of_bad_data_is_skipped_and_counted(tmp_path):
    for name, (url, reason, _) in bad_shards(tmp_path).items():
        skips = Skips(strict=False)
        docs = list(read_unit(Unit(url), skips, VOCAB))
        assert skips.counts == {reason: 1}, name
        assert [int(doc[0]) - FIRST_ID for doc in docs] == SURVIVORS.get(name, []), name


def test_a_bad_shard_split_over_slots_is_counted_once_over_all_its_parts(tmp_path):
    """With fewer shards than slots every slot reads the whole archive for its share of documents; the
    archive's own problem is one problem, not one per slot."""
    for name, (url, reason, _) in bad_shards(tmp_path).items():
        skips = Skips(strict=False)
        docs = [doc for part in range(4) for doc in read_unit(Unit(url, part, 4), skips, VOCAB)]
        assert skips.counts == {reason: 1}, name
        assert sorted(int(doc[0]) - FIRST_ID for doc in docs) == sorted(SURVIVORS.get(name, [])), name


def test_skip_counts_reach_the_loader_and_survive_a_resume(tmp_path):
    shards = bad_shards(tmp_path / "bad")
    good = write_shards(tmp_path / "good", [[6] * 5])
    spec = spec_for(good + [url for url, _, _ in shards.values()], seq_len=8)
    _, states = take(Loader(spec, plain_batcher()), 30)
    counted = [position(s)["skipped"] for s in states]
    assert set(counted[-1]) == {reason for _, reason, _ in shards.values()}
    for step in (1, 9, 17):
        resumed = Loader(spec, plain_batcher())
        resumed.load_state_dict(states[step - 1])
        for index in range(step, 30):
            next(resumed)
            # Re-reading the block a restart resumes in must not count its bad data a second time.
            assert resumed.skipped() == counted[index], f"resumed after batch {step}, at batch {index + 1}"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_strict_mode_fails_naming_the_shard_and_member(tmp_path, num_workers):
    good = write_shards(tmp_path / "good", [[6] * 3])
    for name, (url, reason, where) in bad_shards(tmp_path / "bad").items():
        loader = Loader(spec_for(good + [url], num_workers=num_workers, strict=True), plain_batcher())
        with pytest.raises(DataError) as err:
            take(loader, 20)
        message = str(err.value)
        assert f"{reason}: {url}: {where}" in message, f"{name}: {message}"


def test_slots_that_draw_only_empty_units_wait_for_data_instead_of_failing(tmp_path):
    """One document for 4 slots: each epoch, 3 of them draw an empty part of the shard."""
    urls = write_shards(tmp_path, [[3]])
    for rank in (0, 1):
        loader = Loader(spec_for(urls, rank=rank, world_size=2, num_workers=2), plain_batcher(rank))
        rows = torch.cat([b["input_ids"] for b in take(loader, 4)[0]]).numpy()
        assert set(document_numbers(rows)) == {0}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_no_readable_data_raises_instead_of_hanging(tmp_path, num_workers):
    urls = [url for name, (url, _, _) in bad_shards(tmp_path).items() if name in ("not_a_tar", "failing_pipe")]
    loader = Loader(spec_for(urls, world_size=1, num_workers=num_workers), plain_batcher())
    named = f"no readable document in any of the 2 units of {urls[0]} ... {urls[1]} "  # which source, in a mixture
    with pytest.raises(DataError, match=re.escape(named)):
        next(loader)


@pytest.mark.parametrize("signalled", ["after the first batch", "as the workers start"])
def test_loader_workers_outlive_preemption_signals_and_the_process_still_exits(tmp_path, signalled):
    """SLURM signals every process of a job: the loader's workers must outlive it (the rank checkpoints first),
    even when it comes before a worker has set up its signal handling, and the process must still exit normally
    afterwards although its workers ignore SIGTERM."""
    import subprocess
    import sys

    urls = write_shards(tmp_path, [[30] * 40, [30] * 40])
    first = "next(loader)" if signalled == "after the first batch" else "loader.iterator = loader.start()"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_loader import Loader, plain_batcher, spec_for
loader = Loader(spec_for({urls!r}, num_workers=2), plain_batcher())
{first}
for worker in loader.iterator._workers:
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # SIGINT: a Ctrl-C in the terminal
        os.kill(worker.pid, sig)
print(len([next(loader) for _ in range(6)]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "6"


def test_limited_validation_stops_reading_once_its_batches_are_full(tmp_path):
    from masktrain.data.validation import validation_batches

    urls = write_shards(tmp_path, [[6] * 8, [6] * 8])  # each document packs into one row of 8
    Path(urls[1]).write_bytes(b"not a tar archive")  # strict reading fails here, if it ever gets here
    pack, make = Packing(8, START, END), lambda rows, index: {"input_ids": rows}
    limited = validation_batches(urls, 0, 1, 2, pack, 0, make, Skips(True), limit=2)
    whole = validation_batches(urls[:1], 0, 1, 2, pack, 0, make, Skips(True))
    # Exactly the first shard's batches: the next shard is not opened (a `pipe:` download, or a bad shard that
    # strict reading fails on) for a batch that is not used.
    filled = validation_batches(urls, 0, 1, 2, pack, 0, make, Skips(True), limit=4)
    assert len(limited) == 2 and len(whole) == len(filled) == 4
    for got, expected in zip(limited + filled, whole[:2] + whole):
        assert torch.equal(got["input_ids"], expected["input_ids"])
    with pytest.raises(DataError):
        validation_batches(urls, 0, 1, 2, pack, 0, make, Skips(True))


def test_validation_batches_and_masks_are_the_same_at_any_world_size(tiny_data):
    """Curves from runs on other node counts, or a run resumed on another, compare: rank r of n holds global
    batches r, r + n, ... with the masks one rank alone would draw."""
    from masktrain.data import inputs
    from masktrain.data.tokenizer import Tokenizer
    from masktrain.launcher.loading import load_config
    from masktrain.trainer.objectives import OBJECTIVES

    cfg = load_config("smoke", [*tiny_data, "trainer.eval_batches=5"])
    tokenizer, objective = Tokenizer(inputs.tokenizer_dir(cfg)), OBJECTIVES["mlm"]

    def shares(world_size: int) -> list[list[dict]]:
        return [inputs.validation_set(cfg, objective.batch, True, tokenizer, rank, world_size, Skips(False))[0]
                for rank in range(world_size)]

    (alone,) = shares(1)
    assert len(alone) == 5
    for world_size in (2, 3):
        ranks = shares(world_size)
        assert [len(r) for r in ranks] == [len(alone[rank::world_size]) for rank in range(world_size)]
        for rank, batches in enumerate(ranks):
            for got, expected in zip(batches, alone[rank::world_size]):
                assert got.keys() == expected.keys()
                assert all(torch.equal(got[key], expected[key]) for key in got), (world_size, rank)


def test_a_data_folder_prepared_again_from_other_text_is_another_shard_list(tiny_data, tmp_path):
    """Prepare names shards alike whatever they hold; the manifest's counts tell them apart. A copy of the same
    folder elsewhere is the same list."""
    import json

    from masktrain.data import inputs
    from masktrain.data.tokenizer import Tokenizer
    from masktrain.launcher.loading import load_config
    from masktrain.trainer.objectives import OBJECTIVES

    data = Path(next(o for o in tiny_data if o.startswith("data.dir=")).partition("=")[2])
    copy_, other = tmp_path / "copy", tmp_path / "other"
    shutil.copytree(data, copy_)
    shutil.copytree(data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["documents"] += 1
    (other / "manifest.json").write_text(json.dumps(manifest))

    def loader(folder: Path):
        cfg = load_config("smoke", [*tiny_data, f"data.dir={folder}"])
        return inputs.train_loader(cfg, OBJECTIVES["mlm"].batch, True, Tokenizer(inputs.tokenizer_dir(cfg)), 0, 1)

    saved = loader(data)
    for _ in range(3):
        next(saved)
    state = saved.state_dict()
    loader(copy_).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot resume the data position exactly: contents was"):
        loader(other).load_state_dict(state)
    old_style = loader(other)
    old_style.load_state_dict(version_2(state, "contents"))  # saved before it was kept
    resumed = next(old_style)["input_ids"]
    assert torch.equal(resumed, next(saved)["input_ids"])  # at the saved position, not the start
    assert not torch.equal(resumed, next(loader(other))["input_ids"])


def test_a_run_reports_its_uneven_epochs_by_the_manifests_tokens_once_it_reads_a_whole_epoch(tiny_data):
    from masktrain.data import inputs
    from masktrain.data.tokenizer import Tokenizer
    from masktrain.launcher.loading import load_config
    from masktrain.trainer.objectives import OBJECTIVES

    def note(max_steps: int) -> str:
        cfg = load_config("smoke", [*tiny_data, f"trainer.max_steps={max_steps}"])
        loader = inputs.train_loader(cfg, OBJECTIVES["mlm"].batch, True, Tokenizer(inputs.tokenizer_dir(cfg)), 0, 4)
        return inputs.uneven_epochs(cfg, loader)

    assert "weighed by their tokens): when an epoch's worth of tokens has been read, about" in note(100_000)
    assert note(1) == ""


def epoch_of(slot: SourceState) -> int:
    """The epoch of the document a slot's position points at: a carried unit's own, else the slot's."""
    return slot.carry[0][0] if slot.carry else slot.epoch


def read_by_epoch(loaders: list[Loader], batches: int, counts: dict[int, Counter]) -> None:
    """Take `batches` from each loader (one row a batch), counting each document's tokens under
    the epoch it was read in. Documents fill whole rows, so a row never holds two epochs."""
    for loader in loaders:
        for _ in range(batches):
            tokens = next(loader)["input_ids"].numpy().reshape(-1)
            # Batch i of a rank comes from its slot i % slots.
            epoch = epoch_of(loader.states[(loader.consumed - 1) % loader.spec.slots_per_rank].sources[0])
            counts.setdefault(epoch, Counter()).update(int(t) - FIRST_ID for t in tokens if t >= FIRST_ID)


EPOCH_TAG = 100_000
"""Added to a token's value per epoch it is read in (`tag_epochs`): counts per (epoch, document) then show
what each epoch read, wherever a row or a stop falls."""


def tag_epochs(monkeypatch) -> None:
    read = SourceStream.read

    def tagged(self, epoch: int, unit_id: int):
        docs = read(self, epoch, unit_id)
        try:
            while True:
                doc = next(docs).copy()
                doc[doc >= FIRST_ID] += epoch * EPOCH_TAG
                yield doc
        except StopIteration as stop:
            return stop.value

    monkeypatch.setattr(SourceStream, "read", tagged)


@pytest.mark.parametrize("lengths,seq_len,shuffle_block,layouts,batches,mixed", [
    ([[14] * n for n in (16, 2, 3, 2, 2, 9)], 8, 3, (3, 2), (9,), None),
    ([[14] * n for n in (16, 2, 3, 2, 2, 9)], 8, 3, (3, 2), (20,), None),
    ([[14] * n for n in (16, 2, 3, 2, 2, 9)], 8, 3, (3, 4), (26,), None),
    ([[14] * n for n in (16, 2, 3, 2, 2, 9)], 8, 3, (2, 5), (11,), None),
    ([[14] * n for n in (16, 2, 3, 2, 2, 9)], 8, 3, (4, 3, 2), (5, 9), None),
    ([[14] * n for n in (16, 2, 3, 2, 2, 9)], 8, 3, (3, 5, 2, 1), (20, 3, 7), None),
    # Moved again while a slot of the previous move, an epoch behind, still carries a unit of a later epoch.
    ([[1, 3, 5, 6, 9, 2, 3], [7, 12, 1], [7, 3, 10, 5, 8, 5, 8]], 5, 1, (2, 3, 2, 1), (25, 9, 4), None),
    # Each source of a mixture goes on as it would alone; the small one is an epoch or two ahead.
    ([[14] * n for n in (16, 2, 3, 2, 2, 9)], 8, 3, (3, 2, 4), (10, 10), [[14] * 3, [14] * 2, [14] * 2, [14] * 2]),
])
def test_a_run_moved_to_other_ranks_reads_every_document_of_each_epoch_once(tmp_path, monkeypatch, lengths, seq_len,
                                                                             shuffle_block, layouts, batches, mixed):
    """Stopped after some batches on one layout and resumed on another (and again), the slots of the new one
    finish what the old ones left part-read, skip what they read, and read the rest: over all layouts, each
    epoch reads every document exactly once. Shards of unequal size put old slots in different epochs.
    `mixed`: the lengths of a second source, mixed in at half the first one's weight."""
    tag_epochs(monkeypatch)
    options = dict(micro_batch_size=2, seq_len=seq_len, shuffle_block=shuffle_block)
    spec = mixture(tmp_path, lengths, mixed, (2, 1), **options) if mixed else \
        spec_for(write_shards(tmp_path, lengths), **options)
    every = {number + first: length for first, shards in ((0, lengths), (MIXED, mixed or []))
             for number, length in enumerate(length for shard in shards for length in shard)}
    counts: Counter = Counter()

    def loaders(world: int) -> list[Loader]:
        return [Loader(replace(spec, rank=rank, world_size=world), plain_batcher(rank)) for rank in range(world)]

    def read(loaders: list[Loader], batches: int) -> None:
        for loader in loaders:
            for _ in range(batches):
                tokens = next(loader)["input_ids"].numpy().reshape(-1)
                tokens = tokens[tokens >= FIRST_ID]
                counts.update(zip((tokens // EPOCH_TAG).tolist(), (tokens % EPOCH_TAG - FIRST_ID).tolist()))

    current = loaders(layouts[0])
    for world, taken in zip(layouts[1:], batches):
        read(current, taken)
        saved = [loader.state_dict() for loader in current]
        current = loaders(world)
        notes = {loader.resume(saved) for loader in current}
        old_slots = saved[0]["world_size"]
        each = "a: of epoch .*; b: of epoch .*" if mixed else "of epoch .*"
        assert len(notes) == 1 and re.fullmatch(
            f"data position continued from {old_slots} loader slots? on {world}: {each}", notes.pop())
    reached = max(epoch for epoch, _ in counts)
    while min(epoch_of(source) for loader in current for state in loader.states for source in state.sources) <= reached:
        read(current, 1)
    for epoch in range(reached + 1):
        assert {n: c for (e, n), c in counts.items() if e == epoch} == every, f"epoch {epoch}"


def test_a_run_moved_to_another_worker_count_goes_on_in_order_and_counts_bad_data_once(tmp_path):
    """Worker processes are slots too: 2 workers -> none -> 3 workers on one rank, with a truncated shard read
    before the first move. Batches keep their order (the index goes on from the saved count), every document of
    each epoch is read once, and the truncated shard is counted once per epoch read."""
    urls = write_shards(tmp_path, [[14] * n for n in (5, 2, 3, 4, 3)])
    with tarfile.open(urls[-1]) as archive:
        offset = archive.getmembers()[2].offset  # documents 14 and 15 survive, 16 is cut off
    Path(urls[-1]).write_bytes(Path(urls[-1]).read_bytes()[:offset])

    def loader(workers: int) -> Loader:
        spec = spec_for(urls, num_workers=workers, micro_batch_size=1, seq_len=8, shuffle_block=3)
        return Loader(spec, plain_batcher())

    counts: dict[int, Counter] = {}
    current = loader(2)
    for workers, taken in ((0, 9), (3, 11)):
        read_by_epoch([current], taken, counts)
        saved = current.state_dict()
        current.close()
        current = loader(workers)
        assert current.resume([saved]).startswith(f"data position continued from 2 loader slots on {max(1, workers)}"
                                                  if workers == 0 else "data position continued from 1 loader")
        assert current.consumed == saved["consumed"]
    while min(epoch_of(state.sources[0]) for state in current.states) == 0:
        read_by_epoch([current], 1, counts)
    current.close()
    assert counts[0] == Counter({n: 14 for n in range(16)})

    # Slots already past epoch 0 that read through the cut shard again have counted it again.
    cut, again = len(urls) - 1, 0
    for slot, state in enumerate(state.sources[0] for state in current.states):
        for epoch in range(1, state.epoch + 1):
            share = epoch_order(7, epoch, len(urls))[slot::3].tolist()
            if cut in share:
                assert (epoch, share.index(cut)) != (state.epoch, state.unit), "in the cut shard: a count unsure"
                again += (epoch, share.index(cut)) < (state.epoch, state.unit)
    assert current.skipped() == {"truncated shard": 1 + again}


def test_a_mixture_gives_every_batch_its_sources_rows_by_weight_and_a_small_source_more_epochs(tmp_path):
    """Weights 3:1 over batches of 4 rows: 3 rows of a and 1 of b in every batch, not just on average. b holds 6
    documents, so 30 batches read it 5 times over, each document once per epoch."""
    spec = mixture(tmp_path, [[14] * 20] * 5, [[14] * 6], micro_batch_size=4)  # 14 + 2 boundary tokens: a row each
    batches, _ = take(Loader(spec, plain_batcher()), 30)
    assert [sum(from_b(batch)) for batch in batches] == [1] * 30
    numbers = Counter(n for batch in batches for n in document_numbers(batch["input_ids"].numpy()))
    assert {n: c for n, c in numbers.items() if n >= MIXED} == {MIXED + n: 5 for n in range(6)}
    assert max(c for n, c in numbers.items() if n < MIXED) == 1 and sum(numbers.values()) == 120


@pytest.mark.parametrize("weights", [[3, 1], [7, 3], [1, 1000], [1, 4, 1], [1, 1, 1, 1, 4], [1] * 6 + [6],
                                     [2, 3, 5, 7, 11]])
def test_every_stretch_of_rows_holds_each_source_its_share_to_within_a_row_per_level_of_halving(weights):
    """Two sources: within a row, in every batch and every stretch, wherever it starts; n sources: within
    log2(n) rounded up rows (each halving adds at most one)."""
    total, depth = sum(weights), math.ceil(math.log2(len(weights)))
    picked = np.array([source_of(position, weights) for position in range(3 * total + 64)])
    before = np.vstack([np.zeros(len(weights)), np.cumsum(picked[:, None] == np.arange(len(weights)), axis=0)])
    for length in range(1, 65):
        held = before[length:] - before[:-length]
        assert np.abs(held - length * np.array(weights) / total).max() < depth, length


@pytest.mark.parametrize("world, workers, accum", [(8, 0, 1), (4, 2, 1), (2, 0, 4), (2, 2, 4), (2, 4, 2)])
def test_a_steps_batches_hold_the_weights_shares_to_within_a_row_over_all_ranks(tmp_path, world, workers, accum):
    """An optimizer step's batches (grad_accum of each rank) are one stretch of the run's rows, which holds each
    source's share to within a row: not batches rounded alike (8 ranks x 8 rows at 7:3 held 16 or 24 rows of b,
    not 19 or 20), nor, with accumulation, overlapping stretches (at 49:1, a step held up to 8 of b's rows where
    its share was 2.56)."""
    for weights in ((0.7, 0.3), (49, 1)):
        spec = mixture(tmp_path / str(weights[1]), [[14] * 40] * 8, [[14] * 30] * 2, weights=weights,
                       micro_batch_size=8, num_workers=workers)
        loaders = [Loader(replace(spec, rank=rank, world_size=world, grad_accum=accum), plain_batcher(rank))
                   for rank in range(world)]
        for _ in range(12):
            rows = sum(sum(from_b(next(loader))) for loader in loaders for _ in range(accum))
            assert abs(rows - weights[1] / sum(weights) * world * accum * 8) < 1, weights
        for loader in loaders:
            loader.close()


@pytest.mark.parametrize("world, workers", [(2, 0), (1, 2), (4, 2)])
def test_every_slot_reads_each_source_at_its_share_so_each_epoch_reads_every_document_once(tmp_path, monkeypatch,
                                                                                          world, workers):
    """3:1 over batches of 2 rows: were every slot at the same place in the pattern, slot 0 would take a's rows
    only and slot 1 a's and b's, and b's epochs would leave slot 0's units unread while slot 1 read its own
    again. Every step's rows over all ranks hold b's share too, with worker slots taken in turn."""
    tag_epochs(monkeypatch)
    spec = mixture(tmp_path, [[14] * 40] * 8, [[14] * 8] * 4, weights=(3, 1), micro_batch_size=2,
                   num_workers=workers)
    loaders = [Loader(replace(spec, rank=rank, world_size=world), plain_batcher(rank)) for rank in range(world)]
    counts: Counter = Counter()
    while min(source.epoch for loader in loaders for state in loader.states for source in state.sources[1:]) < 2:
        tokens = np.concatenate([next(loader)["input_ids"].numpy().reshape(-1) for loader in loaders])
        first = tokens[1::16]  # each row a document: its start token, 14 tokens, its end token
        documents = (first % EPOCH_TAG - FIRST_ID).tolist()
        assert abs(sum(number >= MIXED for number in documents) - len(documents) / 4) < 1
        counts.update(zip((first // EPOCH_TAG).tolist(), documents))
    for loader in loaders:
        loader.close()
    for epoch in (0, 1):
        assert {n: c for (e, n), c in counts.items() if e == epoch and n >= MIXED} == {MIXED + n: 1 for n in range(32)}
    assert max(c for (e, n), c in counts.items() if n < MIXED) == 1


def test_a_mixture_changed_on_resume_goes_on_in_each_source_it_keeps(tmp_path):
    """New weights hold from the resume on, each source kept goes on where it was (nothing of a is read twice
    within its epoch), a source added starts at its beginning, one left out is no longer read; with none kept,
    the position cannot go on."""
    spec = mixture(tmp_path, [[14] * 20] * 5, [[14] * 6], micro_batch_size=4)
    first, states = take(Loader(spec, plain_batcher()), 10)
    even = Loader(replace(spec, sources=[replace(source, weight=1) for source in spec.sources]), plain_batcher())
    with pytest.raises(ValueError, match="cannot resume the data position exactly: source 0 weight was 0.75 now 0.5, "
                                         "source 1 weight was 0.25 now 0.5$"):
        even.resume([states[-1]])  # without trainer.allow_config_change
    assert even.resume([states[-1]], allowed=True) == "data position continued: a: goes on from its position; b: " \
                                                      "goes on from its position"
    then, _ = take(even, 10)
    assert [sum(from_b(batch)) for batch in then] == [2] * 10 and even.consumed == 20
    read_a = [n for batch in first + then for n in document_numbers(batch["input_ids"].numpy()) if n < MIXED]
    assert len(read_a) == len(set(read_a)) == 50

    c = Source(write_shards(tmp_path / "c", [[14] * 4], 2 * MIXED), 1, "c", name="c")
    grown = Loader(replace(spec, sources=[even.spec.sources[0], c]), plain_batcher())
    assert grown.resume([states[-1]], allowed=True) == (
        "data position continued: a: goes on from its position; c: new or changed, read from its beginning; 1 source "
        "of the checkpoint no longer read (or changed)")
    numbers = [n for batch in take(grown, 2)[0] for n in document_numbers(batch["input_ids"].numpy())]
    assert sorted(n for n in numbers if n >= 2 * MIXED) == [2 * MIXED + n for n in range(4)]
    before = {n for batch in first for n in document_numbers(batch["input_ids"].numpy())}
    assert not set(numbers) & before and not any(MIXED <= n < 2 * MIXED for n in numbers)

    with pytest.raises(ValueError, match="cannot resume the data position exactly: source 0 shards was .* source 1 "
                                         "contents was b now d"):
        Loader(replace(spec, sources=[c, replace(c, contents="d")]), plain_batcher()).resume([states[-1]], True)

    # The same folders, b prepared again (other contents): only allowed, and b then starts again.
    again = Loader(replace(spec, sources=[spec.sources[0], replace(spec.sources[1], contents="b again")]),
                   plain_batcher())
    with pytest.raises(ValueError, match="cannot resume the data position exactly: source 1 contents was b now b "
                                         "again$"):
        again.resume([states[-1]])
    assert again.resume([states[-1]], True).startswith("data position continued: a: goes on from its position; b: "
                                                       "new or changed, read from its beginning;")


def test_bad_data_a_source_skipped_stays_counted_when_a_resume_no_longer_reads_it(tmp_path):
    """b's shard is cut short, so each epoch of b counts it. Resumed without b, on the same layout or on two
    ranks, the run's totals (all ranks') still hold b's counts, and keep them through the next resume; as
    they do when b is kept but read again from its beginning (its one shard split otherwise over two ranks),
    and when the whole stream starts again (another seed), where reading b again counts it again."""
    spec = mixture(tmp_path, [[14] * 20] * 5, [[14] * 6], micro_batch_size=4)
    (cut,) = spec.sources[1].urls
    with tarfile.open(cut) as archive:
        end = archive.getmembers()[4].offset
    Path(cut).write_bytes(Path(cut).read_bytes()[:end])  # 4 documents, then the tar ends without its end blocks
    mixed = Loader(spec, plain_batcher())
    _, states = take(mixed, 12)
    counted = mixed.skipped()
    assert counted == {"truncated shard": 3}  # 12 rows of b: 3 epochs of its 4 documents
    alone = replace(spec, sources=[spec.sources[0]])
    for world in (1, 2):
        ranks = [Loader(replace(alone, rank=rank, world_size=world), plain_batcher(rank)) for rank in range(world)]
        for loader in ranks:
            assert loader.resume([states[-1]], allowed=True).endswith("1 source of the checkpoint no longer read "
                                                                      "(or changed)")
        later = [take(loader, 3)[1][-1] for loader in ranks]
        assert sum((Counter(loader.skipped()) for loader in ranks), Counter()) == counted, world
        for rank, loader in enumerate(ranks):
            loader.close()
            loader.load_state_dict(later[rank])
        assert sum((Counter(loader.skipped()) for loader in ranks), Counter()) == counted, world
    ranks = [Loader(replace(spec, rank=rank, world_size=2), plain_batcher(rank)) for rank in range(2)]
    for loader in ranks:
        assert "; b: with 1 loader slots its 1 shards were split into other parts than over 2, so it is read from its " \
               "beginning" in loader.resume([states[-1]])
    assert sum((Counter(loader.skipped()) for loader in ranks), Counter()) == counted
    for world in (1, 2):
        ranks = [Loader(replace(spec, rank=rank, world_size=world, seed=spec.seed + 1), plain_batcher(rank))
                 for rank in range(world)]
        for rank, loader in enumerate(ranks):
            note = restore_rank_state({"ranks": [{"data": states[-1]}]}, loader,
                                      Runtime(rank, rank, world, torch.device("cpu")), allowed=True)
            assert re.match(r"data stream and RNG restart from the beginning: cannot (resume|continue) the data "
                            r"position.*: seed was 7 now 8", note), note
        assert sum((Counter(loader.skipped()) for loader in ranks), Counter()) == counted, world
    again = Loader(replace(spec, seed=spec.seed + 1), plain_batcher())
    again.restart([states[-1]])
    take(again, 12)
    assert again.skipped() == {"truncated shard": 6}


def test_a_source_with_fewer_shards_than_slots_starts_again_alone_on_another_layout(tmp_path):
    """Its shards were split by the old slot count into other parts: it alone is read from its beginning, said by
    name, while the other goes on."""
    spec = mixture(tmp_path, [[14] * 10] * 6, [[14] * 12], weights=(1, 1), micro_batch_size=2)
    old = [Loader(replace(spec, rank=rank, world_size=2), plain_batcher(rank)) for rank in range(2)]
    before = {n for loader in old for _ in range(5) for n in document_numbers(next(loader)["input_ids"].numpy())}
    saved = [loader.state_dict() for loader in old]
    new = [Loader(replace(spec, rank=rank, world_size=3), plain_batcher(rank)) for rank in range(3)]
    notes = {loader.resume(saved) for loader in new}
    assert len(notes) == 1 and re.fullmatch("data position continued from 2 loader slots on 3: a: of epoch 0, .*; b: "
                                            "with 2 loader slots its 1 shards were split into other parts than over "
                                            "3, so it is read from its beginning", notes.pop())
    after = [n for loader in new for _ in range(5) for n in document_numbers(next(loader)["input_ids"].numpy())]
    assert not {n for n in after if n < MIXED} & before and {n for n in after if n >= MIXED} & before


def test_a_version_2_position_without_its_shard_list_goes_only_to_the_source_it_can_be(tmp_path):
    """States saved before the shard list or contents were recorded match a mixture's source on what they do
    record, and none when more than one would match."""
    spec = mixture(tmp_path, [[14] * 10] * 6, [[14] * 12] * 2, micro_batch_size=2)
    a_alone = replace(spec, sources=spec.sources[:1])
    _, states = take(Loader(a_alone, plain_batcher()), 6)
    added_first = Loader(replace(spec, sources=spec.sources[::-1]), plain_batcher())
    assert added_first.resume([version_2(states[-1], "contents")], allowed=True) == (
        "data position continued: b: new or changed, read from its beginning; a: goes on from its position")
    with pytest.raises(ValueError, match="cannot resume the data position exactly: sources was "):
        Loader(replace(spec, sources=spec.sources[::-1]), plain_batcher()).resume(
            [version_2(states[-1], "contents", "shards")], allowed=True)


def test_a_version_2_position_resumes_exactly(tmp_path):
    """Runs checkpointed before mixtures (one source, state version 2) resume where they were."""
    spec = spec_for(write_shards(tmp_path, [[5] * 6, [9] * 4, [3] * 8]), num_workers=2)
    expected, states = take(Loader(spec, plain_batcher()), 9)
    resumed = Loader(spec, plain_batcher())
    assert resumed.resume([version_2(states[4])]) == ""
    assert_same_batches(take(resumed, 4)[0], expected[5:], "resumed from a version 2 state")
    resumed.close()
