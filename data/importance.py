"""Term importance for the importance masking policy: inverse document frequency over the train shards.

`masktrain data importance CONFIG` counts, for every token id, the training documents that contain it and
writes idf = ln((1 + documents) / (1 + document frequency)) + 1 (the smoothed IDF of scikit-learn: every id gets
a weight >= 1, unseen ids the largest) as float32[vocab] to `<data.dir>/idf.npy`, with a JSON record of what it
was built from. Masking rare, informative terms more often is the idea of retrieval-oriented masking (ROM,
Long et al. 2022), which weights selection by term importance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from masktrain.data import tables
from masktrain.data.reader import DataError, Skips, Unit, expand_urls, read_unit

TABLE_NAME = "idf.npy"


def document_frequencies(urls: list[str], vocab_size: int, skips: Skips) -> tuple[np.ndarray, int, int]:
    """(documents containing each id as int64[vocab_size], documents, tokens) over the shards."""
    frequencies = np.zeros(vocab_size, dtype=np.int64)
    documents = tokens = 0
    for url in expand_urls(urls):
        docs = list(read_unit(Unit(url), skips, vocab_size))  # ids outside the tokenizer's: a bad sample
        if not docs:
            continue
        lengths = np.array([len(doc) for doc in docs])
        ids = np.concatenate(docs).astype(np.int64)
        # One (document, id) pair per occurrence; unique pairs count each id once per document.
        pairs = np.unique(np.repeat(np.arange(len(docs), dtype=np.int64), lengths) * vocab_size + ids)
        frequencies += np.bincount(pairs % vocab_size, minlength=vocab_size)
        documents += len(docs)
        tokens += len(ids)
    return frequencies, documents, tokens


def idf(frequencies: np.ndarray, documents: int) -> np.ndarray:
    """Smoothed inverse document frequency, float32, every value >= 1."""
    return (np.log((1.0 + documents) / (1.0 + frequencies)) + 1.0).astype(np.float32)


def build_table(urls: list[str], vocab_size: int, path: str | Path, strict: bool = False,
                fingerprint: str = "") -> dict:
    """Count the shards and write the IDF table to `path` (`tables.save`); returns the record of what it was
    built from (`fingerprint`: the tokenizer's, which `load_table` compares)."""
    skips = Skips(strict)
    frequencies, documents, tokens = document_frequencies(urls, vocab_size, skips)
    if documents == 0:
        raise DataError(f"no readable document in {len(expand_urls(urls))} train shards "
                        f"(skipped: {dict(skips.counts) or 'none'})")
    record = {"documents": documents, "tokens": tokens, "vocab_size": vocab_size, "shards": expand_urls(urls),
              "skipped": dict(skips.counts), "formula": "ln((1 + documents) / (1 + df)) + 1",
              "tokenizer_sha256": fingerprint or None}
    tables.save(path, idf(frequencies, documents), record)
    return record


def load_table(path: str | Path, vocab_size: int, fingerprint: str = "") -> torch.Tensor:
    """The table at `path` as float32[vocab_size], checked against the tokenizer it must match."""
    table = tables.load(path, "importance table", "importance", "data.masking.importance_table", fingerprint)
    if table.shape != (vocab_size,):
        raise ValueError(f"{path}: holds {table.shape} values, the tokenizer has {vocab_size} ids "
                         "(built for another tokenizer? rebuild with `masktrain data importance CONFIG`)")
    if table.dtype.kind not in "iuf" or not np.isfinite(table).all() or (table < 0).any():
        raise ValueError(f"{path}: importance weights must be finite real numbers >= 0 ({table.dtype} here)")
    return torch.from_numpy(table.astype(np.float32))


def build_for_config(cfg, log: Callable[[str], None] = print) -> Path:
    """`masktrain data importance`: the table a run config reads, built from its train shards."""
    from masktrain.data.inputs import importance_path, shard_urls, tokenizer_dir
    from masktrain.data.tokenizer import Tokenizer

    path = importance_path(cfg)
    tokenizer = Tokenizer(tokenizer_dir(cfg))
    record = build_table(shard_urls(cfg, "train"), len(tokenizer), path, cfg.data.strict, tokenizer.fingerprint())
    log(f"importance: IDF over {record['documents']:,} documents ({record['tokens']:,} tokens, skipped: "
        f"{record['skipped'] or 'none'}) -> {path}")
    return path
