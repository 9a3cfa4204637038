"""Rank 0's logs: TensorBoard scalars and a JSON-lines file with the same values.

On resume both are cut back to the resumed step, so a preempted and resumed run reads as one clean curve in
any reader (see `truncate_events`). Non-finite values (the loss of an interval whose steps were all skipped)
are left out of TensorBoard and written as null, which keeps the file strict JSON.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path


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
        self.writer = SummaryWriter(str(self.tb_dir))

    def truncate_jsonl(self, resume_step: int) -> None:
        if not self.jsonl.is_file():
            return
        lines = [line for line in self.jsonl.read_text().splitlines() if line.strip()]
        if lines and not parses(lines[-1]):
            lines.pop()  # a kill in the middle of a write: that step comes after any checkpoint
        kept = [line for line in lines if json.loads(line).get("step", 0) <= resume_step]
        tmp = self.jsonl.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.jsonl)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {key: value if math.isfinite(value) else None for key, value in values.items() if value is not None}
        for key, value in row.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)
        with open(self.jsonl, "a") as handle:
            handle.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")

    def flush(self) -> None:
        """Writes out the events SummaryWriter still holds and syncs both logs to disk."""
        if self.writer is None:
            return
        self.writer.flush()
        for path in [*self.tb_dir.glob("*tfevents*"), self.jsonl]:
            if path.is_file():
                with open(path, "rb+") as handle:
                    os.fsync(handle.fileno())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def truncate_events(tb_dir: Path, resume_step: int) -> None:
    """Drops from the event files what earlier launches logged after `resume_step` (the checkpoint resumed
    from; 0 without one).

    SummaryWriter's purge_step only writes a marker: TensorBoard's Python loader honours it, its default data
    server (tensorboard-data-server) does not, and kept showing a val/loss point of the abandoned launch until
    the resumed run happened to log that tag at the same step. The kept events go into the oldest file, so
    they sort before the resumed launch's; exact copies, which a kill during an earlier merge leaves, are
    dropped, and so are old purge markers (nothing is left for them to purge)."""
    files = sorted(tb_dir.glob("*tfevents*"))  # names start with the creation time in seconds
    if not files:
        return
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog
    from tensorboard.summary.writer.record_writer import RecordWriter

    header, kept, seen = None, [], set()
    for path in files:
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("file_version"):
                header = header or event.SerializeToString()
            elif event.step <= resume_step and event.session_log.status != SessionLog.START:
                record = event.SerializeToString()
                if record not in seen:
                    seen.add(record)
                    kept.append(record)
    tmp = tb_dir / "merge.tmp"  # TensorBoard reads only names with "tfevents" in them
    with open(tmp, "wb") as handle:
        writer = RecordWriter(handle)
        for record in [header, *kept] if header else kept:
            writer.write(record)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, files[0])
    for path in files[1:]:
        path.unlink()


def parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True
