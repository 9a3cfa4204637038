"""Learning-rate schedules: a pure function of the optimizer step, set on the optimizer before each step.

Computing the LR from the step (instead of stepping a scheduler object) keeps it exact across resumes and
unaffected by steps DeepSpeed skips.
"""

from __future__ import annotations

import math
from typing import Callable

from masktrain.launcher.config import OptimConfig

# Each maps (progress in [0, 1] after warmup, optim config) to a multiplier of the peak LR.
LR_SCHEDULES: dict[str, Callable[[float, OptimConfig], float]] = {
    "constant": lambda t, o: 1.0,
    "linear": lambda t, o: 1.0 - (1.0 - o.min_lr_ratio) * t,
    "cosine": lambda t, o: o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)),
    # `cycles` cosine cycles, each peak `damping` times the previous (never below min_lr); all reach min_lr at
    # their end.
    "damped_cosine": lambda t, o: damped_cosine(t, o),
    "wsd": lambda t, o: warmup_stable_decay(t, o),
}


def warmup_stable_decay(t: float, o: OptimConfig) -> float:
    """The peak until the last `decay_fraction` of the steps after warmup, then down to min_lr along 1 - sqrt(u)
    (Hagele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"). Until the
    decay the LR does not depend on trainer.max_steps, so a run extended there goes on at the LR it had."""
    start = 1.0 - o.decay_fraction
    if t <= start:
        return 1.0
    return 1.0 - (1.0 - o.min_lr_ratio) * math.sqrt((t - start) / o.decay_fraction)


def damped_cosine(t: float, o: OptimConfig) -> float:
    cycle = min(int(t * o.cycles), o.cycles - 1)
    within = t * o.cycles - cycle
    peak = max(o.damping ** cycle, o.min_lr_ratio)  # a cycle starting under the floor would rise to it
    return o.min_lr_ratio + (peak - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * within))


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to the peak, then the named decay."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = min((step - optim.warmup_steps) / max(max_steps - optim.warmup_steps, 1), 1.0)
    return optim.lr * LR_SCHEDULES[optim.schedule](progress, optim)
