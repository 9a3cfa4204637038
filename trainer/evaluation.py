"""Validation metrics: the sums every evaluation adds up, and `masktrain eval`, which scores saved checkpoints.

Training evaluates at trainer.eval_every with its own validation masking (data.masking.eval_rate, or the
schedule's final rate). Runs with other masking schedules are then scored at other rates, and a run's
milestones only on the data it trained with. `masktrain eval` scores any complete checkpoint again on one
process, as training did (same batches, same masks, the loss training logged; a bf16 run's to within bf16's
rounding, as its fp32 master weights are scored here in fp32), or with what it is scored on changed (EVAL_KEYS):
another data folder's validation split, another masking rate or policy, more or fewer batches.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Callable

import torch

from masktrain.data import inputs
from masktrain.data.reader import Skips
from masktrain.launcher.loading import ConfigError, parse_overrides
from masktrain.trainer.checkpoint import Checkpointer, flatten, read_meta, resolve_checkpoint
from masktrain.trainer.objectives import OBJECTIVES

EVAL_KEYS = ("data.dir", "data.val_shards", "data.micro_batch_size", "data.strict", "data.masking.",
             "trainer.eval_batches")
"""What an evaluation may change (a key, or every key under a section ending in "."): the data it reads and
how that is masked. Everything else would score another model than the one trained."""

OVERRIDE = re.compile(r"^[a-z_]+(\.[a-z_]+)+=")
"""`section.key=value`, told apart from a checkpoint path by its dotted key (a path has a slash or no dots
before an "=")."""


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_sums(forward: Callable, batches: list[dict], count: int, empty: dict,
                 device: torch.device) -> torch.Tensor:
    """[loss sum, targets, correct] over `count` forwards: the batches, then `empty` (all padding) for a rank
    that has fewer than the others, which must run as many forwards as they do."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i in range(count):
            out = forward(**to_device(batches[i] if i < len(batches) else empty, device))
            sums += torch.stack([out["loss_sum"], out["tokens"], out["correct"]]).double()
    return sums


def val_metrics(sums: torch.Tensor, encoder: bool) -> dict[str, float]:
    """Masked-token loss and accuracy (encoders) or loss and perplexity (decoders) from `forward_sums`."""
    loss_sum, tokens, correct = sums.tolist()
    if tokens == 0:  # no validation data (or none left after skipping bad data): no loss to report, not 0
        return {"val/tokens": 0.0}
    loss = loss_sum / tokens
    if encoder:
        return {"val/loss": loss, "val/accuracy": correct / tokens, "val/tokens": tokens}
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/tokens": tokens}


def split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """(checkpoints or run folders, overrides) from the command line's positional items; a folder that exists is
    a folder, whatever its name looks like."""
    overrides = [item for item in items if OVERRIDE.match(item) and not Path(item).exists()]
    return [item for item in items if item not in overrides], overrides


def eval_changes(overrides: list[str], source: str) -> dict:
    """The overrides as a nested dict, with what they imply; ConfigError naming any key outside EVAL_KEYS."""
    tree, problems = parse_overrides(overrides)
    for key in flatten(tree):
        if not any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in EVAL_KEYS):
            problems.append(f"{key}: an evaluation can change only what it reads and how that is masked "
                            f"({', '.join(k + '*' if k.endswith('.') else k for k in EVAL_KEYS)})")
    if problems:
        raise ConfigError(source, problems)
    data = tree.get("data", {})
    if "dir" in data:
        # Another folder's validation split, also for a run trained on listed shards (whose lists win over it),
        # unless validation shards are listed with it.
        data.update(train_shards=[], val_shards=data.get("val_shards") or [])
    if "micro_batch_size" in data:
        # One process scores: the training job's shape, which the batch size had to divide, is not this one.
        tree.setdefault("trainer", {})["global_batch_size"] = data["micro_batch_size"]
        tree["launch"] = {"nnodes": 1, "nproc_per_node": 1}
    return tree


def check_out(path: str | None) -> None:
    """Refuse an --out file that could not be written before any checkpoint is scored (hours for many large
    ones), rather than after."""
    if path is None:
        return
    if Path(path).is_dir():
        raise IsADirectoryError(f"--out {path}: a folder; give a file name")
    if not Path(path).parent.is_dir():
        raise FileNotFoundError(f"--out {path}: no folder {Path(path).parent} to write it in")


def checkpoints_of(given: list[str], every: bool) -> list[Path]:
    """The checkpoints named: each folder's newest complete one, or with `every`, all of a run's current line,
    oldest first (those of a line a rollback abandoned are named in a line, not scored among them)."""
    if not every:
        return [resolve_checkpoint(path) for path in given]
    found = []
    for path in given:
        run = Path(path)
        if not (run / "checkpoints").is_dir():
            raise FileNotFoundError(f"{path}: not a run folder (no checkpoints/ in it); every checkpoint of a "
                                    "run is asked for")
        current, abandoned = Checkpointer(run, 1, False).lines()
        if not current:
            raise FileNotFoundError(f"{path}: no complete checkpoint in it")
        if abandoned:
            print(f"masktrain: {path}: not scoring the checkpoints of a line a rollback abandoned "
                  f"({', '.join(p.name for p in abandoned)}); name them to score them", file=sys.stderr)
        found += current
    return found


def evaluate_checkpoint(checkpoint: Path, changes: dict, device: torch.device) -> dict:
    """The validation metrics of one checkpoint, with what was scored (step, data, policy, rate, batches,
    skipped data) beside them."""
    from masktrain.trainer.export import trained_config, trained_model  # transformers: seconds to import

    checkpoint, cfg, tokenizer = trained_config(checkpoint, changes, scoring=True)
    inputs.check_ready(cfg, tokenizer, training=False)  # before the minutes a large model's weights take
    model = trained_model(checkpoint, cfg, tokenizer)
    objective = OBJECTIVES[cfg.model.objective]
    skips = Skips(cfg.data.strict)
    batches, empty = inputs.validation_set(cfg, objective.batch, objective.encoder, tokenizer, 0, 1, skips)
    model.to(device)
    metrics = val_metrics(forward_sums(model, batches, len(batches), empty, device), objective.encoder)
    if not metrics["val/tokens"]:
        where = ", ".join(cfg.data.val_shards) or f"the validation split of {cfg.data.dir}"
        raise FileNotFoundError(f"{checkpoint}: nothing to score in {where}"
                                + (f" (skipped: {dict(skips.counts)})" if skips.counts else ""))
    masked = objective.masked
    return {"checkpoint": str(checkpoint), "step": read_meta(checkpoint).get("step"), "objective": cfg.model.objective,
            "data": cfg.data.val_shards or cfg.data.dir, "batches": len(batches),
            "policy": (cfg.data.masking.eval_policy or cfg.data.masking.policy) if masked else None,
            "rate": inputs.eval_rate(cfg) if masked else None, **metrics, "skipped": dict(skips.counts)}


def summary(result: dict) -> str:
    masking = f", {result['policy']} masking at {result['rate']:.3g}" if result["policy"] else ""
    scores = " ".join(f"{key}={result[key]:.6g}" for key in ("val/loss", "val/accuracy", "val/ppl") if key in result)
    skipped = f", skipped {result['skipped']}" if result["skipped"] else ""
    data = ", ".join(result["data"]) if isinstance(result["data"], list) else result["data"]
    return (f"{result['checkpoint']} (step {result['step']}): {scores} over {result['val/tokens']:,.0f} targets "
            f"in {result['batches']} batches of {data}{masking}{skipped}")
