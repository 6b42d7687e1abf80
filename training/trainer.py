"""The training loop: steps, logging, evaluation, checkpoints, and the reasons to stop.

One optimizer step = `grad_accum` micro-batches of `batch_size` windows (shared out over the processes).
Every `eval_every` steps: validation loss, perplexity, bits per byte and a greedy sample, then RUN_DIR/best (on
a new best validation loss) and RUN_DIR/last, the latter with the state to resume from (task sft: loss on the
held-out answers, plus an `sft_eval` record scoring greedy answers; see training.sft_eval). The run stops at
`max_steps`, when the `max_time` budget is spent (counted from the start of `run`, planning and data preparation
included), when the validation loss reaches `target_loss`, or on `request_stop()` (SIGTERM/SIGINT): the current
step finishes, `last` is saved and the run ends "cancelled".

With `max_time`, time is reserved at the start for the final evaluation and checkpoints (estimated from a timed
forward pass and the model's size), so a run stopped by its budget ends inside it. Without `max_steps` the
learning rate then follows the elapsed training time (training.schedule), kept in the resume state so that a
resumed run continues the same schedule. All times come from `clock`, which tests replace with a fake one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pocketgpt.model.checkpoint import save_checkpoint
from pocketgpt.training import lora
from pocketgpt.training.config import TrainConfig
from pocketgpt.training.distributed import DistContext, any_true, grad_sync, max_over_ranks, mean_over_ranks
from pocketgpt.training.interrupt import Interrupted
from pocketgpt.training.metrics import METRICS_FILENAME, SFT_SCORES, MetricsWriter
from pocketgpt.training.progress import Progress
from pocketgpt.training.run import Run, build_run
from pocketgpt.training.schedule import TimeBudget
from pocketgpt.training.state import capture_rng
from pocketgpt.training.timebudget import MAX_RESERVE_SHARE, estimate_reserve, lr_for, start_budget
from pocketgpt.training.validation import EvalResult, validate


@dataclass
class RunResult:
    status: str  # "succeeded" | "cancelled"
    reason: str  # "max_steps" | "max_time" | "target_loss" | "signal"
    step: int
    best_val_loss: float | None
    best_path: str | None
    last_path: str | None


class Trainer:
    """Runs one training job described by a TrainConfig; rank 0 writes metrics, logs and checkpoints."""

    def __init__(
        self, cfg: TrainConfig, ctx: DistContext | None = None,
        metrics: MetricsWriter | None = None, progress: Progress | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.plan: dict[str, Any] | None = None  # the planner's table (training.planner), when it chose the shape
        self.budget: TimeBudget | None = None  # the time schedule's state, with max_time and no max_steps
        self.reserve_s = 0.0  # seconds kept at the end of a max_time budget for the final evaluation and saves
        self.step_s = 0.0  # duration of the last optimizer step
        self.ctx = ctx or DistContext()
        main = self.ctx.is_main
        self.metrics = metrics or MetricsWriter(Path(cfg.out) / METRICS_FILENAME if main else None)
        self.progress = progress or Progress(enabled=main)
        self.stop_signal: int | None = None
        self._stop = False
        self._preparing = False

    def request_stop(self, signum: int | None = None) -> None:
        """Stop after the current step (safe to call from a signal handler). A signal that arrives while the run
        is still being prepared (data, tokenizer, model: nothing to save yet) stops it at once: this raises
        Interrupted, in the signal handler, so it surfaces in whatever the main thread was doing."""
        self.stop_signal, self._stop = signum, True
        if self._preparing and signum is not None:
            raise Interrupted(signum)

    def release(self) -> None:
        """Drop the model, optimizer and data (the process group must outlive a DDP model: see
        training.distributed.shutdown)."""
        self.__dict__.pop("run_state", None)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.run_state.tokens_per_row

    def run(self) -> RunResult:
        """Train until a stop condition; returns how it ended."""
        self.t_start = self.clock()
        self._preparing = True
        try:
            if self.cfg.planned:
                from pocketgpt.training.autoplan import plan_run  # torch-side glue of the planner

                self.cfg, self.plan = plan_run(self.cfg, self.ctx, self.progress.info)
            elif self.cfg.resume:
                self.plan = _saved_plan(self.cfg.resume)
            self.run_state: Run = build_run(self.cfg, self.ctx, self.progress.info)
        finally:
            self._preparing = False
        self.prep_s = self.clock() - self.t_start
        if self.cfg.max_time is not None:
            self.progress.info(f"planning and data preparation took {self.prep_s:.1f} s of the "
                               f"{self.cfg.max_time:g} s budget")
        try:
            return self._loop()
        finally:
            self.progress.close()

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> RunResult:
        cfg, r = self.cfg, self.run_state
        self._announce()
        step = r.start_step
        self.last_eval: tuple[int, EvalResult] | None = None
        self.saved_step: int | None = r.start_step if cfg.resume else None
        self.train_loss: float | None = None
        self._start_budget()
        limit = cfg.step_limit
        t_loop = t_prev = self.clock()
        last_log = (t_loop, step)
        self.progress.begin(limit, step)
        target_hit, reason = False, None
        while reason is None:
            now = self.clock()
            if self.budget is not None:  # training time, periodic evaluations included; every rank agrees
                self.budget.elapsed_s = max_over_ranks(self.budget.elapsed_s + now - t_prev, self.ctx, r.device)
            t_prev = now
            stop, time_up, target_hit = any_true([self._stop, self._time_up(now), target_hit], self.ctx, r.device)
            reason = (
                "max_steps" if limit is not None and step >= limit else "target_loss" if target_hit
                else "signal" if stop else "max_time" if time_up else None
            )
            if reason:
                break
            t_step = self.clock()
            loss = self._train_step(step)
            self.step_s = self.clock() - t_step
            step += 1
            r.tokens_seen += self.tokens_per_step
            self.progress.step()
            # The first step is logged too, so that a slow CPU shows progress (and a loss) within seconds.
            if step % cfg.log_every == 0 or step == r.start_step + 1:
                last_log = self._log(step, loss, last_log, t_loop)
            if step % cfg.eval_every == 0 and self.ctx.is_main:
                target_hit = self._evaluate_and_save(step, loss)
        return self._finish(step, reason)

    # -- time budget (training.timebudget) ----------------------------------------------------------
    def _start_budget(self) -> None:
        """Reserve time for the final evaluation and saves; set up (or resume) the time schedule."""
        cfg, r = self.cfg, self.run_state
        if cfg.max_time is None:
            return
        estimate = estimate_reserve(r.model, cfg, r.device, self.clock, self._autocast)
        self.reserve_s = min(MAX_RESERVE_SHARE * cfg.max_time, max_over_ranks(estimate, self.ctx, r.device))
        self.budget, self.step_s = start_budget(cfg, self.prep_s, self.reserve_s, r.schedule_state)
        self.progress.info(
            f"time budget {cfg.max_time:g} s: {self.prep_s:.1f} s spent before training, {self.reserve_s:.1f} s "
            f"kept for the final evaluation and checkpoints"
            + (f"; the learning rate follows the remaining {self.budget.remaining_s:.1f} s of training "
               f"({cfg.time_schedule})" if self.budget else "")
        )

    def _time_up(self, now: float) -> bool:
        if self.budget is not None:
            return self.budget.done
        return self.cfg.max_time is not None and now - self.t_start >= self.cfg.max_time - self.reserve_s

    def _train_step(self, step: int) -> torch.Tensor:
        cfg, r = self.cfg, self.run_state
        lr = lr_for(cfg, step, self.budget, self.step_s)
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=r.device)
        for micro in range(cfg.grad_accum):
            x, y = (t.to(r.device, non_blocking=True) for t in r.sampler.next_batch())
            with grad_sync(r.train_model, sync=micro == cfg.grad_accum - 1):
                with self._autocast():
                    _, loss = r.train_model(x, y)
                (loss / cfg.grad_accum).backward()
            total += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(r.model.parameters(), cfg.grad_clip)
        r.optimizer.step()
        r.optimizer.zero_grad(set_to_none=True)
        return total / cfg.grad_accum

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.run_state.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # fp32 on CPU: exact, and bf16 matmuls are slow there

    def _log(self, step: int, loss: torch.Tensor, last: tuple[float, int], t_loop: float) -> tuple[float, int]:
        cfg = self.cfg
        self.train_loss = float(mean_over_ranks(loss, self.ctx).item())
        if not math.isfinite(self.train_loss):
            raise RuntimeError(f"training diverged: the loss is {self.train_loss} at step {step}; lower --lr")
        now = self.clock()
        tokens_per_s = (step - last[1]) * self.tokens_per_step / max(now - last[0], 1e-9)
        limit = cfg.step_limit
        eta = math.inf if limit is None else (limit - step) * (now - t_loop) / max(step - self.run_state.start_step, 1)
        if self.budget is not None:
            eta = min(eta, self.budget.remaining_s + self.reserve_s)
        elif cfg.max_time is not None:
            eta = min(eta, max(0.0, cfg.max_time - (now - self.t_start)))
        lr = self.run_state.optimizer.param_groups[0]["lr"]
        self.metrics.write(
            "train", step=step, total_steps=limit, loss=self.train_loss, lr=lr,
            tokens_per_s=tokens_per_s, elapsed_s=now - self.t_start, eta_s=eta,
            tokens_seen=self.run_state.tokens_seen,
        )
        self.progress.report(step, limit, self.train_loss, lr, tokens_per_s, eta)
        return now, step

    def _finish(self, step: int, reason: str) -> RunResult:
        cfg, r = self.cfg, self.run_state
        if self.ctx.is_main:
            # A cancel should exit promptly, so it skips the final evaluation; other endings evaluate.
            if reason != "signal" and (self.last_eval is None or self.last_eval[0] != step):
                self._evaluate_and_save(step, None)
            if self.saved_step != step:
                self._save("last", step, self.last_eval[1] if self.last_eval else None)
        best = Path(cfg.out) / "best"
        result = RunResult(
            status="cancelled" if reason == "signal" else "succeeded", reason=reason, step=step,
            best_val_loss=r.best_val_loss, best_path=str(best) if best.exists() else None,
            last_path=str(Path(cfg.out) / "last"),
        )
        self.metrics.write(
            "end", status=result.status, step=step, reason=reason, best_val_loss=result.best_val_loss,
            best_path=result.best_path, last_path=result.last_path,
        )
        self.progress.info(f"{result.status} at step {step} ({reason}); best val loss {result.best_val_loss}")
        return result

    def _announce(self) -> None:
        cfg, r = self.cfg, self.run_state
        m = r.model.config
        self.progress.info(
            f"model: {r.model.num_params():,} parameters ({m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, "
            f"context {m.block_size}, vocab {m.vocab_size}) on {r.device}"
            f"{self._lora_note()}"
            f"{f' x {self.ctx.world_size} processes' if self.ctx.enabled else ''}\n"
            f"tokens per step: {self.tokens_per_step:,} ({cfg.batch_size} x {cfg.grad_accum} x {r.tokens_per_row})"
            f"{f'; resuming from step {r.start_step}' if cfg.resume else ''}"
        )
        self.metrics.start(
            total_steps=cfg.step_limit, params=r.model.num_params(), tokens_per_step=self.tokens_per_step,
            resumed_from_step=r.start_step if cfg.resume else None, preset=r.preset, run_dir=str(cfg.out),
        )
        if self.plan is not None and not cfg.resume:
            self.metrics.write("plan", rows=self.plan["rows"])

    def _lora_note(self) -> str:
        spec = self.run_state.lora
        if spec is None:
            return ""
        trainable = sum(p.numel() for p in self.run_state.model.parameters() if p.requires_grad)
        return f"; LoRA r={spec.r} alpha={spec.alpha:g} on {','.join(spec.targets)}: {trainable:,} trainable"

    # -- evaluation and checkpoints (rank 0) ---------------------------------------------------------
    def evaluate(self) -> EvalResult:
        """The validation loss, perplexity, bits per byte and greedy sample of the model as it is now."""
        return validate(self.run_state, self.cfg, self._autocast)

    def _evaluate_and_save(self, step: int, loss: torch.Tensor | None) -> bool:
        """Evaluate, save best (if it is) and last; returns whether the target loss is reached."""
        r = self.run_state
        if loss is not None:
            self.train_loss = float(loss.item())
        ev = self.evaluate()
        self.last_eval = (step, ev)
        is_best = r.best_val_loss is None or ev.loss < r.best_val_loss
        if is_best:
            r.best_val_loss = ev.loss
        self.metrics.write(
            "eval", step=step, val_loss=ev.loss, val_ppl=ev.ppl, val_bpb=ev.bpb, sample=ev.sample, best=is_best
        )
        bpb = "?" if ev.bpb is None else f"{ev.bpb:.3f}"
        self.progress.info(f"step {step}: val loss {ev.loss:.4f} | ppl {ev.ppl:.2f} | {bpb} bits/byte"
                           f"{' (best)' if is_best else ''}\n  sample: {ev.sample[:200]!r}")
        if ev.scores is not None:
            s = ev.scores
            self.metrics.write("sft_eval", step=step, **{k: s[k] for k in SFT_SCORES})
            self.progress.info(f"  held-out answers: exact match {s['exact_match']:.1f}% | BLEU {s['bleu']:.1f} | "
                               f"ROUGE-L {s['rougeL']:.1f} ({s['scored']} scored)")
        if is_best:
            self._save("best", step, ev)
        self._save("last", step, ev)
        return self.cfg.target_loss is not None and ev.loss <= self.cfg.target_loss

    def _save(self, kind: str, step: int, ev: EvalResult | None) -> None:
        r, cfg = self.run_state, self.cfg
        path = Path(cfg.out) / kind
        meta: dict[str, Any] = {
            "kind": kind, "step": step, "tokens_seen": r.tokens_seen, "train_loss": self.train_loss,
            "val_loss": ev.loss if ev else None, "val_bpb": ev.bpb if ev else None,
            "config": cfg.model_dump(), "data_fingerprint": r.data.meta["fingerprint"],
        }
        model, extra = r.model, None
        if r.lora is not None:  # a normal checkpoint: the adapters merged into the weights
            model = lora.merged(r.model)
            meta["lora"] = {"r": r.lora.r, "alpha": r.lora.alpha, "targets": list(r.lora.targets)}
            if cfg.save_adapter:
                extra = lora.adapter_files(r.model, r.lora, cfg.init_from)
        if self.plan is not None:
            meta["plan"] = self.plan
        save_checkpoint(path, model, r.tokenizer, meta, self._train_state(step) if kind == "last" else None,
                        chat_template=r.chat_template, extra_files=extra)
        if kind == "last":
            self.saved_step = step
        self.metrics.write("checkpoint", step=step, path=str(path), kind=kind)

    def _train_state(self, step: int) -> dict[str, Any]:
        r = self.run_state
        return {
            "step": step, "tokens_seen": r.tokens_seen, "best_val_loss": r.best_val_loss,
            "optimizer": r.optimizer.state_dict(), "sampler": r.sampler.state_dict(), "rng": capture_rng(),
            "world_size": self.ctx.world_size,
            **({"lora": lora.adapter_state(r.model)} if r.lora is not None else {}),
            "schedule": None if self.budget is None else {
                **self.budget.state_dict(), "max_time": self.cfg.max_time, "step_s": self.step_s},
        }


def _saved_plan(run_dir: str) -> dict[str, Any] | None:
    """The plan recorded in a run's last checkpoint, carried over to the checkpoints of its resumption."""
    from pocketgpt.model.checkpoint import CheckpointError, read_meta

    try:
        plan = read_meta(Path(run_dir) / "last").get("plan")
    except CheckpointError:
        return None
    return plan if isinstance(plan, dict) else None
