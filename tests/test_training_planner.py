"""The auto-configuration planner: its rules (pure arithmetic), its flags, and the plan in a run's meta.json."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.training import autoplan
from pocketgpt.training.cli import main
from pocketgpt.training.config import TrainConfig
from pocketgpt.training.metrics import RECORD_FIELDS, read_metrics
from pocketgpt.training.planner import (
    BASE_LR,
    CPU_LADDER,
    GPU_LADDER,
    PLANNED_FIELDS,
    PlanInputs,
    Shape,
    apply_overrides,
    capped_vocab,
    cjk_vocab_for,
    detect_script,
    estimate_tokens_per_s,
    make_plan,
)
from tests.conftest import CHINESE, CODE, ENGLISH
from tests.test_training_data import write_corpus


def flat_rate(ladder: tuple[Shape, ...], vocab: int, flops: float) -> dict[str, float]:
    """Tokens/s of every shape on a machine doing `flops` FLOP/s."""
    return {s.key: flops / s.flops_per_token(vocab) for s in ladder}


def plan_for(corpus_bytes: int, budget: float | None = 130.0, script: str = "latin", device: str = "cpu",
             flops: float = 4e9, cjk_vocab: int | None = None) -> dict:
    inputs = PlanInputs(corpus_bytes=corpus_bytes, script=script, budget_s=budget, device=device,
                        cjk_vocab=cjk_vocab)
    return make_plan(inputs, flat_rate(GPU_LADDER if device == "cuda" else CPU_LADDER, 1024, flops))


def test_script_detection_by_character_classes() -> None:
    assert detect_script(ENGLISH * 20) == "latin"
    assert detect_script(CHINESE * 20) == "cjk"
    assert detect_script(CODE * 20) == "code"
    assert detect_script("") == "latin"


def test_smaller_vocabulary_for_a_small_corpus_than_a_large_one() -> None:
    small, large = plan_for(50_000, budget=3600), plan_for(20_000_000, budget=3600)
    assert small["values"]["tokenizer_vocab"] < large["values"]["tokenizer_vocab"]
    assert small["values"]["tokenizer_vocab"] == 512  # 8 types per kB: 400 -> the floor
    assert plan_for(200_000)["values"]["tokenizer_vocab"] == 2048
    assert plan_for(1_000_000)["values"]["tokenizer_vocab"] == 8192


def test_bigger_budget_or_faster_machine_gets_a_bigger_model() -> None:
    def body(plan: dict) -> int:
        v = plan["values"]
        return Shape(v["n_layer"], v["n_head"], v["n_embd"], v["block_size"], v["batch_size"]).body_params()

    assert body(plan_for(10_000_000, budget=60)) < body(plan_for(10_000_000, budget=3600))
    assert body(plan_for(10_000_000, flops=1e9)) < body(plan_for(10_000_000, flops=1e12))
    gpu = plan_for(10_000_000, budget=600, device="cuda", flops=1e13)
    assert gpu["values"]["n_embd"] >= 384 and gpu["values"]["batch_size"] >= 32


def test_cjk_gets_whole_character_vocabulary() -> None:
    # 2,000 distinct characters in a Zipf-like mix: the vocabulary must hold the common ones whole.
    chars = [chr(0x4E00 + i) for i in range(2000)]
    text = "".join(c * max(1, 400 // (i + 1)) for i, c in enumerate(chars))
    need = cjk_vocab_for(text)
    assert 1000 < need < 2000 + 400
    # A model wide enough keeps every common character whole; a narrow one gets a smaller, capped table.
    wide = plan_for(3_000_000, budget=3600, script="cjk", cjk_vocab=need, flops=1e12)
    assert wide["values"]["n_embd"] >= 256 and wide["values"]["tokenizer_vocab"] >= need
    assert "CJK" in next(r["why"] for r in wide["rows"] if r["name"] == "tokenizer_vocab")
    # A narrow model (2x96 at 60 s on a slow machine) gets at most 32 types per dimension of an 8,000-character need.
    narrow = plan_for(3_000_000, budget=60, script="cjk", cjk_vocab=8000, flops=1e9)
    assert narrow["values"]["n_embd"] == 96 and narrow["values"]["tokenizer_vocab"] == 4096
    assert "capped at 32 per dimension" in next(r["why"] for r in narrow["rows"] if r["name"] == "tokenizer_vocab")


def test_every_planned_value_is_overridden_by_its_flag() -> None:
    plan = plan_for(1_000_000)
    given = {"tokenizer_vocab": 777, "n_layer": 3, "n_head": 2, "n_embd": 64, "block_size": 40, "batch_size": 5,
             "lr": 0.0123, "min_lr": 0.00012, "dropout": 0.25, "eval_batches": 3}
    assert set(given) == set(PLANNED_FIELDS)
    for name, value in given.items():
        one = apply_overrides(plan, {name: value})
        assert one["values"][name] == value
        row = next(r for r in one["rows"] if r["name"] == name)
        assert row["value"] == value and "given" in row["why"]
        assert {k: v for k, v in one["values"].items() if k not in (name, "n_head")} == \
               {k: v for k, v in plan["values"].items() if k not in (name, "n_head")}
    # A width alone keeps the heads valid.
    assert apply_overrides(plan, {"n_embd": 160})["values"]["n_head"] == 5


def test_probe_measures_a_real_shape() -> None:
    rate = autoplan.probe_shape(Shape(1, 2, 32, 16, 4), 300, torch.device("cpu"), seconds=0.05)
    assert 0 < rate < 1e9  # tokens/s: 3+ steps of 64 tokens over their wall time


def test_probe_measures_each_shape_with_its_capped_cjk_head(monkeypatch: pytest.MonkeyPatch) -> None:
    heads: dict[str, int] = {}

    def fake_probe_shape(shape, vocab, device, seconds, limit=None, optimizer="adamw"):
        heads[shape.key] = vocab
        return 1e9 / shape.flops_per_token(vocab)

    monkeypatch.setattr(autoplan, "probe_shape", fake_probe_shape)
    inputs = PlanInputs(corpus_bytes=3_000_000, script="cjk", budget_s=130, device="cpu", cjk_vocab=4000)
    measured = autoplan.probe(inputs, 8192, torch.device("cpu"), lambda _: None)
    # A CJK table is capped at 32 types per dimension: the probe times the head the run will train with.
    assert heads and all(v == capped_vocab("cjk", 8192, int(k.split("x")[1])) for k, v in heads.items())
    assert min(heads.values()) < 8192
    est = estimate_tokens_per_s(CPU_LADDER, 8192, measured, "cjk")
    assert est == pytest.approx({s.key: 1e9 / s.flops_per_token(capped_vocab("cjk", 8192, s.n_embd))
                                 for s in CPU_LADDER})
    assert capped_vocab("latin", 8192, 96) == 8192 and capped_vocab("latin", 8192, 64) == 4096
    assert capped_vocab("latin", 1024, 128) == 1024


@pytest.fixture
def fixed_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast, deterministic probe: every CPU shape at 4 GFLOP/s."""
    def probe(inputs, vocab, device, log, optimizer="adamw"):
        return flat_rate(CPU_LADDER, vocab, 4e9)

    monkeypatch.setattr(autoplan, "probe", probe)


