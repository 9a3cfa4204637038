"""One rank of a training run, as the launchers start it: `python -m masktrain.trainer.rank RUN_DIR/config.yaml`.

The stop signals are caught before anything else is imported. torch and DeepSpeed take seconds to import
(minutes on a busy shared file system); a preemption signal meanwhile would otherwise kill the rank, with
nothing saved and no status written, instead of being honoured after the first step.
"""

from __future__ import annotations

import gc
import os
import sys

from masktrain.trainer.signals import StopRequest


class Console:
    """A rank's stdout or stderr, which outlives its reader: with `masktrain train | head`, or a `tee` that died,
    every rank died at its next line (DeepSpeed's start-up notes among them), and the run with it. Once the pipe
    is gone the lines go to /dev/null; the run's record is in metrics.jsonl, TensorBoard and status.json."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.gone()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.gone()

    def gone(self) -> None:
        to_devnull(self.stream.fileno())

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def to_devnull(fd: int) -> None:
    """Point an output whose reader has gone at /dev/null: the descriptor itself, so that what writes to it directly
    (faulthandler, C++ libraries, the flush at exit) meets no broken pipe either."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def main() -> None:
    stop = StopRequest().install()
    sys.stdout, sys.stderr = Console(sys.stdout), Console(sys.stderr)
    from masktrain.trainer.train import main as train_main

    try:
        train_main(stop=stop)
    finally:
        exit_quickly()


def exit_quickly() -> None:
    """For a process about to exit: Python's last garbage collection walks every object of torch, DeepSpeed and
    transformers (half a second for a command, a second or more for a rank) to free memory the process gives back
    whole anyway; frozen, they are not walked. What needs closing has been closed explicitly by then."""
    gc.freeze()


if __name__ == "__main__":
    main()
