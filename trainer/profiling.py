"""`trainer.profile_steps`: torch.profiler over a window of training steps, on every rank.

Each rank writes a Chrome trace of the window (open it in Perfetto, ui.perfetto.dev, or chrome://tracing) to
`<run>/profile/`, named by the steps it holds, and rank 0 prints the operators that took the most time. The
window is in global steps, so a run resumed inside it profiles the steps it has left. Every operator call of the
window is held in memory until it ends (about 30 MB a step for a 2-layer toy model, more with depth), hence
MAX_WINDOW.
"""

from __future__ import annotations

from pathlib import Path

import torch

MAX_WINDOW = 10
"""Steps one window may hold: a 300-step window of a 2-layer toy model took 10 GB on each rank."""


class StepProfiler:
    def __init__(self, window: list[int], run_dir: Path, rank: int, device: torch.device):
        self.first, self.last = window if window else (0, -1)
        self.folder = run_dir / "profile"
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.active: torch.profiler.profile | None = None
        self.start = 0

    def before(self, step: int) -> None:
        """`step` (1-based) is about to run."""
        if self.active is None and self.first <= step <= self.last:
            self.start = step
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.active = torch.profiler.profile(activities=activities, record_shapes=True)
            self.active.__enter__()

    def after(self, step: int) -> None:
        """`step` is done (its checkpoint and validation included)."""
        if step >= self.last:
            self.close(step)

    def close(self, step: int) -> None:
        """End the window at `step`, the last one run (early, when the run stops inside it), and write it."""
        if self.active is None:
            return
        profile, self.active = self.active, None
        profile.__exit__(None, None, None)
        path = self.folder / f"steps-{self.start}-{step}-rank{self.rank}.json"
        self.folder.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(path))
        if self.rank == 0:
            sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
            print(profile.key_averages().table(sort_by=sort, row_limit=15), flush=True)
            print(f"[masktrain] profile: {path} (one per rank; open in ui.perfetto.dev)", flush=True)
