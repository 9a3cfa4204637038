"""Every thread's stack of a rank whose step runs as long as a collective may wait.

When one rank hangs (a dead mount, a deadlock, a wait for something that never comes), the others time out in
a collective after launch.collective_timeout and end the run with their own tracebacks, which only say that they
were waiting; torchrun then kills the rank that hung without a word about where it was. So each rank watches its
own steps: one that has not ended after that long has its threads' stacks taken at that moment, says so in the log,
then writes them to `<run>/stacks/rank<r>.txt` (the latest such dump of that rank), or to the log when the file
cannot be written. The watchdog is a thread: it sees a rank stuck in a collective, a read or Python code. A C call
that holds the interpreter keeps it from running too; faulthandler's own thread then prints the stacks to the log,
GRACE seconds later. A step that is slow but alive (a large model's save on a slow file system) gets a dump too,
which shows where its time goes. The start-up is not watched: a checkpoint's conversion to the universal format
may take hours there, with a timeout of its own. A rank waiting for a batch shows only that it waits: its loader
workers, where a read may be what hangs, print their own stacks to the log on WORKER_STACKS (`on_worker_stacks`),
one after the other.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Callable

STACKS = "stacks"
"""The run folder's subfolder of the dumps, one file a rank."""
GRACE = 2.0
"""Seconds past the deadline after which faulthandler prints the stacks itself: the watchdog thread could not
run that long, so a C call holds the interpreter."""
CLOSE_WAIT = 1.0
"""How long `close` waits for a dump being written: one stuck on a dead mount must not keep the rank from ending."""
WORKER_STACKS = signal.SIGUSR2
"""Sent by a rank's watchdog to its loader workers, which print every thread's stack to the log on it."""
WORKER_GAP = 0.2
"""Seconds between signalling one worker and the next, so that their dumps come out one after the other."""


def on_worker_stacks() -> None:
    """In a loader worker, started with WORKER_STACKS blocked (one sent before this waits): print every thread's
    stack to the log on it, headed by its pid, in one write. A Python handler, run by the main thread between
    bytecodes (a blocked read returns to let it run): faulthandler's own, which reads the frames of threads
    running meanwhile, crashed busy workers."""
    signal.signal(WORKER_STACKS, print_worker_stacks)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [WORKER_STACKS])


def print_worker_stacks(signum: int, frame: FrameType | None) -> None:
    # Whatever it meets (a closed or full log, a path that is no UTF-8) must not reach the code it interrupted,
    # where a reader would take an error for a corrupt shard and a worker that raised would end its rank.
    with contextlib.suppress(Exception):
        said = f"[masktrain] loader worker pid {os.getpid()}, the stack of each of its threads:"
        data = f"{said}\n{thread_stacks(None)}\n".encode(errors="backslashreplace")
        # Not descriptor 2 itself: a process started without one (sys.__stderr__ is then None) has since given
        # that number to something else, such as the process group's store socket.
        log = sys.__stderr__.fileno()
        while data:
            data = data[os.write(log, data):]


def stack_of(frame: FrameType | None) -> str:
    """A thread's stack, most recent call last, as a traceback shows it but without the source lines, whose
    reading could block on the very mount that hangs."""
    lines = []
    while frame is not None:
        lines.append(f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}')
        frame = frame.f_back
    return "\n".join(reversed(lines))


def thread_stacks(but: int | None) -> str:
    """Every thread's stack now, but that of the thread `but` (an ident)."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return "\n\n".join(f"Thread {names.get(ident, ident)} (most recent call last):\n{stack_of(frame)}"
                       for ident, frame in sys._current_frames().items() if ident != but)


class HangDump:
    def __init__(self, seconds: float, run_dir: Path, rank: int):
        self.seconds = seconds
        self.path = run_dir / STACKS / f"rank{rank}.txt"
        self.rank = rank
        self.what: str | None = None
        self.deadline = 0.0
        self.wake = threading.Condition()
        self.closed = False
        self.workers: Callable[[], list[int]] = list
        """The pids of the rank's loader workers, to be signalled WORKER_STACKS with a dump."""
        self.thread = threading.Thread(target=self.watch, name="masktrain-hang-dump", daemon=True)
        self.thread.start()

    def begin(self, what: str) -> None:
        """`what` (a step) starts now; the one before, if any, has ended."""
        with self.wake:
            self.what, self.deadline = what, time.monotonic() + self.seconds
            faulthandler.dump_traceback_later(self.seconds + GRACE, file=sys.__stderr__)
            self.wake.notify()

    def close(self) -> None:
        with self.wake:
            self.closed = True
            faulthandler.cancel_dump_traceback_later()
            self.wake.notify()
        self.thread.join(CLOSE_WAIT)

    def watch(self) -> None:
        while True:
            with self.wake:
                while not self.closed and (self.what is None or time.monotonic() < self.deadline):
                    self.wake.wait(None if self.what is None else self.deadline - time.monotonic())
                if self.closed:
                    return
                faulthandler.cancel_dump_traceback_later()  # this thread runs: it dumps
                what, self.what = self.what, None  # once for each thing begun
                stacks = thread_stacks(but=threading.get_ident())  # now, before the step can move on
                workers = self.workers()
            # Outside the lock: a write to a dead mount must not also hold up the loop.
            self.dump(f"rank {self.rank}: {what} has not ended after {self.seconds:g} s (launch.collective_timeout)",
                      stacks, workers)

    def dump(self, said: str, stacks: str, workers: list[int]) -> None:
        # The log first: the file may be on the file system that hangs.
        also = f", and its loader workers' (pids {', '.join(map(str, workers))}) to this log" if workers else ""
        print(f"[masktrain] {said}; the stack of each of its threads goes to {self.path}{also}", file=sys.stderr,
              flush=True)
        for index, pid in enumerate(workers):
            time.sleep(WORKER_GAP * (index > 0))
            with contextlib.suppress(ProcessLookupError):  # ended since
                os.kill(pid, WORKER_STACKS)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        partial = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "w") as out:
                out.write(f"{said}; host {socket.gethostname()}, pid {os.getpid()}, {now}\n\n{stacks}\n")
            partial.replace(self.path)  # whole or not at all: status reads it
        except OSError as err:  # a full disk: the stacks go to the log instead
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            print(f"[masktrain] rank {self.rank}: {self.path} not written ({err}); the stacks:\n{stacks}",
                  file=sys.stderr, flush=True)
