"""The `--max-time` side of the training loop: time kept for the end, and the time schedule's state at the start.

training.schedule holds the schedules themselves (pure functions); this module measures and decides what they
need: how long the final evaluation and checkpoints will take (from a timed forward pass), and the training
time the schedule spans, fresh or carried over a resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from pocketgpt.model.gpt import GPT
from pocketgpt.training.config import TrainConfig
from pocketgpt.training.schedule import TimeBudget, lr_at, lr_at_fraction

MAX_RESERVE_SHARE = 0.3  # an overloaded machine can estimate more than the whole budget: train anyway


def estimate_reserve(model: GPT, cfg: TrainConfig, device: torch.device, clock: Callable[[], float],
                     autocast: Callable[[], contextlib.AbstractContextManager]) -> float:
    """Seconds the final evaluation, checkpoints and one overrunning step take, from a timed forward pass.

    An evaluation is `eval_batches` forward passes of a batch; a step about three (forward and backward).
    Checkpoints: best (weights) and last (weights and two AdamW moments) written at ~100 MB/s, a slow disk.
    """
    gen = torch.Generator().manual_seed(0)  # its own generator: the run's random streams stay untouched
    x = torch.randint(model.config.vocab_size, (cfg.batch_size, model.config.block_size), generator=gen).to(device)
    model.eval()
    with torch.no_grad(), autocast():
        model(x)  # first call: allocations and kernel selection
        t0 = clock()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        fwd_s = clock() - t0
    model.train()
    eval_s = fwd_s * cfg.eval_batches  # rank 0 evaluates alone, whole batches
    sample_s = fwd_s * cfg.sample_tokens / 8  # greedy decoding with the KV cache: one token at a time
    save_s = 0.2 + model.num_params() * 4 * 4 / 100e6
    return 1.25 * (eval_s + sample_s + save_s) + 4 * fwd_s + 0.25


def start_budget(cfg: TrainConfig, prep_s: float, reserve_s: float,
                 saved: dict[str, Any] | None) -> tuple[TimeBudget | None, float]:
    """(the time schedule's budget, the last step's duration) for a run; None without a time schedule.

    A resumed run continues the saved schedule; resumed with a different --max-time, it gets that much more
    training time on top of what it has used.
    """
    if not cfg.time_scheduled:
        return None, 0.0
    available = max(0.0, (cfg.max_time or 0.0) - prep_s - reserve_s)
    if saved is None:
        return TimeBudget(budget_s=available), 0.0
    step_s = saved.get("step_s", 0.0)  # the next step's LR looks this far ahead
    if saved.get("max_time") == cfg.max_time:
        return TimeBudget(budget_s=saved["budget_s"], elapsed_s=saved["elapsed_s"]), step_s
    return TimeBudget(budget_s=saved["elapsed_s"] + available, elapsed_s=saved["elapsed_s"]), step_s


def lr_for(cfg: TrainConfig, step: int, budget: TimeBudget | None, step_s: float) -> float:
    """The learning rate of optimizer step `step`: by the time budget when there is one, else by steps."""
    if budget is None:
        return lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.step_limit or 0)
    # Where in the budget this step will end: the last step then runs at min_lr.
    frac = (budget.elapsed_s + step_s) / max(budget.budget_s, 1e-9)
    return lr_at_fraction(frac, lr=cfg.lr, min_lr=cfg.min_lr, warmup_frac=cfg.warmup_frac,
                          decay_frac=cfg.decay_frac, shape=cfg.time_schedule)
