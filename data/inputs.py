"""A run's inputs from its config: where the data is, how documents are packed, the training loader and the
validation batches of one rank."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections import Counter
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from masktrain.data import collocations, importance
from masktrain.data.batches import MaskSpec
from masktrain.data.corpus import InputError
from masktrain.data.loader import Batcher, Loader, LoaderSpec, Packing, Source
from masktrain.data.masking import POLICIES, PolicyOptions, generator
from masktrain.data.reader import DataError, Skips, expand_urls
from masktrain.data.schedules import rate_schedule
from masktrain.data.shards import SPLITS, manifest_urls, read_manifest, shard_paths
from masktrain.data.tokenizer import Tokenizer
from masktrain.data.validation import validation_batches
from masktrain.launcher.config import Config
from masktrain.trainer.objectives import OBJECTIVES


def tokenizer_dir(cfg: Config) -> Path:
    return Path(cfg.data.tokenizer or Path(cfg.data.dir) / "tokenizer")


def from_manifest(cfg: Config, split: str) -> bool:
    """Whether a split's shards are data.dir's manifest's: not when the config lists them or trains on a
    mixture, and training shards given without validation shards mean no validation, not data.dir's."""
    if split == "train":
        return not (cfg.data.train_shards or cfg.data.mixture)
    return not (cfg.data.val_shards or cfg.data.train_shards)


def shard_urls(cfg: Config, split: str) -> list[str]:
    """A split's shards: the config's list, else the manifest's (see `from_manifest`); a mixture's train
    shards are all its sources'."""
    if split == "train" and cfg.data.mixture:
        return [url for source in train_sources(cfg) for url in source.urls]
    if from_manifest(cfg, split):
        return manifest_urls(cfg.data.dir, split)
    return cfg.data.train_shards if split == "train" else cfg.data.val_shards


def manifest_shards(cfg: Config, split: str) -> list[dict] | None:
    """data.dir's manifest's record of a split's shards (paths, documents, tokens, bytes) when the shards come
    from it, else None."""
    return read_manifest(cfg.data.dir)["splits"][split]["shards"] if from_manifest(cfg, split) else None


def contents_digest(record: list[dict] | None) -> str:
    """A digest of a manifest's record of shards, or "" without one: two corpora prepared alike name their
    shards alike. Their sha256 is left out: manifests before it was recorded gave the same shards another
    digest, and a run resumed on the same data prepared again would have been refused."""
    if record is None:
        return ""
    counts = [{key: value for key, value in shard.items() if key != "sha256"} for shard in record]
    return hashlib.sha256(json.dumps(counts, sort_keys=True).encode()).hexdigest()[:16]


def shard_contents(cfg: Config, split: str) -> str:
    return contents_digest(manifest_shards(cfg, split))


def train_sources(cfg: Config) -> list[Source]:
    """What the training loader reads: data.dir's train split (or data.train_shards), or the mixture's."""
    if not cfg.data.mixture:
        return [Source(shard_urls(cfg, "train"), contents=shard_contents(cfg, "train"))]
    return [Source(source.shards if shards is None else shard_paths(source.dir, shards), source.weight,
                   contents_digest(shards), name=label)
            for source, shards, label in zip(cfg.data.mixture, train_manifests(cfg), source_labels(cfg))]


def train_manifests(cfg: Config) -> list[list[dict] | None]:
    """Per training source, its manifest's record of the shards (None: listed by URL, in data.train_shards or a
    mixture source's `shards`)."""
    if not cfg.data.mixture:
        return [manifest_shards(cfg, "train")]
    return [read_manifest(source.dir)["splits"]["train"]["shards"] if source.dir else None
            for source in cfg.data.mixture]


def source_labels(cfg: Config) -> list[str]:
    """What the log calls each mixture source: its name, else its folder as written, else source<i>."""
    return [source.name or source.dir or f"source{index}" for index, source in enumerate(cfg.data.mixture)]


