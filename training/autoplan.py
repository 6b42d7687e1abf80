"""Apply the planner (training.planner) to a run: survey the corpus, probe this machine, print and return the plan.

The probe trains two or three candidate shapes on random tokens for a moment each and measures tokens/s, in
at most 3% of the budget (1.5 to 6 s) in all: a shape whose step would not fit in what is left is estimated
from the FLOP rate of the ones measured instead. Under torchrun, rank 0 probes and sends the plan to the
others, so every process builds the same model.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch

from pocketgpt.model.config import ModelConfig
from pocketgpt.model.gpt import GPT
from pocketgpt.training.config import TrainConfig, validate_config
from pocketgpt.training.distributed import DistContext, pick_device
from pocketgpt.training.optim import OptimizerName, make_optimizer
from pocketgpt.training.planner import (
    PLANNED_FIELDS,
    PlanInputs,
    Shape,
    apply_overrides,
    capped_vocab,
    cjk_vocab_for,
    detect_script,
    estimate_tokens_per_s,
    first_guess,
    ladder,
    make_plan,
    vocab_for,
)
from pocketgpt.training.sources import ReadStats, expand_sources, iter_documents

SAMPLE_CHARS = 1_000_000


def survey(data: list[str], budget_s: float | None, device: str) -> PlanInputs:
    """Corpus size (bytes on disk) and script (from its first ~1M characters)."""
    files = expand_sources(data)
    corpus_bytes = sum(f.path.stat().st_size for f in files)
    parts, size = [], 0
    for doc in iter_documents(files, ReadStats()):
        parts.append(doc[: SAMPLE_CHARS - size])
        size += len(parts[-1])
        if size >= SAMPLE_CHARS:
            break
    sample = "".join(parts)
    script = detect_script(sample)
    return PlanInputs(corpus_bytes=corpus_bytes, script=script, budget_s=budget_s, device=device,
                      cjk_vocab=cjk_vocab_for(sample) if script == "cjk" else None)


def probe_shape(shape: Shape, vocab: int, device: torch.device, seconds: float, limit: float | None = None,
                optimizer: OptimizerName = "adamw") -> float:
    """Training tokens/s of `shape` on random tokens: one untimed step, then steps for about `seconds`.

    The first step also allocates and is slower, so at least one more step is timed unless the first alone
    took half of `limit` (the time left for probing).
    """
    import time

    cfg = ModelConfig(vocab_size=vocab, n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                      block_size=shape.block_size)
    gen = torch.Generator().manual_seed(0)  # its own generator: the run's seeded streams stay untouched
    state = torch.get_rng_state()
    model = GPT(cfg).to(device).train()
    torch.set_rng_state(state)
    opt = make_optimizer(model, 1e-3, 0.1, device.type, optimizer)
    data = torch.randint(vocab, (shape.batch_size, shape.block_size + 1), generator=gen).to(device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def step() -> None:
        if autocast is not None:
            with autocast:
                _, loss = model(x, y)
        else:
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    tokens = shape.batch_size * shape.block_size
    t0 = time.perf_counter()
    step()  # the first step also allocates: timed, but only used when there is no time for another
    sync()
    warm = time.perf_counter() - t0
    if warm >= 0.5 * (limit if limit is not None else seconds):
        return tokens / warm
    t0, n = time.perf_counter(), 0
    while n < 1 or (time.perf_counter() - t0 < seconds and n < 50):
        step()
        n += 1
        sync()
    return n * tokens / (time.perf_counter() - t0)


def probe(inputs: PlanInputs, vocab: int, device: torch.device, log: Callable[[str], None],
          optimizer: OptimizerName = "adamw") -> dict[str, float]:
    """Tokens/s of the first-guess shape and its neighbours on the ladder, smallest first, within an allowance."""
    import time

    shapes = ladder(inputs.device)
    guess = first_guess(inputs, vocab)
    allowance = min(6.0, max(1.5, 0.03 * (inputs.budget_s or 600.0)))
    t_begin, measured = time.perf_counter(), {}
    for i in sorted({max(0, guess - 1), guess, min(len(shapes) - 1, guess + 1)}):
        shape, left = shapes[i], allowance - (time.perf_counter() - t_begin)
        if measured:
            tps = estimate_tokens_per_s(shapes, vocab, measured, inputs.script)[shape.key]
            step_s = shape.batch_size * shape.block_size / tps
            if step_s > left:
                log(f"probe: {shape.key} left out (a step would take ~{step_s:.1f} s), estimated from the others")
                break
        # with the head it will train with: a CJK vocabulary before the width cap made the probe 2x too slow
        head = capped_vocab(inputs.script, vocab, shape.n_embd)
        measured[shape.key] = probe_shape(shape, head, device, max(0.2, left / 3), limit=left, optimizer=optimizer)
        log(f"probe: {shape.key} (context {shape.block_size}) trains at {measured[shape.key]:,.0f} tok/s")
    return measured


def render(plan: dict[str, Any]) -> str:
    """The plan as one table (rich), as plain text."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="training plan (a flag overrides any row)", title_justify="left")
    for col in ("setting", "value", "why"):
        table.add_column(col, overflow="fold")
    for row in plan["rows"]:
        table.add_row(row["name"], str(row["value"]), row["why"])
    buf = io.StringIO()
    Console(file=buf, width=140, color_system=None, soft_wrap=False).print(table)
    return buf.getvalue().rstrip()


def plan_run(cfg: TrainConfig, ctx: DistContext, log: Callable[[str], None]) -> tuple[TrainConfig, dict[str, Any]]:
    """The config with the plan's values where no flag was given, and the plan (printed via `log`)."""
    device = pick_device(cfg.device, ctx)
    plan: dict[str, Any] | None = None
    if ctx.is_main:
        inputs = survey(cfg.data, cfg.max_time, device.type)
        vocab = vocab_for(inputs)[0]
        measured = probe(inputs, vocab, device, log, cfg.optimizer)
        tps = estimate_tokens_per_s(ladder(inputs.device), vocab, measured, inputs.script)
        plan = make_plan(inputs, tps, probe_note="probe:")
        given = {k: getattr(cfg, k) for k in cfg.model_fields_set if k in PLANNED_FIELDS}
        plan = apply_overrides(plan, given)
    if ctx.enabled:
        import torch.distributed as dist

        box = [plan]
        dist.broadcast_object_list(box, src=0)  # our own dict between our own processes
        plan = box[0]
    if plan is None:  # rank 0 always sends one
        raise RuntimeError("the planner's broadcast brought no plan")
    log(render(plan))
    return validate_config({**cfg.model_dump(), **plan["values"]}), plan
