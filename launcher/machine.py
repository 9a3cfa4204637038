"""What a measurement ran on, recorded next to every benchmark result and experiment report."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The processor's marketing name (platform.processor() gives only "x86_64" on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import deepspeed
    import torch
    import transformers

    return {"cores": len(os.sched_getaffinity(0)), "cpu": cpu_model(),
            "python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            # What else ran: wall-clock figures with several threads (text to shards) fall with free cores.
            "load_average": round(os.getloadavg()[0], 2)}


# What a measurement writes, and so changes while it runs: not a change to the code it measures.
OUTPUTS = ("benchmarks/results", "README.md")


def code_version(checkout: Path = CHECKOUT) -> dict | None:
    """The commit the measured code came from and whether files other than the results differed from it (new
    files not yet committed included: a module a benchmark imports counts; ignored outputs do not); None outside
    a git checkout (an installed wheel)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        changed = git("status", "--porcelain", "--", ".",
                      *(f":(exclude){path}" for path in OUTPUTS))
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed)}
    except (OSError, subprocess.CalledProcessError):
        return None


def stamp() -> dict:
    """When, on what, from which code and by which command: the header of every benchmark result and experiment
    report, so a figure can be traced to what produced it and told stale when the code has moved on."""
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "code": code_version(),
            "command": sys.orig_argv}