def check_ready(cfg: Config, tokenizer: Tokenizer | None = None, training: bool = True) -> None:
    """Raise DataError naming what is missing or mismatched (tokenizer, shards, the masking policy's table) and
    how to make it: run by launchers before any rank starts, where it is one message instead of a traceback per
    rank. `tokenizer`: the one the shards must match (default: the config's); `training=False` checks only
    what validation reads."""
    problems = []
    try:
        tokenizer = tokenizer or Tokenizer(tokenizer_dir(cfg))
    except (OSError, InputError) as err:
        raise DataError(f"tokenizer: {err}") from None
    # Each list of shards read: (what it is called, its split, how to get its URLs, what says it is empty).
    lists = []
    for split in ("train", "val") if training else ("val",):
        if split == "train" and cfg.data.mixture:
            for index, (source, label) in enumerate(zip(cfg.data.mixture, source_labels(cfg))):
                if source.dir:
                    lists.append((f"train shards of {label}", split, partial(manifest_urls, source.dir, split),
                                  f"no train shards in {source.dir}: its manifest lists none"))
                else:
                    lists.append((f"train shards of {label}", split, partial(list, source.shards),
                                  f"no train shards in data.mixture[{index}].shards"))
        else:
            lists.append((f"{split} shards", split, partial(shard_urls, cfg, split),
                          f"no {split} shards (data.{split}_shards, or the manifest in data.dir)"))
    # Training validates on the other folders' own splits too, which may be empty.
    def val_urls(folder: str) -> list[str]:
        with contextlib.suppress(OSError, DataError):  # a manifest that cannot be read is reported for its train split
            return manifest_urls(folder, "val")
        return []

    lists += [(f"val shards of {folder}", "val", partial(val_urls, folder), "")
              for folder in (other_folders(cfg) if training else ())]
    lists += [(f"val shards of {label}", "val", partial(list, source.val_shards), "")
              for source, label in zip(cfg.data.mixture if training else (), source_labels(cfg)) if source.val_shards]
    local = []  # the shards read from this machine's file systems
    for what, split, urls_of, empty in lists:
        try:
            urls = expand_urls(urls_of())
        except (OSError, ValueError, KeyError, DataError) as err:
            problems.append(f"{what}: {err}")
            continue
        if "" in urls:  # Path("") is the working folder, which exists
            problems.append(f"{what}: an empty URL in the list")
        paths = [url for url in urls if url and not url.startswith("pipe:") and "://" not in url]
        local += paths
        absent = [url for url in paths if not Path(url).exists()]
        if not urls and (split == "train" or not training):  # without validation shards, training has none
            problems.append(empty)
        if absent:
            problems.append(f"{what} missing: {', '.join(absent[:3])}" + (" ..." if len(absent) > 3 else ""))
    # Each folder whose manifest lists shards the run reads, with the splits it reads from there.
    folders = {cfg.data.dir: tuple(split for split in (("train", "val") if training else ("val",))
                                   if from_manifest(cfg, split))} if not cfg.data.train_shards else {}
    for source in cfg.data.mixture if training else ():
        if source.dir:
            folders[source.dir] = (*folders.get(source.dir, ()), "train")
    for folder in other_folders(cfg) if training else ():
        folders[folder] = (*folders[folder], "val")
    for folder, read in folders.items():
        try:
            manifest = read_manifest(folder)
        except (OSError, DataError):
            manifest = {}  # reported above
        if mismatch := other_tokenizer(manifest, tokenizer, folder):
            problems.append(mismatch)
        if resized := resized_shards(folder, manifest, read):
            said = (f"{len(resized)} shard(s) in {folder} differ in size from what its manifest records, e.g. "
                    f"{resized[0]}: cut short or changed since they were written (`masktrain data verify "
                    f"{folder}` checks their bytes too)")
            if cfg.data.strict:
                problems.append(said)
            else:
                print(f"masktrain: {said}; what cannot be read is skipped and counted (data.strict=true refuses "
                      "instead)", file=sys.stderr)
    # Shards listed by path (data.*_shards, a mixture source's shards) that a prepared folder's manifest records:
    # it tells their tokenizer, as it does for the folders named above.
    for folder, manifest in prepared_folders(local, {Path(folder).resolve() for folder in folders}).items():
        if mismatch := other_tokenizer(manifest, tokenizer, folder):
            problems.append(mismatch)
    policies = (cfg.data.masking.policy,) if training else ()
    for policy in dict.fromkeys((*policies, cfg.data.masking.eval_policy or cfg.data.masking.policy)):
        try:
            spec = mask_spec(cfg, tokenizer, policy)
        except (OSError, ValueError) as err:
            problems.append(str(err))
            continue
        if spec.policy not in POLICIES and (failure := try_policy(spec, packing(cfg, tokenizer,
                                                                               OBJECTIVES[cfg.model.objective].encoder))):
            problems.append(failure)
    if problems:
        raise DataError("the run's data is not ready:\n" + "\n".join(f"  - {p}" for p in problems))


