"""Learning-rate schedules.

- By steps (`--max-steps`): linear warmup, then cosine decay to min_lr at max_steps.
- By time (`--max-time` without `--max-steps`): a function of the fraction of the training-time budget used,
  so that the decay ends when the time does however fast the machine is. `wsd` (warmup-stable-decay): a linear
  warm-up over the first `warmup_frac`, the peak until the last `decay_frac`, then a linear decay to min_lr;
  `cosine`: the same warm-up, then a cosine to min_lr over the rest.

Both are pure functions (of the step, or of the fraction), so resuming needs only the step count or the
elapsed training time to restore the schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for the optimizer step with 0-based index `step` (the step schedule)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_at_fraction(frac: float, *, lr: float, min_lr: float, warmup_frac: float, decay_frac: float,
                   shape: str = "wsd") -> float:
    """Learning rate when the fraction `frac` (0..1) of the time budget is used (the time schedule).

    The warm-up starts at 1% of the peak rather than 0, so that the very first step already learns.
    """
    frac = max(frac, 0.0)
    if frac >= 1.0:
        return min_lr
    if frac < warmup_frac:
        return lr * max(frac / warmup_frac, 0.01)
    if shape == "cosine":
        progress = (frac - warmup_frac) / max(1e-9, 1.0 - warmup_frac)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    decay_start = 1.0 - decay_frac
    if frac < decay_start or decay_frac <= 0:
        return lr
    return lr + (min_lr - lr) * (frac - decay_start) / decay_frac


@dataclass
class TimeBudget:
    """The training-time side of a `--max-time` run: how much of it the schedule spans and how much is used.

    `budget_s` is the training time the schedule spans: the run's max_time less the time spent before the loop
    (data preparation, planning) and the time reserved for the final evaluation and checkpoints.
    `elapsed_s` counts training time only, and carries over a resume, so the schedule continues where it was.
    """

    budget_s: float
    elapsed_s: float = 0.0

    @property
    def fraction(self) -> float:
        return 1.0 if self.budget_s <= 0 else min(1.0, self.elapsed_s / self.budget_s)

    @property
    def done(self) -> bool:
        return self.elapsed_s >= self.budget_s

    @property
    def remaining_s(self) -> float:
        return max(0.0, self.budget_s - self.elapsed_s)

    def state_dict(self) -> dict[str, float]:
        return {"budget_s": self.budget_s, "elapsed_s": self.elapsed_s}
