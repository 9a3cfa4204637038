"""One rank of a training run, as the launchers start it: `python -m masktrain.trainer.rank RUN_DIR/config.yaml`.

The stop signals are caught before anything else is imported. torch and DeepSpeed take seconds to import
(minutes on a busy shared file system); a preemption signal meanwhile would otherwise kill the rank, with
nothing saved and no status written, instead of being honoured after the first step.
"""

from __future__ import annotations

from masktrain.trainer.signals import StopRequest


def main() -> None:
    stop = StopRequest().install()
    from masktrain.trainer.train import main as train_main

    train_main(stop=stop)


if __name__ == "__main__":
    main()
