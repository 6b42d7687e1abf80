"""Validation during training: loss, perplexity and bits per byte on the held-out split, and a greedy sample.

Language modelling scores fixed, evenly spread windows of the validation tokens (the same windows at every
evaluation, so the numbers compare across steps); bits per byte divides the loss by the split's bytes per token.
Task sft scores the held-out answers instead (training.sft_eval).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pocketgpt.model.generate import generate
from pocketgpt.model.sampling import SamplingParams
from pocketgpt.training.config import TrainConfig
from pocketgpt.training.run import Run
from pocketgpt.training.sampler import eval_windows, windows_at


@dataclass
class EvalResult:
    loss: float
    ppl: float
    bpb: float | None
    sample: str
    scores: dict[str, Any] | None = None  # task sft: exact match, BLEU and ROUGE of held-out answers


@torch.no_grad()
def validate(run: Run, cfg: TrainConfig, autocast: Callable[[], contextlib.AbstractContextManager]) -> EvalResult:
    """Evaluate `run`'s model on its validation split (leaving it in training mode)."""
    if cfg.task == "sft":
        from pocketgpt.training.sft_eval import evaluate_sft

        ev = evaluate_sft(run.model, run.tokenizer, run.data.val, cfg.batch_size, run.device, autocast)
        run.model.train()
        return EvalResult(loss=ev.loss, ppl=math.exp(min(ev.loss, 700.0)), bpb=ev.bpb, sample=ev.sample,
                          scores=ev.scores)
    model, T = run.model, run.model.config.block_size
    model.eval()
    starts = eval_windows(run.data.val, T, cfg.eval_batches * cfg.batch_size)
    total = 0.0
    for i in range(0, len(starts), cfg.batch_size):
        x, y = windows_at(run.data.val, starts[i : i + cfg.batch_size], T)
        with autocast():
            _, loss = model(x.to(run.device), y.to(run.device))
        total += float(loss) * len(x)
    loss = total / len(starts)
    sample = greedy_sample(run, cfg.sample_tokens)
    model.train()
    bpb = loss / (math.log(2) * run.data.val_bytes_per_token)
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 700.0)), bpb=bpb, sample=sample)


def greedy_sample(run: Run, n_tokens: int) -> str:
    """The start of the validation split and the model's greedy continuation of it, as text."""
    T = run.model.config.block_size
    prompt = [int(t) for t in run.data.val[: min(16, T // 2)]]
    n_new = min(n_tokens, T - len(prompt))
    if n_new <= 0 or not prompt:
        return ""
    out = generate(run.model, prompt, n_new, params=SamplingParams(temperature=0.0))
    return run.tokenizer.decode(prompt + out)