def try_policy(spec: MaskSpec, pack: Packing) -> str | None:
    """Why a masking policy of the researcher's own fails on a small batch, or None: said once before any rank
    starts, rather than as a traceback in every loader worker."""
    row = torch.cat([torch.tensor([pack.start_id]), spec.vocab.regular_ids[:62], torch.tensor([pack.end_id])])
    try:
        spec.select(torch.stack([row, row.flip(0)]), 0.5, generator(0))
    except Exception as err:  # the researcher's code: whatever it raises is the reason
        return f"masking policy {spec.policy!r} fails on a batch of 2 rows: {type(err).__name__}: {err}"
    return None


def prepared_folders(paths: list[str], checked: set[Path]) -> dict[Path, dict]:
    """{folder: its manifest} of the prepared folders other than `checked` whose manifests record any of the
    shard `paths` (laid out as `write_dataset` does: <folder>/<split>/<shard>)."""
    seen: dict[Path, tuple[dict, set[str]] | None] = dict.fromkeys(checked)
    found = {}
    for path in (Path(url).resolve() for url in paths):
        folder = path.parent.parent
        if folder not in seen:
            seen[folder] = recorded_shards(folder)
        if (known := seen[folder]) and path.relative_to(folder).as_posix() in known[1]:
            found[folder] = known[0]
    return found


def recorded_shards(folder: Path) -> tuple[dict, set[str]] | None:
    """A folder's manifest and the shard paths it records, or None where it has no readable one."""
    try:
        manifest = read_manifest(folder)
    except (OSError, DataError):
        return None
    return manifest, {shard["path"] for split in SPLITS for shard in manifest["splits"][split]["shards"]}


def resized_shards(data_dir: str | Path, manifest: dict, splits: tuple[str, ...]) -> list[str]:
    """The shards of `splits` present in `data_dir` whose size is not the manifest's: a stat each, before any
    rank starts, finds a copy cut short."""
    found = []
    for split in splits:
        for shard in manifest.get("splits", {}).get(split, {}).get("shards", []):
            path = Path(data_dir) / shard["path"]
            with contextlib.suppress(OSError):  # absent: reported as missing
                if "bytes" in shard and (size := path.stat().st_size) != shard["bytes"]:
                    found.append(f"{path} ({size:,} bytes, {shard['bytes']:,} recorded)")
    return found


