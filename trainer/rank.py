"""One rank of a training run, as the launchers start it: `python -m masktrain.trainer.rank RUN_DIR/config.yaml`.

The stop signals are caught before anything else is imported. torch and DeepSpeed take seconds to import
(minutes on a busy shared file system); a preemption signal meanwhile would otherwise kill the rank, with
nothing saved and no status written, instead of being honoured after the first step.
"""

from __future__ import annotations

import gc

from masktrain.trainer.signals import StopRequest


def main() -> None:
    stop = StopRequest().install()
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
