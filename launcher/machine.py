"""What a measurement ran on, recorded next to every benchmark result and experiment report."""

from __future__ import annotations

import os
import platform
import time


def machine() -> dict:
    import deepspeed
    import torch
    import transformers

    return {"cores": len(os.sched_getaffinity(0)), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def stamp() -> dict:
    """When and on what: the header of every benchmark result and experiment report."""
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine()}
