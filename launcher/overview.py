"""`masktrain status RUN...`: where a run stands, read from its folder alone (no rank, no torch), for a person
checking on a run of days: whether a launch holds it now, its step, last losses, speed, time left and saves.

"running" in status.json says only what the last launch wrote; whether something still runs is the run lock's
to say. A folder marked running that no launch holds was left by one that ended without a verdict.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import yaml

from masktrain.launcher.run_lock import NO_LOCKS, in_use, queued
from masktrain.trainer.checkpoint import Checkpointer, meta_or_none
from masktrain.trainer.hang_dump import STACKS
from masktrain.trainer.status import read_status

TAIL_BYTES = 16 * 2**20
"""How much of metrics.jsonl's end is read for the last rows (the last evaluation may lie thousands of log
lines back)."""


def last_rows(path: Path, keys: tuple[str, ...]) -> dict[str, dict]:
    """For each key, the last row of the JSON-lines file `path` that has it, from its last TAIL_BYTES."""
    found: dict[str, dict] = {}
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - TAIL_BYTES))
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return found
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:  # the cut first line of the tail, or a line a crash left half-written
            continue
        for key in keys:
            if isinstance(row, dict) and key in row and key not in found:
                found[key] = row
        if len(found) == len(keys):
            break
    return found


def figure(value: float | None, spec: str) -> str:
    """A logged number; None is what the metrics log writes for a loss that was not finite."""
    return "non-finite" if value is None else format(value, spec)


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(0, int(seconds))}s"
    minutes = int(seconds // 60)
    days, hours, minutes = minutes // 1440, minutes // 60 % 24, minutes % 60
    return f"{days}d {hours}h" if days else f"{hours}h {minutes:02d}m" if hours else f"{minutes}m"


RUN_FILES = ("config.yaml", "status.json", "run.lock", "metrics.jsonl", "checkpoints", "slurm")
"""What a launch leaves in a run folder from its start (`slurm submit` writes the job script into slurm/)."""


def run_config(run: Path) -> dict:
    try:
        config = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def overview(run_dir: str | Path, now: float | None = None) -> str:
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    if not any((run / name).exists() for name in RUN_FILES):  # a parent folder, a data folder: not "not started"
        raise FileNotFoundError(f"{run}: not a run folder (none of {', '.join(RUN_FILES)} in it)")
    now = time.time() if now is None else now
    config = run_config(run)
    trainer, data = (config.get(key) if isinstance(config.get(key), dict) else {} for key in ("trainer", "data"))
    max_steps = trainer.get("max_steps")
    status = read_status(run)
    state, step = status.get("state", "not started"), status.get("step", 0)
    try:
        holder = in_use(run)
    except OSError as err:  # another user's folder, a file system gone read-only
        holder = f"unknown ({err.strerror})"
    lines = [f"{run}: {state}" + (f": {status['reason'].splitlines()[0]}" if status.get("reason") else "")]
    waiting = queued(run) if holder in (None, NO_LOCKS) else None
    if holder not in (None, NO_LOCKS):
        lines.append(f"  held by {holder}")
    elif waiting is not None:
        lines.append(f"  SLURM job {waiting[0]} is in the queue ({waiting[1]}): it takes the run up when it starts")
    elif holder == NO_LOCKS:
        lines.append(f"  whether a launch holds the folder is unknown: {NO_LOCKS}")
    elif state == "running":
        lines.append("  no launch holds the folder: the last one ended without a verdict (killed, or its node lost); "
                     f"a restart goes on from step {step}")

    rows = last_rows(run / "metrics.jsonl", ("train/loss", "val/loss"))
    train, val = rows.get("train/loss"), rows.get("val/loss")
    logged = train["step"] if train else step
    if max_steps:
        lines.append(f"  step {logged} of {max_steps} ({100 * logged / max_steps:.1f}%)")
    if train:
        speed = train.get("train/tokens_per_s")
        parts = [f"train loss {figure(train['train/loss'], '.4f')} at step {train['step']}",
                 f"lr {figure(train.get('train/lr'), '.3g')}"]
        if "train/mask_rate" in train:
            parts.append(f"mask rate {figure(train['train/mask_rate'], '.3f')}")
        if speed:
            parts.append(f"{speed:,.0f} tokens/s")
        if train.get("train/mfu") is not None:
            parts.append(f"MFU {100 * train['train/mfu']:.1f}%")
        lines.append("  " + ", ".join(parts))
        tokens_per_step = trainer.get("global_batch_size", 0) * data.get("seq_len", 0)
        if speed and max_steps and tokens_per_step and state != "completed":
            left = (max_steps - train["step"]) * tokens_per_step / speed
            lines.append(f"  about {duration(left)} of training left at that speed (evaluation and saves not "
                         "counted)")
    if val:
        accuracy = f", accuracy {figure(val['val/accuracy'], '.4f')}" if "val/accuracy" in val else ""
        lines.append(f"  validation loss {figure(val['val/loss'], '.4f')}{accuracy} at step {val['step']}")

    checkpoints = Checkpointer(run, 1, False)
    latest = checkpoints.latest()
    if latest is None:
        lines.append("  no checkpoint yet")
    else:
        meta = meta_or_none(latest) or {}
        try:
            age = f", {duration(now - (latest / 'meta.json').stat().st_mtime)} ago"
        except OSError:  # pruned by the running launch since
            age = ""
        lines.append(f"  last checkpoint {latest} (step {meta.get('step', '?')}{age})")
        if milestones := [path.name for path in checkpoints.complete() if checkpoints.milestone(path)]:
            lines.append(f"  kept milestones: {', '.join(milestones)}")
    if dumped := stack_dumps(run, now):
        lines.append(dumped)
    return "\n".join(lines)


def stack_dumps(run: Path, now: float) -> str | None:
    """A line on the stacks ranks wrote when a step ran as long as a collective may wait (`masktrain.trainer.hang_dump`):
    how many, and the latest, which says where a hang was."""
    dumps = []
    for path in (run / STACKS).glob("rank*.txt"):
        with contextlib.suppress(OSError):
            dumps.append((path.stat().st_mtime, path))
    if not dumps:
        return None
    when, latest = max(dumps)
    try:
        with open(latest, errors="replace") as handle:
            said = handle.readline().split(";")[0].strip()  # "rank 1: step 3 has not ended after 600 s (...)"
    except OSError as err:
        said = f"unreadable: {err.strerror}"
    ranks = f"{len(dumps)} ranks" if len(dumps) > 1 else "1 rank"
    return f"  stacks written by {ranks}, the latest {duration(now - when)} ago ({said}): {latest}"
