"""Rank 0's logs: TensorBoard scalars and a JSON-lines file with the same values.

On resume both are cut back to the resumed step, so a preempted and resumed run reads as one clean curve in
any reader (see `truncate_events`). Non-finite values (the loss of an interval whose steps were all skipped)
are left out of TensorBoard and written as null, which keeps the file strict JSON.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from masktrain.data.files import fsync_path, read_json, write_atomic

EVENTS_SUFFIX = ".masktrain"
"""Ends the names of the event files this trainer writes: the only ones a resume rewrites."""
EVENTS_INDEX = "event-files.json"
"""In the TensorBoard folder: for each event file already read, the last step it holds."""


@dataclass
class Interval:
    """The steps since the last logged one, summed, so that a logged point describes every step of its
    interval rather than one step in `log_every`: a single step's loss is a noisy sample, and one step's
    throughput misses the slow ones between."""

    loss_sum: float = 0.0
    loss_targets: float = 0.0
    """Targets of the steps with a finite loss: a skipped step's NaN would hide the rest of the interval."""
    targets: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    """Time in training steps (loading their batches included); evaluation and checkpoints are not counted."""
    waited: float = 0.0

    def add(self, loss_sum: float, targets: float, tokens: int, seconds: float, waited: float) -> None:
        if math.isfinite(loss_sum):
            self.loss_sum += loss_sum
            self.loss_targets += targets
        self.targets += targets
        self.tokens += tokens
        self.seconds += seconds
        self.waited += waited

    @property
    def loss(self) -> float:
        """Mean loss per target over the interval's steps with a finite loss; NaN when none had one."""
        return self.loss_sum / self.loss_targets if self.loss_targets else math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


class Metrics:
    def __init__(self, run_dir: str | Path, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.tb_dir = Path(run_dir) / "tb"
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.truncate_jsonl(resume_step)
        truncate_events(self.tb_dir, resume_step)
        self.writer = SummaryWriter(str(self.tb_dir), filename_suffix=EVENTS_SUFFIX)

    def truncate_jsonl(self, resume_step: int) -> None:
        if not self.jsonl.is_file():
            return
        lines = [line for line in self.jsonl.read_text().splitlines() if line.strip()]
        if lines and not parses(lines[-1]):
            lines.pop()  # a kill in the middle of a write: that step comes after any checkpoint
        kept = [line for line in lines if json.loads(line).get("step", 0) <= resume_step]
        write_atomic(self.jsonl, "".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {key: value if math.isfinite(value) else None for key, value in values.items() if value is not None}
        for key, value in row.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)
        with open(self.jsonl, "a") as handle:
            handle.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")

    def config(self, step: int, text: str) -> None:
        """The run's config in TensorBoard's text tab, at each launch's first step: runs compared there are told
        apart there. Indented, it shows as the YAML it is, not as Markdown."""
        if self.enabled:
            self.writer.add_text("config", "    " + text.rstrip("\n").replace("\n", "\n    "), step)

    def flush(self) -> None:
        """Writes out the events SummaryWriter still holds and syncs both logs to disk."""
        if self.writer is None:
            return
        self.writer.flush()
        for path in [*self.tb_dir.glob(f"*tfevents*{EVENTS_SUFFIX}"), self.jsonl]:
            if path.is_file():
                fsync_path(path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def truncate_events(tb_dir: Path, resume_step: int) -> None:
    """Drops from this trainer's event files what earlier launches logged after `resume_step` (the checkpoint
    resumed from; 0 without one).

    SummaryWriter's purge_step only writes a marker: TensorBoard's Python loader honours it, its default data
    server (tensorboard-data-server) does not, and kept showing a val/loss point of the abandoned launch until
    the resumed run happened to log that tag at the same step. Each file is rewritten in place, so files keep
    their order. A TensorBoard already serving the run shows the change once it reloads the files.

    Files of other tools are left alone (and so are event files of runs from before masktrain named its own
    `*.masktrain`), and so are files the index says end at or before `resume_step`: launches write a file each
    and never reopen it, so a resume reads what came since the last one, not the whole history."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.summary.writer.record_writer import RecordWriter

    ends = read_index(tb_dir / EVENTS_INDEX)
    files = sorted(tb_dir.glob(f"*tfevents*{EVENTS_SUFFIX}"))
    for path in files:
        if ends.get(path.name, math.inf) <= resume_step:
            continue
        kept = [event for event in EventFileLoader(str(path)).Load()
                if event.HasField("file_version") or event.step <= resume_step]
        content = io.BytesIO()
        writer = RecordWriter(content)
        for event in kept:
            writer.write(event.SerializeToString())
        # Shorter also when only a torn last record (a kill mid-write) goes: the reader skips it, silently.
        if len(content.getvalue()) != path.stat().st_size:
            write_atomic(path, content.getvalue(), tmp_name="rewrite.tmp")  # TensorBoard reads "*tfevents*"
        ends[path.name] = max((event.step for event in kept), default=0)
    ends = {path.name: ends[path.name] for path in files}
    if ends:
        write_atomic(tb_dir / EVENTS_INDEX, json.dumps(ends))


def read_index(path: Path) -> dict[str, int]:
    """The index of event files read before; empty (every file is read again) when missing or unreadable: it
    only saves work, and a start-up that fails on it would need someone to delete it."""
    ends = read_json(path)
    return ends if isinstance(ends, dict) else {}


def parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True
