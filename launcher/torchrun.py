"""torchrun as masktrain starts it: `python -m masktrain.launcher.torchrun ARGS` takes torchrun's own arguments
and runs its agent unchanged. Only the ending differs.

torchrun ends a stop signal (SignalException) or a failed rank (ChildFailedError) with a Python traceback of some
30 lines. After every preemption that reads as a crash, and it buries the verdict the launcher prints from
status.json below it. Here the signal ends torchrun as a shell reports one, and each failed rank is one line.
Anything else (a rendezvous that never completes, a bad argument) keeps torchrun's traceback, which is the
report there is. And the folder torchrun keeps its ranks' error files in is removed when it ends: its own is
a new /tmp/torchelastic_* each launch, left behind, thousands on a node that runs many.
"""

from __future__ import annotations

import sys
import tempfile

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import main as torchrun_main

from masktrain.trainer.rank import exit_quickly
from masktrain.trainer.status import shell_code


def failure_line(rank: int, failure: ProcessFailure) -> str:
    how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
           else f"exited with code {failure.exitcode}")
    return f"torchrun: rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) {how}"


def main(argv: list[str] | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="torchelastic_", ignore_cleanup_errors=True) as logs:
        return run([f"--log-dir={logs}", *(sys.argv[1:] if argv is None else argv)])


def run(argv: list[str]) -> int:
    try:
        torchrun_main(argv)
    except SignalException as err:
        # torchrun has passed the signal to the ranks and waited for them: what they made of it is in
        # status.json, which the launcher reads.
        print(f"torchrun: stopped on {err.sigval.name}", file=sys.stderr, flush=True)
        return 128 + err.sigval
    except ChildFailedError as err:
        first, failure = err.get_first_failure()
        for rank in sorted(err.failures, key=lambda r: (r != first, r)):
            print(failure_line(rank, err.failures[rank]), file=sys.stderr, flush=True)
        return shell_code(failure.exitcode) or 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        exit_quickly()
