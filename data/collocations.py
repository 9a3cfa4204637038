"""Collocations for the pmi masking policy: adjacent word pairs of high pointwise mutual information.

`masktrain data collocations CONFIG` counts words and adjacent word pairs over the train shards (words as the
masking code sees them: sentencepiece pieces grouped by the word-start marker, identified by a hash of their
pieces, never across a special token or a document boundary) and keeps the pairs seen at least `min_count`
times with the highest PMI = log p(a b) / (p(a) p(b)), as PMI-Masking (Levine et al., ICLR 2021) does for
n-grams. Longer collocations emerge when kept pairs overlap. The table is the sorted pair keys, int64, in
`<data.dir>/collocations.npy`, with a JSON record that shows the strongest pairs as text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from masktrain.data import tables
from masktrain.data.masking import Vocab, candidates, pair_keys, word_table
from masktrain.data.reader import DataError, Skips, Unit, expand_urls, read_unit

TABLE_NAME = "collocations.npy"
SHOWN = 20


def shard_rows(urls: list[str], vocab: Vocab, skips: Skips) -> Iterator[torch.Tensor]:
    """Each shard's documents as one row [1, N], every document followed by padding (a special token, so no
    word or pair spans two documents). Ids outside the vocabulary make a document a bad sample."""
    for url in expand_urls(urls):
        docs = [np.append(doc.astype(np.int64), vocab.pad_id) for doc in read_unit(Unit(url), skips, vocab.size)]
        if docs:
            yield torch.from_numpy(np.concatenate(docs)).unsqueeze(0)


def merge_counts(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One table {"keys": sorted unique, "counts", **values} from several; `values` (e.g. the two word hashes of
    a pair) depend only on the key."""
    keys = torch.cat([part["keys"] for part in parts])
    unique, inverse = torch.unique(keys, return_inverse=True)
    merged = {"keys": unique}
    for name in parts[0]:
        if name != "keys":
            column = torch.cat([part[name] for part in parts])
            target = torch.zeros_like(unique)
            merged[name] = target.scatter_add_(0, inverse, column) if name == "counts" else \
                target.scatter_(0, inverse, column)
    return merged


def occurrences(keys: torch.Tensor, **values: torch.Tensor) -> dict[str, torch.Tensor]:
    return merge_counts([{"keys": keys, "counts": torch.ones_like(keys), **values}])


def count(urls: list[str], vocab: Vocab, skips: Skips) -> tuple[dict, dict]:
    """(word totals, pair totals with the hashes of their two words) over the shards."""
    words: list[dict] = []
    pairs: list[dict] = []
    for row in shard_rows(urls, vocab, skips):
        _, hashes, real = word_table(row, vocab, candidates(row, vocab))
        both = real[:, :-1] & real[:, 1:]
        words.append(occurrences(hashes[real]))
        pairs.append(occurrences(pair_keys(hashes)[both], left=hashes[:, :-1][both], right=hashes[:, 1:][both]))
        # Merging in batches keeps the work near-linear in the shards, not quadratic.
        if len(pairs) == 32:
            words, pairs = [merge_counts(words)], [merge_counts(pairs)]
    if not pairs:
        raise DataError(f"no word pairs in {len(expand_urls(urls))} train shards "
                        f"(skipped: {dict(skips.counts) or 'none'})")
    return merge_counts(words), merge_counts(pairs)


