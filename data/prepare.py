"""Raw text -> tokenizer -> shards: `masktrain data tokenizer`, `masktrain data shards` and, for one run
config, `masktrain data prepare` (both steps, skipped when already done).

The manifest records the settings it was built with and the sizes of the input files; a data folder prepared
differently, or from inputs that have changed since, is refused rather than silently reused.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from masktrain.data.corpus import BUILTIN, LONG_DOCUMENT_LINES, CorpusStats, InputError, documents, expand_inputs
from masktrain.data.files import fsync_path, read_json, write_json
from masktrain.data.inputs import other_tokenizer, tokenizer_dir
from masktrain.data.shards import (MANIFEST, SPLITS, STAGING, discard_staged, publish_dataset, read_manifest,
                                   tokenize_stream, write_dataset)
from masktrain.data.tokenizer import MODEL_FILE, Tokenizer, sample_documents, train_tokenizer
from masktrain.launcher.config import Config, PrepareConfig
from masktrain.launcher.loading import config_from_dict


def worker_count(requested: int) -> int:
    return requested or len(os.sched_getaffinity(0))


def command_config(prepare: dict, seed: int | None = None, strict: bool = False) -> Config:
    """A validated config holding the given `data.prepare` settings (None: the default), for the data
    commands that take them as flags; bad values raise ConfigError naming the keys."""
    raw = {"data": {"strict": strict, "prepare": {k: v for k, v in prepare.items() if v is not None}}}
    if seed is not None:
        raw["run"] = {"seed": seed}
    return config_from_dict(raw, "command line")


def skipped_text(stats: CorpusStats) -> str:
    return ", ".join(f"{n:,} {reason}" for reason, n in sorted(stats.skipped.items())) or "nothing"


def skipped_places(stats: CorpusStats) -> str:
    """Where the first document of each skipped kind was, so that a skip can be found without --strict."""
    return "; ".join(f"{reason} at {where}" for reason, where in sorted(stats.first.items()))


def log_reading_notes(stats: CorpusStats, log) -> None:
    """Also the files read as one very long document: plain text separates documents by blank lines, and a file
    of one document per line would otherwise go whole to train or to validation, unshuffled."""
    if stats.first:
        log(f"data: skipped, the first of each kind: {skipped_places(stats)}")
    if stats.long_documents:
        files = ", ".join(f"{path} ({lines:,} lines)" for path, lines in list(stats.long_documents.items())[:3])
        more = f" and {len(stats.long_documents) - 3} more" if len(stats.long_documents) > 3 else ""
        log(f"data: documents of more than {LONG_DOCUMENT_LINES:,} lines in {files}{more}: plain-text documents "
            "are separated by blank lines; for one document per line, write JSON lines (.jsonl)")


TOKENIZER_RECIPE = "recipe.json"
TOKENIZER_SETTINGS = ("inputs", "text_field", "max_docs", "vocab_size", "tokenizer_type", "tokenizer_sample_docs",
                      "tokenizer_sample_chars")
TRAINING_ONLY = ("vocab_size", "tokenizer_type", "tokenizer_sample_docs", "tokenizer_sample_chars")
"""Settings that reach the shards only through the tokenizer they train."""


def recipe(p: PrepareConfig, seed: int) -> dict:
    """What a prepared folder was built from, stored in its manifest: reuse needs the same (`recipe_changes`)."""
    return {"prepare": asdict(p), "seed": seed}


def recipe_changes(built: dict, wanted: dict, ignore: tuple[str, ...] = ()) -> str:
    """The settings that differ between two recipes, as 'key: built -> wanted'; not the thread count, which
    changes nothing in what is built, nor the `data.prepare` fields in `ignore`. A setting the built recipe
    lacks, added to masktrain since, counts as its default."""
    defaults = {k: v for k, v in asdict(PrepareConfig()).items() if k in wanted["prepare"]}
    old = {**{f"data.prepare.{k}": v for k, v in {**defaults, **built.get("prepare", {})}.items()},
           "run.seed": built.get("seed")}
    new = {**{f"data.prepare.{k}": v for k, v in wanted["prepare"].items()}, "run.seed": wanted["seed"]}
    skip = {f"data.prepare.{key}" for key in ("workers", *ignore)}
    return ", ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
                     if old.get(key) != new.get(key) and key not in skip)


UNREADABLE = "unreadable"


def input_sizes(inputs: list[str]) -> dict[str, int | str | None]:
    """Each input file's size in bytes (None for the built-in text, "unreadable" for a file this user may not
    read or a broken link), recorded so that a folder is not reused for inputs that have since grown, shrunk,
    gained or lost files, or become readable. Sizes rather than times: a copy or a touch leaves the text as it
    was."""
    return {path: None if path == BUILTIN else os.path.getsize(path) if os.access(path, os.R_OK) else UNREADABLE
            for path in expand_inputs(inputs)}


def refuse_output_in_inputs(out_dir: str | Path, inputs: list[str], written: list[Path] | None = None) -> None:
    """Raise InputError when `out_dir` lies in an input folder, or an input lies in what is written there
    (`written`; default: all of `out_dir`): the tokenizer's and the manifest's JSON written there were read back
    as documents (skipped by the thousand as invalid JSON), and the next prepare found them new inputs and
    refused the folder for good. Inputs beside what is written (`data.dir/raw`) are no such thing."""
    # realpath, not resolve: a link loop is left to `expand_inputs` to name, where resolve raised a RuntimeError.
    out = Path(os.path.realpath(out_dir))
    outputs = [Path(os.path.realpath(path)) for path in written or [out]]
    for item in inputs:
        for path in [] if item == BUILTIN else [item] if Path(item).exists() else glob.glob(item, recursive=True):
            real = Path(os.path.realpath(path))
            if real.is_dir() and out.is_relative_to(real):
                raise InputError(f"{out_dir}: inside the input {item}, which would read what is written there as "
                                 "documents; write it outside the inputs")
            if inside := next((output for output in outputs if real.is_relative_to(output)), None):
                raise InputError(f"{item}: {path} lies in {inside}, which prepare writes, and would be read as "
                                 "documents; keep the inputs out of it")


def shard_outputs(out_dir: str | Path) -> list[Path]:
    """What writing shards into `out_dir` writes there."""
    return [Path(out_dir) / name for name in (*SPLITS, MANIFEST)]


def input_changes(built: dict[str, int | str | None], now: dict[str, int | str | None]) -> str:
    """How the input files differ from the recorded ones, as 'path: what' (the first three, and a count)."""
    def change(path: str) -> str:
        if path not in built:
            return f"{path}: new"
        if path not in now:
            return f"{path}: gone"
        if UNREADABLE in (built[path], now[path]):
            sizes = (f"{v:,} bytes" if isinstance(v, int) else v for v in (built[path], now[path]))
            return f"{path}: " + " -> ".join(sizes)
        return f"{path}: {built[path]:,} -> {now[path]:,} bytes"

    changes = [change(path) for path in sorted(set(built) | set(now)) if built.get(path, -1) != now.get(path, -1)]
    more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
    return "; ".join(changes[:3]) + more


def tokenizer_recipe(p: PrepareConfig, seed: int) -> dict:
    """The part of `recipe` a tokenizer depends on, stored beside it."""
    return {"prepare": {key: getattr(p, key) for key in TOKENIZER_SETTINGS}, "seed": seed}


def input_documents(p: PrepareConfig, strict: bool) -> tuple[Iterator[str], CorpusStats]:
    """The documents of `p.inputs` (at most p.max_docs), with the stats that count them as they are read."""
    stats = CorpusStats()
    # The first max_docs documents (a trial on part of a large corpus) need no .gz decompressed to its end first.
    docs = documents(p.inputs, p.text_field, strict, stats, check_gz=not p.max_docs)
    return itertools.islice(docs, p.max_docs or None), stats


def no_documents(p: PrepareConfig, stats: CorpusStats) -> InputError:
    places = f"; first of each: {skipped_places(stats)}" if stats.first else ""
    return InputError(f"{', '.join(p.inputs)}: no documents to train on (read {stats.documents:,}, skipped "
                      f"{skipped_text(stats)}{places})")


def build_tokenizer(p: PrepareConfig, out_dir: str | Path, seed: int, strict: bool = False,
                    template: str | None = None, log=print) -> Tokenizer:
    """Train on `p.inputs` and write `<out_dir>/spm.model` plus the Hugging Face files and the recipe."""
    started = time.perf_counter()
    sizes = input_sizes(p.inputs)  # before reading: what was read is at most this
    docs, stats = input_documents(p, strict)
    sample = sample_documents(docs, p.tokenizer_sample_docs, seed, p.tokenizer_sample_chars)
    if not sample:  # sentencepiece's own message would say nothing of where the text came from
        raise no_documents(p, stats)
    staging = Path(out_dir) / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # a write that died before
    try:
        train_tokenizer(sample, staging, p.vocab_size, p.tokenizer_type, seed)
        Tokenizer(staging).save_hf(staging, template)
        write_json(staging / TOKENIZER_RECIPE, {**tokenizer_recipe(p, seed), "input_sizes": sizes})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_tokenizer(staging, Path(out_dir))
    tokenizer = Tokenizer(out_dir)
    log(f"data: trained a {len(tokenizer)}-piece {p.tokenizer_type} tokenizer on {len(sample):,} of "
        f"{stats.documents:,} documents in {time.perf_counter() - started:.1f}s (skipped {skipped_text(stats)}) "
        f"-> {out_dir}")
    log_reading_notes(stats, log)
    return tokenizer


def publish_tokenizer(staging: Path, out_dir: Path) -> None:
    """Move a staged tokenizer's files into `out_dir`, the model last, after taking out the earlier one: prepare
    reuses a folder's model by the recipe beside it, and a prepare killed between writing the two left a model
    without one, which the next prepare reused for any settings and inputs."""
    # Each file's bytes, and each rename, reach the disk in this order too: a power loss must not keep the old
    # model beside the new recipe, nor a new model whose bytes were lost.
    (out_dir / MODEL_FILE).unlink(missing_ok=True)
    fsync_path(out_dir)
    for path in sorted(staging.iterdir(), key=lambda path: path.name == MODEL_FILE):
        fsync_path(path)
        path.replace(out_dir / path.name)
        fsync_path(out_dir)
    staging.rmdir()


def build_shards(p: PrepareConfig, tokenizer_path: str | Path, out_dir: str | Path, seed: int,
                 strict: bool = False, log=print) -> dict:
    """Tokenize `p.inputs` into train/val shards under `out_dir` with a manifest; returns the manifest."""
    started = time.perf_counter()
    tokenizer = Tokenizer(tokenizer_path)
    sizes = input_sizes(p.inputs)  # before reading: what was read is at most this
    docs, stats = input_documents(p, strict)
    # disable=None: a progress bar on a terminal, nothing in logs and pipes.
    with tqdm(docs, desc="tokenizing", unit=" docs", disable=None, mininterval=1.0) as progress:
        manifest = write_dataset(tokenize_stream(progress, tokenizer, worker_count(p.workers)), out_dir,
                                 len(tokenizer), p.shard_bytes, p.val_fraction, p.shuffle_buffer, seed)
    if manifest["splits"]["train"]["documents"] == 0:  # the folder keeps what it had
        discard_staged(out_dir)
        if documents := manifest["splits"]["val"]["documents"]:
            raise InputError(f"{', '.join(p.inputs)}: no documents to train on: all {documents:,} went to validation "
                             f"(data.prepare.val_fraction={p.val_fraction})")
        raise no_documents(p, stats)
    manifest.update(recipe=recipe(p, seed), tokenizer=str(tokenizer_path), tokenizer_sha256=tokenizer.fingerprint(),
                    input_documents=stats.documents, input_skipped=dict(stats.skipped), input_sizes=sizes)
    publish_dataset(out_dir, manifest)
    splits = manifest["splits"]
    log(f"data: {stats.documents:,} documents (skipped {skipped_text(stats)}) -> "
        f"{len(splits['train']['shards'])} train shards ({splits['train']['tokens']:,} tokens), "
        f"{len(splits['val']['shards'])} val shards ({splits['val']['tokens']:,} tokens) "
        f"in {time.perf_counter() - started:.1f}s -> {out_dir}")
    log_reading_notes(stats, log)
    return manifest


def changed_inputs(manifest: dict | None, inputs: list[str]) -> str:
    """How `inputs` changed since `manifest` (or a tokenizer's recipe) was written; '' when they did not, or
    cannot be compared: folders written before sizes were recorded. An input removed once sharded is no change
    (the shards are what training reads), but the others are still compared."""
    if (built := (manifest or {}).get("input_sizes")) is None:
        return ""
    present = [item for item in inputs if names_a_file(item)]
    if not present:
        return ""
    # Sized together, as when recorded: expand_inputs drops a file named twice (a folder and a file in it).
    now = input_sizes(present)
    if len(present) < len(inputs):  # which recorded files were a removed input's is not known: none is gone
        built = {path: size for path, size in built.items() if path in now}
    return input_changes(built, now)


def names_a_file(item: str) -> bool:
    try:
        expand_inputs([item])
    except InputError:
        return False
    return True


def prepare(cfg: Config, log=print) -> dict:
    """Build what is missing (tokenizer, shards) for a run config and return the manifest."""
    p = cfg.data.prepare
    root = Path(cfg.data.dir)
    tok_dir = tokenizer_dir(cfg)
    # Once, for the tokenizer and the shards both, before the reuse checks (which would name its own files); the
    # `data tokenizer` and `data shards` commands check their own outputs.
    refuse_output_in_inputs(root, p.inputs, [*shard_outputs(root), tok_dir])
    has_tokenizer = (tok_dir / MODEL_FILE).is_file()
    if (root / MANIFEST).is_file():
        manifest = read_manifest(root)
        # With data.tokenizer the shards' tokenizer is compared by fingerprint below, so the settings that only
        # train one (`data shards --tokenizer` records their defaults) say nothing about the shards.
        ignore = TRAINING_ONLY if cfg.data.tokenizer else ()
        if changes := recipe_changes(manifest.get("recipe") or {}, recipe(p, cfg.run.seed), ignore):
            raise SystemExit(f"{root}: prepared with other data.prepare settings ({changes}); remove the folder "
                             "or choose another data.dir")
        if changes := changed_inputs(manifest, p.inputs):
            raise SystemExit(f"{root}: prepared from other input files than there are now ({changes}); remove "
                             "the folder or choose another data.dir")
        if not has_tokenizer:
            raise SystemExit(f"{tok_dir / MODEL_FILE}: missing, and the shards in {root} were written with it; "
                             f"restore it, or remove {root} to prepare again")
        if mismatch := other_tokenizer(manifest, Tokenizer(tok_dir), root):
            raise SystemExit(mismatch)
        log(f"data: reusing {root} ({manifest['splits']['train']['tokens']:,} train tokens)")
        return manifest
    if not has_tokenizer and cfg.data.tokenizer:  # a tokenizer to use as it is: a mistyped path must not train one
        raise SystemExit(f"{tok_dir / MODEL_FILE}: missing (data.tokenizer); train one there with `masktrain data "
                         f"tokenizer INPUTS --out {tok_dir}`, or leave data.tokenizer empty for prepare to train one "
                         f"in {root / 'tokenizer'}")
    if not has_tokenizer:
        build_tokenizer(p, tok_dir, cfg.run.seed, cfg.data.strict, log=log)
    elif not cfg.data.tokenizer:  # prepare's own tokenizer, left by a prepare that did not finish
        made_for = read_json(tok_dir / TOKENIZER_RECIPE)
        if made_for is not None and (changes := recipe_changes(made_for, tokenizer_recipe(p, cfg.run.seed))):
            raise SystemExit(f"{tok_dir}: a tokenizer trained with other data.prepare settings ({changes}); remove "
                             "it, or set data.tokenizer to use it as it is")
        if changes := changed_inputs(made_for, p.inputs):
            raise SystemExit(f"{tok_dir}: a tokenizer trained on other input files than there are now ({changes}); "
                             "remove it, or set data.tokenizer to use it as it is")
        log(f"data: reusing the tokenizer in {tok_dir}")
    else:
        log(f"data: using the tokenizer in {tok_dir} (data.tokenizer)")
    return build_shards(p, tok_dir, root, cfg.run.seed, cfg.data.strict, log=log)
