"""Shard writing throughput, and whether parallel tokenization needs more than sentencepiece's own threads.

Side by side in one process, alternating between variants, on the same JSON-lines corpus, each writing the
same shards with `write_dataset` and `publish_dataset`:
- `inline_1_thread`: each batch encoded in turn on 1 sentencepiece thread (no parallelism at all);
- `inline_sp_threads`: the same on sentencepiece's thread pool, one thread per core;
- `pipelined_sp_threads`: `tokenize_stream` as `masktrain data shards` runs it: sentencepiece's threads
  encode the next batch in the background while this process writes the previous one;
- `process_pool`: one process per core, each encoding whole batches with its own sentencepiece, results
  returned in order to the process that writes the shards;
- `encode_only`: sentencepiece alone on all cores, no reading or writing: the ceiling for encoding.

Run: `.venv/bin/python -m benchmarks.bench_shards` (`--quick` for a short run).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np

from benchmarks.common import interleaved, write_result
from masktrain.data.corpus import documents
from masktrain.data.shards import publish_dataset, tokenize_stream, write_dataset
from masktrain.data.tokenizer import Tokenizer, train_tokenizer

BATCH_DOCS = 1024
worker_tokenizer: Tokenizer | None = None


def write_corpus(path: Path, documents_wanted: int) -> int:
    """JSON lines of ~2.5 KB documents (8 paragraphs of Python's documentation each); returns its bytes."""
    paragraphs = [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.strip()) > 40]
    rng = np.random.default_rng(0)
    with path.open("w") as out:
        for _ in range(documents_wanted):
            out.write(json.dumps({"text": "\n\n".join(rng.choice(paragraphs, 8))}) + "\n")
    return path.stat().st_size


def build(tokenizer: Tokenizer, out: Path, pairs) -> None:
    shutil.rmtree(out, ignore_errors=True)
    publish_dataset(out, write_dataset(pairs, out, len(tokenizer), shard_bytes=16 * 2**20, val_fraction=0.01,
                                       shuffle_buffer=10_000))


def start_worker(tokenizer_dir: str) -> None:
    global worker_tokenizer
    worker_tokenizer = Tokenizer(tokenizer_dir)


def encode_in_worker(texts: list[str]) -> list[tuple[str, np.ndarray]]:
    return list(zip(texts, worker_tokenizer.encode(texts)))


def batches(corpus: Path):
    docs = documents([str(corpus)])
    while batch := list(itertools.islice(docs, BATCH_DOCS)):
        yield batch


def inline_pairs(corpus: Path, tokenizer: Tokenizer, threads: int):
    for batch in batches(corpus):
        yield from zip(batch, tokenizer.encode(batch, threads))


def pool_pairs(pool, corpus: Path):
    for pairs in pool.imap(encode_in_worker, batches(corpus)):
        yield from pairs


def main(quick: bool = False) -> dict:
    cores = len(os.sched_getaffinity(0))
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "corpus.jsonl"
        size = write_corpus(corpus, 1_500 if quick else 8_000)
        train_tokenizer(topics.values(), root / "tok", vocab_size=4000)
        tokenizer = Tokenizer(root / "tok")
        texts = list(documents([str(corpus)]))
        with multiprocessing.get_context("fork").Pool(cores, start_worker, (str(root / "tok"),)) as pool:
            variants = {
                "inline_1_thread": lambda: build(tokenizer, root / "out", inline_pairs(corpus, tokenizer, 1)),
                "inline_sp_threads": lambda: build(tokenizer, root / "out", inline_pairs(corpus, tokenizer, cores)),
                "pipelined_sp_threads": lambda: build(tokenizer, root / "out",
                                                      tokenize_stream(documents([str(corpus)]), tokenizer, cores)),
                "process_pool": lambda: build(tokenizer, root / "out", pool_pairs(pool, corpus)),
                "encode_only": lambda: tokenizer.encode(texts, threads=cores),
            }
            median = interleaved(variants, repeats)
    result = {
        "setup": {"corpus_bytes": size, "documents": len(texts), "cores": cores, "repeats": repeats,
                  "vocab_size": 4000, "batch_docs": BATCH_DOCS},
        "mb_per_s": {name: round(size / 1e6 / median[name], 2) for name in variants},
        "speedup_vs_inline_1_thread": {name: round(median["inline_1_thread"] / median[name], 3) for name in variants},
        "median_seconds": {name: round(value, 3) for name, value in median.items()},
        "summary": [
            {"metric": f"text to shards, as `masktrain data shards` does it ({cores} cores)",
             "value": size / 1e6 / median["pipelined_sp_threads"], "target": "", "unit": "MB/s"},
            {"metric": "pipelined / inline single-thread tokenization, text to shards",
             "value": median["inline_1_thread"] / median["pipelined_sp_threads"], "target": "", "unit": "x"},
        ],
    }
    path = write_result("shards", result, quick)
    print(", ".join(f"{name} {mb:.1f} MB/s" for name, mb in result["mb_per_s"].items()) + f" ({cores} cores) -> {path}")
    return result


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