def test_plan_is_printed_recorded_in_meta_and_flags_win(tmp_path: Path, fixed_probe, capsys) -> None:
    corpus = write_corpus(tmp_path / "c.txt", 1500)
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--device", "cpu", "--max-steps", "2", "--eval-every", "2",
                 "--n-layer", "1", "--batch-size", "4", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "training plan" in err and "given (--n-layer)" in err
    meta = load_checkpoint(out / "best").meta
    plan = meta["plan"]
    assert {r["name"] for r in plan["rows"]} >= set(PLANNED_FIELDS)
    assert plan["inputs"]["corpus_bytes"] == corpus.stat().st_size and plan["inputs"]["script"] == "latin"
    assert meta["config"]["n_layer"] == 1 and meta["config"]["batch_size"] == 4  # the flags
    assert meta["config"]["tokenizer_vocab"] == plan["values"]["tokenizer_vocab"] == 512  # planned: small corpus
    assert meta["config"]["n_embd"] == plan["values"]["n_embd"] and meta["config"]["lr"] == plan["values"]["lr"]
    records = read_metrics(out / "metrics.jsonl")
    assert records[1]["type"] == "plan" and tuple(records[1]) == RECORD_FIELDS["plan"]
    assert records[0]["preset"] == "planned"
    # Resuming keeps the planned settings and the plan, without planning again.
    assert main(["train", "--resume", str(out), "--max-steps", "3"]) == 0
    assert "training plan" not in capsys.readouterr().err
    assert load_checkpoint(out / "last").meta["plan"] == plan


def test_a_preset_turns_the_planner_off(tmp_path: Path, fixed_probe) -> None:
    assert TrainConfig(preset="tiny").planned is False and TrainConfig().planned is True
    assert TrainConfig(init_from="x").planned is False
    corpus = write_corpus(tmp_path / "c.txt", 800)
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--device", "cpu", "--preset", "tiny", "--block-size", "16",
                 "--tokenizer-vocab", "300", "--max-steps", "1", "--out", str(out)]) == 0
    assert "plan" not in load_checkpoint(out / "last").meta


def test_cpu_plans_batch_8_and_the_measured_learning_rate() -> None:
    cpu = plan_for(1_000_000)["values"]
    assert cpu["batch_size"] == 8  # more optimizer steps for the same tokens (budget-trials 14, 18)
    assert cpu["lr"] == pytest.approx(BASE_LR["cpu"] * (128 / cpu["n_embd"]) ** 0.5, abs=1e-5)
    assert cpu["min_lr"] == pytest.approx(cpu["lr"] / 10, abs=1e-6)
    gpu = plan_for(10_000_000, budget=600, device="cuda", flops=1e13)["values"]
    assert gpu["lr"] == pytest.approx(BASE_LR["cuda"] * (128 / gpu["n_embd"]) ** 0.5, abs=1e-5)
    assert BASE_LR["cpu"] < BASE_LR["cuda"]
