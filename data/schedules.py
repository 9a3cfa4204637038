"""Masking-rate schedules: the rate is a pure function of the global step.

A pure function (rather than a value pushed into loader workers, as MosaicML's callback does) means loader
workers compute the rate themselves and a resumed run uses exactly the same rate at the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

# Each maps progress in [0, 1] to an interpolation weight in [0, 1] from start (0) to end (1).
SCHEDULES: dict[str, Callable[[float, int], float]] = {
    "constant": lambda progress, steps: 0.0,
    "linear": lambda progress, steps: progress,
    "cosine": lambda progress, steps: 0.5 * (1.0 - math.cos(math.pi * progress)),
    # `steps` equal plateaus: the first holds `start`, the last `end`.
    "step": lambda progress, steps: min(math.floor(progress * steps), steps - 1) / max(steps - 1, 1),
}


@dataclass(frozen=True)
class RateSchedule:
    """rate(step): `start` until `warmup` steps, then moves to `end` over `steps` steps, then holds `end`.
    As with learning-rate schedules (and MosaicML's), `end` is reached at step warmup + steps, the step after a
    run of that many steps: its last step trains one increment short of it."""

    name: str
    start: float
    end: float
    steps: int
    warmup: int = 0
    plateaus: int = 4

    def __call__(self, step: int) -> float:
        progress = min(max(step - self.warmup, 0) / self.steps, 1.0)
        weight = SCHEDULES[self.name](progress, self.plateaus)
        # Exactly `end` at the end: start + (end - start) * 1 gave 0.09999999999999998 for 0.4 -> 0.1, which
        # rounds 15 candidates to 1 masked token instead of 2. (Blending the ends instead breaks equal ends.)
        return self.end if weight >= 1.0 else self.start + (self.end - self.start) * weight

    @property
    def final(self) -> float:
        """The rate the schedule settles on."""
        return self(self.warmup + self.steps)


def rate_schedule(masking, max_steps: int) -> RateSchedule:
    """The schedule a `MaskingConfig` describes for a run of `max_steps` optimizer steps."""
    end = masking.rate if masking.final_rate is None else masking.final_rate
    steps = masking.schedule_steps or max(max_steps - masking.warmup_steps, 1)
    return RateSchedule(masking.schedule, masking.rate, end, steps, masking.warmup_steps, masking.step_count)
