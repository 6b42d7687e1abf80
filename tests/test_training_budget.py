"""The time-budget schedule, with a fake clock: every model forward pass costs FWD_S fake seconds."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from pocketgpt.model.checkpoint import load_checkpoint, load_train_state
from pocketgpt.model.gpt import GPT
from pocketgpt.training.config import TrainConfig
from pocketgpt.training.metrics import read_metrics
from pocketgpt.training.progress import Progress
from pocketgpt.training.schedule import lr_at_fraction
from pocketgpt.training.trainer import Trainer
from tests.test_training_data import write_corpus

FWD_S = 0.5  # fake seconds per forward pass: a training step, an evaluation batch
LR, MIN_LR = 1e-2, 1e-4
SETTINGS = {
    "preset": "tiny", "block_size": 16, "batch_size": 4, "tokenizer_vocab": 300, "device": "cpu", "max_time": 20.0,
    "lr": LR, "min_lr": MIN_LR, "warmup_frac": 0.2, "decay_frac": 0.4, "eval_every": 10_000, "eval_batches": 2,
    "log_every": 1, "sample_tokens": 0,
}


class FakeClock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    forward = GPT.forward

    def timed_forward(self, *args, **kwargs):
        fake.now += FWD_S
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", timed_forward)
    return fake


def config(tmp_path: Path, out: str, **overrides) -> TrainConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus, 800)
    return TrainConfig(data=[str(corpus)], out=str(tmp_path / out), data_dir=str(tmp_path / "prepared"),
                       **{**SETTINGS, **overrides})


def lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if r["type"] == "train"}


def test_lr_at_0_50_and_100_percent_of_the_budget() -> None:
    kw = {"lr": 1.0, "min_lr": 0.1, "warmup_frac": 0.05, "decay_frac": 0.3}
    assert lr_at_fraction(0.0, **kw) == pytest.approx(0.01)  # warm-up starts at 1% of the peak
    assert lr_at_fraction(0.025, **kw) == pytest.approx(0.5)
    assert lr_at_fraction(0.5, **kw) == 1.0  # stable
    assert lr_at_fraction(0.85, **kw) == pytest.approx(0.55)  # halfway down the decay
    assert lr_at_fraction(1.0, **kw) == lr_at_fraction(1.5, **kw) == 0.1
    assert lr_at_fraction(0.5, **kw, shape="cosine") == pytest.approx(0.1 + 0.45 * (1 + torch.cos(
        torch.tensor(torch.pi * 0.45 / 0.95)).item()))
    assert lr_at_fraction(1.0, **kw, shape="cosine") == pytest.approx(0.1)


def test_budget_stopped_run_ends_at_min_lr_with_final_eval_and_checkpoints(tmp_path: Path, clock: FakeClock) -> None:
    cfg = config(tmp_path, "run")
    trainer = Trainer(cfg, progress=Progress(interactive=False), clock=clock)
    result = trainer.run()
    assert (result.status, result.reason) == ("succeeded", "max_time")
    # Everything, the final evaluation included, fits in the 20 (fake) seconds.
    assert clock.now <= cfg.max_time
    assert trainer.reserve_s >= FWD_S * (cfg.eval_batches + 1)
    steps = lrs(tmp_path / "run")
    assert sorted(steps) == list(range(1, result.step + 1)) and result.step >= 25
    # 0%: warm-up from 1% of the peak; 50%: the peak; 100%: min_lr on the last step.
    assert steps[1] == pytest.approx(LR * 0.01)
    assert steps[result.step // 2] == pytest.approx(LR)
    assert steps[result.step] == pytest.approx(MIN_LR)
    tail = [steps[s] for s in range(result.step // 2, result.step + 1)]
    assert all(a >= b for a, b in itertools.pairwise(tail))  # stable, then decaying
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in records if r["type"] == "eval"]
    assert [e["step"] for e in evals] == [result.step]  # the final evaluation
    assert records[0]["total_steps"] is None and records[-1]["reason"] == "max_time"
    for kind in ("best", "last"):
        assert load_checkpoint(tmp_path / "run" / kind).meta["step"] == result.step
    state = load_train_state(tmp_path / "run" / "last")["schedule"]
    assert state["elapsed_s"] >= state["budget_s"] and state["max_time"] == cfg.max_time


def test_max_steps_keeps_the_step_schedule_and_time_stays_a_hard_stop(tmp_path: Path, clock: FakeClock) -> None:
    result = Trainer(config(tmp_path, "steps", max_steps=12, warmup_steps=4), progress=Progress(interactive=False),
                     clock=clock).run()
    assert (result.reason, result.step) == ("max_steps", 12)
    steps = lrs(tmp_path / "steps")
    assert steps[4] == pytest.approx(LR) and steps[12] > MIN_LR  # the cosine over 12 steps, not the time
    result = Trainer(config(tmp_path, "both", max_steps=1000, max_time=10.0, overwrite=True),
                     progress=Progress(interactive=False), clock=clock).run()
    assert result.reason == "max_time" and result.step < 20


def test_resume_continues_the_same_time_schedule(tmp_path: Path, clock: FakeClock) -> None:
    Trainer(config(tmp_path, "a"), progress=Progress(interactive=False), clock=clock).run()

    class StopAfter(Progress):  # a SIGTERM arriving during step 25, in the decay
        def step(self) -> None:
            self.count = getattr(self, "count", 0) + 1
            if self.count == 25:
                first.request_stop()

    clock.now = 0.0
    first = Trainer(config(tmp_path, "b"), progress=StopAfter(interactive=False), clock=clock)
    assert first.run().reason == "signal"
    clock.now = 5000.0  # a later process: absolute times differ, elapsed training time carries over
    resumed = TrainConfig(**{**config(tmp_path, "b").model_dump(), "resume": str(tmp_path / "b")})
    result = Trainer(resumed, progress=Progress(interactive=False), clock=clock).run()
    assert result.reason == "max_time"
    a, b = lrs(tmp_path / "a"), lrs(tmp_path / "b")
    assert sorted(b) == sorted(a)
    assert max(abs(a[s] - b[s]) for s in a) < 1e-12