def strongest(words: dict, pairs: dict, min_count: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair keys, PMI) of at most `keep` pairs seen >= `min_count` times with PMI > 0, strongest first."""
    often = pairs["counts"] >= min_count
    keys, joint = pairs["keys"][often], pairs["counts"][often].double()

    def word_count(hashes: torch.Tensor) -> torch.Tensor:
        return words["counts"][torch.searchsorted(words["keys"], hashes)].double()

    left, right = word_count(pairs["left"][often]), word_count(pairs["right"][often])
    n_words, n_pairs = words["counts"].sum().item(), pairs["counts"].sum().item()
    pmi = joint.log() - math.log(n_pairs) - left.log() - right.log() + 2 * math.log(n_words)
    order = pmi.argsort(descending=True)[:keep]
    order = order[pmi[order] > 0]
    return keys[order], pmi[order]


def examples(urls: list[str], vocab: Vocab, keys: torch.Tensor, decode: Callable[[list[int]], str],
             skips: Skips) -> dict[int, str]:
    """Text of the given pairs, from their first occurrence in the shards (read until all are found)."""
    wanted, found = set(keys.tolist()), {}
    for row in shard_rows(urls, vocab, skips):
        words, hashes, _ = word_table(row, vocab, candidates(row, vocab))
        row_keys = pair_keys(hashes)[0]
        for index in torch.isin(row_keys, torch.tensor(sorted(wanted - found.keys()))).nonzero().flatten().tolist():
            key = int(row_keys[index])
            if key not in found:
                found[key] = decode(row[0][(words[0] == index) | (words[0] == index + 1)].tolist())
        if len(found) == len(wanted):
            break
    return found


def build_table(urls: list[str], vocab: Vocab, decode: Callable[[list[int]], str], path: str | Path,
                min_count: int, keep: int, strict: bool = False, fingerprint: str = "") -> dict:
    """Count the shards, write the table of the strongest pairs to `path` (and `<path>.json`, what it was built
    from, with the strongest pairs as text and the tokenizer's `fingerprint`) under temporary names renamed into
    place; returns the record."""
    skips = Skips(strict)
    words, pairs = count(urls, vocab, skips)
    keys, pmi = strongest(words, pairs, min_count, keep)
    if len(keys) == 0:
        raise DataError(f"no word pair seen at least {min_count} times with PMI > 0 "
                        "(lower data.masking.collocation_min_count)")
    text = examples(urls, vocab, keys[:SHOWN], decode, Skips(strict=False))
    record = {"words": int(words["counts"].sum()), "distinct_words": len(words["keys"]),
              "pairs": int(pairs["counts"].sum()), "distinct_pairs": len(pairs["keys"]), "kept": len(keys),
              "min_count": min_count, "pmi_range": [float(pmi[-1]), float(pmi[0])], "skipped": dict(skips.counts),
              "shards": expand_urls(urls), "tokenizer_sha256": fingerprint or None,
              "strongest": [{"text": text.get(int(k), "?"), "pmi": round(float(v), 3)}
                            for k, v in zip(keys[:SHOWN], pmi[:SHOWN])]}
    tables.save(path, keys.sort().values.numpy(), record)
    return record


def load_table(path: str | Path, fingerprint: str = "") -> torch.Tensor:
    """The sorted pair keys at `path` (`fingerprint`: the run tokenizer's, see `tables.load`)."""
    keys = tables.load(path, "collocation table", "collocations", "data.masking.collocation_table", fingerprint)
    # Compared, not subtracted: keys are hashes over all of int64, and a difference of two can wrap around.
    if keys.dtype != np.int64 or keys.ndim != 1 or len(keys) == 0 or (keys[1:] <= keys[:-1]).any():
        raise ValueError(f"{path}: expected sorted, distinct int64 pair keys, got {keys.dtype} {keys.shape}")
    return torch.from_numpy(keys)


def build_for_config(cfg, log: Callable[[str], None] = print) -> Path:
    """`masktrain data collocations`: the table a run config reads, built from its train shards."""
    from masktrain.data.inputs import collocation_path, shard_urls, tokenizer_dir
    from masktrain.data.tokenizer import Tokenizer

    m = cfg.data.masking
    tokenizer = Tokenizer(tokenizer_dir(cfg))
    path = collocation_path(cfg)
    record = build_table(shard_urls(cfg, "train"), tokenizer.vocab(), tokenizer.decode, path,
                         m.collocation_min_count, m.collocation_pairs, cfg.data.strict, tokenizer.fingerprint())
    shown = ", ".join(repr(pair["text"].strip()) for pair in record["strongest"][:8])
    log(f"collocations: kept {record['kept']:,} of {record['distinct_pairs']:,} word pairs "
        f"({record['pairs']:,} seen; skipped: {record['skipped'] or 'none'}), strongest: {shown} -> {path}")
    return path
