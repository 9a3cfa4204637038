"""Preemption: SIGTERM or SIGUSR1 (or a Ctrl-C) asks the run to finish its step, checkpoint and leave.

The handler only sets a flag; the loop agrees on it across ranks after every step so that all ranks stop at
the same step and save together. Schedulers and torchrun signal whole process groups, so the loader's worker
processes get the signal too: they ignore it (`masktrain.data.loader.ignore_stop_signals`) and the loader stops
them itself (`Loader.close`).
"""

from __future__ import annotations

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
