"""Rank 0's logs: TensorBoard scalars and a JSON-lines file with the same values.

On resume both are cut back to the resumed step, so a preempted and resumed run reads as one clean curve.
Non-finite values (the loss of a skipped step) are left out of TensorBoard and written as null, which keeps
the file strict JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


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
        # purge_step drops events a killed run wrote after the checkpoint we resume from (or, with no
        # checkpoint yet, all of them).
        self.writer = SummaryWriter(str(self.tb_dir), purge_step=resume_step + 1)

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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True
