"""DeepSpeed's universal-checkpoint converter as rank 0 runs it (`checkpoint.to_universal`), in a process of its
own: python -m masktrain.trainer.converter RANK_PID ARGS... runs `deepspeed.checkpoint.ds_to_universal` with ARGS.

It ignores the stop signals, as loader workers do (started under `stops_deferred`): SLURM and torchrun signal
the ranks' whole process group, and a converter killed by a preemption crashed its rank, which is to finish
starting, take its first step and save. And it dies with the rank, its pool of workers with it: a rank killed
outright must not leave them writing into the folder that the next start removes and converts into again.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

from masktrain.launcher.launch import PR_SET_PDEATHSIG
from masktrain.trainer.signals import ignore_stops


def dies_with(parent: int) -> bool:
    """Have this process killed when `parent` ends; False when it has ended already (before that took effect)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.getppid() == parent


def main() -> None:
    rank = int(sys.argv.pop(1))
    if not dies_with(rank):
        sys.exit("the rank converting the checkpoint has ended")
    ignore_stops()
    children_die_with_their_parent()
    runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)


def children_die_with_their_parent() -> None:
    """DeepSpeed converts in a pool of workers, forked (Python 3.11's way on Linux), which the death signal does
    not reach: each process forked from here on sets its own, for the process that forked it."""
    parent = os.getpid()

    def before() -> None:
        nonlocal parent
        parent = os.getpid()

    def in_child() -> None:
        if not dies_with(parent):
            os._exit(1)

    os.register_at_fork(before=before, after_in_child=in_child)


if __name__ == "__main__":
    main()