def other_tokenizer(manifest: dict, tokenizer: Tokenizer, data_dir: str | Path) -> str | None:
    """Why the shards of `manifest` were not written with `tokenizer`, or None when they were (or it can't tell:
    manifests before the fingerprint record only the vocabulary size)."""
    size, fingerprint, actual = manifest.get("vocab_size"), manifest.get("tokenizer_sha256"), tokenizer.fingerprint()
    if size not in (None, len(tokenizer)):
        return (f"the shards in {data_dir} were written with a {size}-id tokenizer, {tokenizer.dir} has "
                f"{len(tokenizer)} ids: the ids would mean other tokens")
    if fingerprint not in (None, actual):
        return (f"the shards in {data_dir} were written with another tokenizer than {tokenizer.dir} (sha256 "
                f"{fingerprint[:12]}, not {actual[:12]}): the ids would mean other tokens")
    return None


def packing(cfg: Config, tokenizer: Tokenizer, encoder: bool) -> Packing:
    if encoder:
        return Packing(cfg.data.seq_len, tokenizer.cls_id, tokenizer.sep_id)
    return Packing(cfg.data.seq_len, tokenizer.bos_id, tokenizer.eos_id)


def importance_path(cfg: Config) -> Path:
    return Path(cfg.data.masking.importance_table or Path(cfg.data.dir) / importance.TABLE_NAME)


def collocation_path(cfg: Config) -> Path:
    return Path(cfg.data.masking.collocation_table or Path(cfg.data.dir) / collocations.TABLE_NAME)


def mask_spec(cfg: Config, tokenizer: Tokenizer, policy: str = "") -> MaskSpec:
    """The masking of a run, with `policy` (default: the training one); the policy's table, if it needs one, is
    loaded (and checked) here, once per rank."""
    m = cfg.data.masking
    # An objective that masks nothing (NTP) reads no table: the MEAP config it was switched from runs as it is.
    objective = OBJECTIVES[cfg.model.objective]
    policy = (policy or m.policy) if objective.masked else "random"
    weights = pairs = None
    if policy == "importance":
        table = importance.load_table(importance_path(cfg), len(tokenizer), tokenizer.fingerprint())
        weights = table ** m.importance_power
    if policy == "pmi":
        pairs = collocations.load_table(collocation_path(cfg), tokenizer.fingerprint())
    # A policy option is the masking key of the same name; the tables are the two loaded from their paths.
    options = PolicyOptions(**{f.name: getattr(m, f.name) for f in fields(PolicyOptions) if hasattr(m, f.name)},
                            importance=weights, collocations=pairs)
    start = packing(cfg, tokenizer, objective.encoder).start_id if cfg.data.document_attention else None
    return MaskSpec(vocab=tokenizer.vocab(), policy=policy, mask_prob=m.mask_prob, random_prob=m.random_prob,
                    share_across_batch=m.share_across_batch, options=options, document_start=start)


def train_loader(cfg: Config, make_batch: Callable, encoder: bool, tokenizer: Tokenizer, rank: int,
                 world_size: int) -> Loader:
    spec = LoaderSpec(sources=train_sources(cfg), rank=rank, world_size=world_size,
                      num_workers=cfg.data.num_workers, seed=cfg.run.seed,
                      micro_batch_size=cfg.data.micro_batch_size, shuffle_block=cfg.data.shuffle_block,
                      packing=packing(cfg, tokenizer, encoder), strict=cfg.data.strict, vocab_size=len(tokenizer),
                      grad_accum=cfg.grad_accum)
    batcher = Batcher(make_batch, mask_spec(cfg, tokenizer), rate_schedule(cfg.data.masking, cfg.trainer.max_steps),
                      cfg.run.seed, rank, cfg.grad_accum)
    return Loader(spec, batcher, mask_in_workers=cfg.data.mask_in_workers)


def uneven_epochs(cfg: Config, loader: Loader) -> str:
    """The loader's note on how unevenly an epoch spreads over its slots, weighed by the manifests' tokens."""
    tokens = [None if shards is None else [shard["tokens"] for shard in shards] for shards in train_manifests(cfg)]
    return loader.uneven_epochs(tokens, cfg.trainer.max_steps * cfg.trainer.global_batch_size * cfg.data.seq_len)


