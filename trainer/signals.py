"""Preemption: SIGTERM or SIGUSR1 (or a Ctrl-C) asks the run to finish its step, checkpoint and leave.

The handler only sets a flag; the loop agrees on it across ranks after every step so that all ranks stop at
the same step and save together. Schedulers and torchrun signal whole process groups, so a rank's child
processes (loader workers, the universal-checkpoint converter) get the signal too: they ignore it
(`ignore_stops`), and the rank ends them itself.
"""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""SIGINT too: `masktrain train` passes a Ctrl-C on, and torchrun signals the ranks' process groups, loader
workers included."""


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.handle)
        return self

    def handle(self, signum: int, frame) -> None:
        # The first names the stop: torchrun follows a SIGUSR1 it passes on with a SIGTERM of its own.
        self.signal_name = self.signal_name or signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stops_deferred(*also: signal.Signals):
    """Start child processes that will ignore the stop signals inside this block: they inherit it blocked, so
    one that comes before a child calls `ignore_stops` waits instead of killing it. This process only defers
    its own until the block ends. `also`: further signals the children are to unblock once they handle them."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, (*STOP_SIGNALS, *also))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def ignore_stops() -> None:
    """In a child started under `stops_deferred`: ignore the stop signals from now on. One that arrived before
    has waited, and ignoring it discards it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
