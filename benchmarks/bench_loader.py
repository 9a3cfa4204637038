"""Loader throughput: pre-tokenized shards -> packed rows -> (masked) batches, tokens per second.

Side by side in one process, alternating between variants so the shared machine's drift hits all alike:
- `packed`: the training loader with 1 worker process, batches of packed rows (no masking);
- `mlm`: the same with BERT masking (random 15%, 80/10/10) done in the worker;
- `packed_in_process`: num_workers=0, packing in the calling process (what one worker does alone);
- `mixed`: `packed` with the shards as two sources mixed 3:1 (`data.mixture`), each packed on its own;
- `reader` vs `webdataset_reader`: documents/s out of the same shards through masktrain's reader and through
  plain webdataset (`tarfile_samples` + np.load), which reads the same tar without the end-of-archive check.

The shards hold random token ids with a log-normal length distribution (median ~300 tokens, as web text).
Run: `.venv/bin/python -m benchmarks.bench_loader` (`--quick` for a short run).
"""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from benchmarks.common import write_result
from masktrain.data.batches import MaskSpec, mlm_batch
from masktrain.data.loader import Batcher, Loader, LoaderSpec, Packing, Source
from masktrain.data.masking import Vocab
from masktrain.data.reader import Skips, Unit, read_unit
from masktrain.data.shards import manifest_urls, publish_dataset, write_dataset

VOCAB = 32_000
SEQ_LEN, MICRO_BATCH = 512, 32


def write_shards(root: Path, documents: int, shards: int) -> list[str]:
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(300), 0.9, documents), 8, 20_000).astype(int)
    docs = ((f"document {i}", rng.integers(10, VOCAB, length, dtype=np.uint16)) for i, length in enumerate(lengths))
    manifest = write_dataset(docs, root, VOCAB, shard_bytes=2 * int(lengths.sum()) // shards, val_fraction=0.0)
    publish_dataset(root, manifest)
    return manifest_urls(root, "train")


def rows_only(ids: torch.Tensor, spec, rate: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": ids}


def constant_rate(step: int) -> float:
    return 0.15


def mlm_spec() -> MaskSpec:
    special = torch.arange(VOCAB) < 10
    return MaskSpec(vocab=Vocab(size=VOCAB, pad_id=0, mask_id=6, special=special, word_start=~special))


def loader_tokens_per_second(sources: list[Source], workers: int, mask: bool, batches: int) -> float:
    spec = LoaderSpec(sources=sources, rank=0, world_size=1, num_workers=workers, seed=0,
                      micro_batch_size=MICRO_BATCH, shuffle_block=1000, packing=Packing(SEQ_LEN, 4, 5),
                      vocab_size=VOCAB)
    batcher = Batcher(mlm_batch, mlm_spec(), constant_rate, 0, 0, 1) if mask else \
        Batcher(rows_only, None, constant_rate, 0, 0, 1)
    loader = Loader(spec, batcher)
    for _ in range(3):  # worker start-up and the first block are not the steady state
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * MICRO_BATCH * SEQ_LEN / (time.perf_counter() - start)


def reader_docs_per_second(urls: list[str]) -> float:
    start = time.perf_counter()
    count = sum(1 for url in urls for _ in read_unit(Unit(url), Skips(strict=True), VOCAB))
    return count / (time.perf_counter() - start)


def webdataset_docs_per_second(urls: list[str]) -> float:
    start = time.perf_counter()
    count = sum(1 for sample in wds.tarfile_samples([{"url": url} for url in urls])
                if len(np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)))
    return count / (time.perf_counter() - start)


def main(quick: bool = False) -> dict:
    torch.set_num_threads(1)  # as in a training process's loader worker; the machine is shared
    repeats, batches = (2, 20) if quick else (5, 100)
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(Path(tmp), 6_000 if quick else 40_000, 8)
        one, mixed = [Source(urls)], [Source(urls[:4], 3), Source(urls[4:], 1)]
        variants = {
            "packed": lambda: loader_tokens_per_second(one, 1, False, batches),
            "mlm": lambda: loader_tokens_per_second(one, 1, True, batches),
            "packed_in_process": lambda: loader_tokens_per_second(one, 0, False, batches),
            "mixed": lambda: loader_tokens_per_second(mixed, 1, False, batches),
            "reader": lambda: reader_docs_per_second(urls),
            "webdataset_reader": lambda: webdataset_docs_per_second(urls),
        }
        runs: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, run in variants.items():
                runs[name].append(run())
    median = {name: statistics.median(values) for name, values in runs.items()}
    result = {
        "setup": {"seq_len": SEQ_LEN, "micro_batch_size": MICRO_BATCH, "vocab_size": VOCAB, "workers": 1,
                  "batches_timed": batches, "repeats": repeats, "shuffle_block": 1000},
        "tokens_per_s": {name: round(median[name]) for name in ("packed", "mlm", "packed_in_process", "mixed")},
        "documents_per_s": {name: round(median[name]) for name in ("reader", "webdataset_reader")},
        "ratios": {"mlm_vs_packed": round(median["mlm"] / median["packed"], 3),
                   "mixed_vs_packed": round(median["mixed"] / median["packed"], 3),
                   "reader_vs_webdataset": round(median["reader"] / median["webdataset_reader"], 3)},
        "runs": {name: [round(v) for v in values] for name, values in runs.items()},
        "summary": [
            {"metric": "loader, shards to packed batches (1 worker)", "value": median["packed"], "target": "",
             "unit": "tokens/s"},
            {"metric": "loader, shards to masked MLM batches (1 worker)", "value": median["mlm"], "target": "",
             "unit": "tokens/s"},
            {"metric": "loader, two sources mixed 3:1 / one source (1 worker)", "value":
             median["mixed"] / median["packed"], "target": "", "unit": "x"},
            {"metric": "shard reader / webdataset + np.load, documents/s", "value":
             median["reader"] / median["webdataset_reader"], "target": "", "unit": "x"},
        ],
    }
    path = write_result("loader", result, quick)
    print(f"packed {median['packed']:,.0f} tokens/s, masked MLM {median['mlm']:,.0f} tokens/s (1 worker); "
          f"reader {median['reader']:,.0f} docs/s vs webdataset {median['webdataset_reader']:,.0f} docs/s -> {path}")
    return result


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