def mixture_plan(cfg: Config) -> str:
    """For the log of a mixture: each source's share of the rows and how many times the run reads it over;
    '' without a mixture. Tokens as packed: each document adds its two boundary tokens."""
    if not cfg.data.mixture:
        return ""
    run_tokens = cfg.trainer.max_steps * cfg.trainer.global_batch_size * cfg.data.seq_len
    total = sum(source.weight for source in cfg.data.mixture)
    parts = []
    for source, shards, label in zip(cfg.data.mixture, train_manifests(cfg), source_labels(cfg)):
        share = source.weight / total
        if shards is None:
            parts.append(f"{label} {share:.1%} of the rows, {len(expand_urls(source.shards)):,} shards listed by URL "
                         "(no manifest counts their tokens)")
            continue
        tokens = sum(shard["tokens"] + 2 * shard["documents"] for shard in shards)
        parts.append(f"{label} {share:.1%} of the rows, {tokens:,} tokens, read {run_tokens * share / tokens:.2f} "
                     "times over the run")
    return "mixture: " + "; ".join(parts)


def eval_rate(cfg: Config) -> float:
    m = cfg.data.masking
    return m.eval_rate if m.eval_rate is not None else rate_schedule(m, cfg.trainer.max_steps).final


def other_folders(cfg: Config) -> list[str]:
    """The mixture's folders other than data.dir: their validation splits are validated on too."""
    return [source.dir for source in cfg.data.mixture
            if source.dir and Path(source.dir).resolve() != Path(cfg.data.dir).resolve()]


def validation_splits(cfg: Config) -> list[tuple[str, list[str] | None]]:
    """What training validates on, as (metric prefix, shard URLs; None: the run's validation split): the run's
    split as `val`, and with a mixture each other source's own split (a folder's, if it has one, or the
    source's `val_shards`) as `val/<name>`: the source's `name`, else its folder's; `val/source<i>` (its place
    in the mixture) for a name two of them share, or for none."""
    others = other_folders(cfg)
    validated = {position: source.name or (Path(source.dir).resolve().name if source.dir else "")
                 for position, source in enumerate(cfg.data.mixture) if source.dir in others or source.val_shards}
    names = Counter(validated.values())
    splits: list[tuple[str, list[str] | None]] = [("val", None)]
    for position, name in validated.items():
        source = cfg.data.mixture[position]
        if urls := source.val_shards or manifest_urls(source.dir, "val"):
            splits.append((f"val/{name if name and names[name] == 1 else f'source{position}'}", urls))
    return splits


def validation_set(cfg: Config, make_batch: Callable, encoder: bool, tokenizer: Tokenizer, rank: int,
                   world_size: int, skips: Skips, split: str = "val", limit: int | None = None,
                   urls: list[str] | None = None) -> tuple[list[dict], dict]:
    """(this rank's validation batches, an all-padding batch for ranks that run out first). `split="train"`
    reads the first `limit` batches of the training split the same way (probes fit on them); `limit` defaults
    to trainer.eval_batches. `urls`: other shards, read as the split's."""
    spec = mask_spec(cfg, tokenizer, cfg.data.masking.eval_policy)
    rate = eval_rate(cfg)
    # Seeded by the global batch alone (rank -1 is no training rank's): every evaluation of a run, at any world
    # size, sees the same masks.
    make = lambda rows, index: make_batch(rows, spec, rate, generator(cfg.run.seed, -1, index))  # noqa: E731

    pack = packing(cfg, tokenizer, encoder)
    batches = validation_batches(shard_urls(cfg, split) if urls is None else urls, rank, world_size,
                                 cfg.data.micro_batch_size, pack,
                                 tokenizer.pad_id, make, skips,
                                 cfg.trainer.eval_batches if limit is None else limit, len(tokenizer))
    empty = make(torch.full((1, cfg.data.seq_len), tokenizer.pad_id, dtype=torch.long), 0)
    return batches, empty
