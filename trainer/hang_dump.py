"""Every thread's stack of a rank whose step runs as long as a collective may wait.

When one rank hangs (a dead mount, a deadlock, a wait for something that never comes), the others time out in
a collective after launch.collective_timeout and end the run with their own tracebacks, which only say that they
were waiting; torchrun then kills the rank that hung without a word about where it was. So each rank watches its
own steps: one that has not ended after that long writes the stack of each of its threads to
`<run>/stacks/rank<r>.txt` (the latest such dump of that rank) and says so in the log. The watchdog is a thread, so
it sees a rank stuck in a collective, a read or Python code; a step that is slow but alive (a large model's save
on a slow file system) gets a dump too, which shows where its time goes.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import socket
import sys
import threading
import time
from pathlib import Path

STACKS = "stacks"
"""The run folder's subfolder of the dumps, one file a rank."""


class HangDump:
    def __init__(self, seconds: float, run_dir: Path, rank: int):
        self.seconds = seconds
        self.path = run_dir / STACKS / f"rank{rank}.txt"
        self.rank = rank
        self.what: str | None = None
        self.deadline = 0.0
        self.wake = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self.watch, name="masktrain-hang-dump", daemon=True)
        self.thread.start()

    def begin(self, what: str) -> None:
        """`what` (a step, the start-up) starts now; the one before, if any, has ended."""
        with self.wake:
            self.what, self.deadline = what, time.monotonic() + self.seconds
            self.wake.notify()

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join()

    def watch(self) -> None:
        while True:
            with self.wake:
                while not self.closed and (self.what is None or time.monotonic() < self.deadline):
                    self.wake.wait(None if self.what is None else self.deadline - time.monotonic())
                if self.closed:
                    return
                what, self.what = self.what, None  # once for each thing begun
            self.dump(what)  # outside the lock: a write to a dead mount must not also hold up the loop

    def dump(self, what: str) -> None:
        said = f"rank {self.rank}: {what} has not ended after {self.seconds:g} s (launch.collective_timeout)"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as out:
                now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                out.write(f"{said}; host {socket.gethostname()}, pid {os.getpid()}, {now}\n\n")
                out.flush()  # faulthandler writes to the file descriptor, past Python's buffer
                faulthandler.dump_traceback(out, all_threads=True)
        except OSError as err:
            print(f"[masktrain] {said}; the stack of each of its threads ({self.path} not written: {err}):",
                  file=sys.stderr, flush=True)
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
            return
        print(f"[masktrain] {said}; the stack of each of its threads: {self.path}", file=sys.stderr, flush=True)
