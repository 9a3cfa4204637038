"""`masktrain data prepare`: raw text -> tokenizer -> shards for one run config, skipped when already done.

The manifest records the settings it was built with; a data folder prepared differently is refused rather
than silently reused.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import asdict
from pathlib import Path

from masktrain.data.corpus import CorpusStats, documents
from masktrain.data.inputs import tokenizer_dir
from masktrain.data.shards import MANIFEST, read_manifest, tokenize_stream, write_dataset
from masktrain.data.tokenizer import MODEL_FILE, Tokenizer, train_tokenizer
from masktrain.launcher.config import Config


def worker_count(requested: int) -> int:
    return requested or len(os.sched_getaffinity(0))


def prepare(cfg: Config, log=print) -> dict:
    """Build what is missing (tokenizer, shards) and return the manifest."""
    p = cfg.data.prepare
    root = Path(cfg.data.dir)
    recipe = {"prepare": asdict(p), "seed": cfg.run.seed}
    if (root / MANIFEST).is_file():
        manifest = read_manifest(root)
        if manifest.get("recipe") != recipe:
            raise SystemExit(f"{root}: prepared with other data.prepare settings; remove the folder or "
                             "choose another data.dir")
        log(f"data: reusing {root} ({manifest['splits']['train']['tokens']:,} train tokens)")
        return manifest

    threads = worker_count(p.workers)
    tok_dir = tokenizer_dir(cfg)
    started = time.perf_counter()
    if not (tok_dir / MODEL_FILE).is_file():
        docs = itertools.islice(documents(p.inputs, p.text_field), p.max_docs or None)
        train_tokenizer(docs, tok_dir, p.vocab_size, p.tokenizer_type, p.tokenizer_sample_docs, cfg.run.seed,
                        threads)
        Tokenizer(tok_dir).save_hf(tok_dir)
        log(f"data: trained a {p.vocab_size}-piece {p.tokenizer_type} tokenizer in "
            f"{time.perf_counter() - started:.1f}s -> {tok_dir}")
    tokenizer = Tokenizer(tok_dir)

    started = time.perf_counter()
    stats = CorpusStats()
    docs = itertools.islice(documents(p.inputs, p.text_field, cfg.data.strict, stats), p.max_docs or None)
    manifest = write_dataset(tokenize_stream(docs, tokenizer, threads=threads), root, len(tokenizer),
                             p.shard_bytes, p.val_fraction,
                             extra={"recipe": recipe, "tokenizer": str(tok_dir), "input_skipped": dict(stats.skipped)})
    splits = manifest["splits"]
    log(f"data: {stats.documents:,} documents -> {len(splits['train']['shards'])} train shards "
        f"({splits['train']['tokens']:,} tokens), {len(splits['val']['shards'])} val shards "
        f"({splits['val']['tokens']:,} tokens) in {time.perf_counter() - started:.1f}s -> {root}")
    return manifest
