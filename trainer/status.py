"""`<run>/status.json`: how the last launch of a run ended (preempted, completed or failed with a reason, and the
step), or `running` with the step of its last checkpoint, where a restart would go on from. `start`, the step the
launch started from, tells a launch that saved nothing: one restarted in its place would only repeat it.

Launchers read it because torchrun replaces a worker's exit code with its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from masktrain.data.files import read_json, write_atomic

STATUS = "status.json"
STATES = ("running", "preempted", "completed", "failed", "crashed")
# What launchers exit with when the run stopped to be resumed: EX_TEMPFAIL from sysexits.h,
# "temporary failure, try again later".
REQUEUE_EXIT = 75


def shell_code(exitcode: int) -> int:
    """A process's exit code as a shell reports it: 128 + n for one killed by signal n (Popen says -n)."""
    return 128 - exitcode if exitcode < 0 else exitcode


def write_status(run_dir: str | Path, state: str, step: int, reason: str | None = None,
                 start: int | None = None) -> None:
    path = Path(run_dir) / STATUS
    status = {"state": state, "step": step, "pid": os.getpid(), **({"reason": reason} if reason else {}),
              **({"start": start} if start is not None else {})}
    # Ranks failing together each write their own temporary file.
    write_atomic(path, json.dumps(status) + "\n", tmp_name=f"{STATUS}.{os.getpid()}.tmp")


def read_status(run_dir: str | Path) -> dict:
    """The status the last launch wrote; {} when there is none, or what is there is not one (a machine that lost
    power can leave a just-renamed file empty). It only says how a launch ended: the checkpoints say the rest."""
    status = read_json(Path(run_dir) / STATUS)
    valid = (isinstance(status, dict) and status.get("state") in STATES and isinstance(status.get("step"), int)
             and (status["state"] not in ("failed", "crashed") or isinstance(status.get("reason"), str)))
    return status if valid else {}
