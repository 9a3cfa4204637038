"""`trainer.profile_steps`: torch.profiler over a window of training steps, on every rank.

Each rank writes a Chrome trace of the window (open it in Perfetto, ui.perfetto.dev, or chrome://tracing) to
`<run>/profile/`, and rank 0 prints the operators that took the most time. The window is in global steps, so a
run resumed inside it profiles the steps it has left.
"""

from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, window: list[int], run_dir: Path, rank: int, device: torch.device):
        self.first, self.last = window if window else (0, -1)
        self.folder = run_dir / "profile"
        self.path = self.folder
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.active: torch.profiler.profile | None = None

    def before(self, step: int) -> None:
        """`step` (1-based) is about to run."""
        if self.active is None and self.first <= step <= self.last:
            self.path = self.folder / f"steps-{step}-{self.last}-rank{self.rank}.json"
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.active = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
            self.active.__enter__()

    def after(self, step: int) -> None:
        """`step` is done (its checkpoint and validation included)."""
        if self.active is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        """End the window early (the run stops inside it) or at its end, and write what it holds."""
        if self.active is None:
            return
        profile, self.active = self.active, None
        profile.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(self.path))
        if self.rank == 0:
            sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
            print(profile.key_averages().table(sort_by=sort, row_limit=15), flush=True)
            print(f"[masktrain] profile: {self.path} (one per rank; open in "
                  "ui.perfetto.dev)", flush=True)
