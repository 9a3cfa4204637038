"""DeepSpeed's universal-checkpoint converter as rank 0 runs it (`checkpoint.to_universal`), in a process of its
own: python -m masktrain.trainer.converter RANK_PID ARGS... runs `deepspeed.checkpoint.ds_to_universal` with ARGS.

It ignores the stop signals, as loader workers do (started under `stops_deferred`): SLURM and torchrun signal
the ranks' whole process group, and a converter killed by a preemption crashed its rank, which is to finish
starting, take its first step and save. And it dies with the rank: a rank killed outright must not leave it
writing into the folder that the next start removes and converts into again.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

from masktrain.launcher.launch import PR_SET_PDEATHSIG
from masktrain.trainer.signals import ignore_stops


def main() -> None:
    rank = int(sys.argv.pop(1))
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != rank:  # it ended before the line above took effect
        sys.exit("the rank converting the checkpoint has ended")
    ignore_stops()
    runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
