"""The job request schema: it stays a subset of the trainer's TrainConfig and maps onto its flags."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pocketgpt.app.jobs.schemas import TRAINING_FIELDS, ConfigProblem, JobRequest, ModelOverrides
from pocketgpt.training.config import MODEL_FIELDS, TrainConfig


def test_request_fields_exist_in_the_trainer_config() -> None:
    assert set(TRAINING_FIELDS) <= set(TrainConfig.model_fields)
    assert set(ModelOverrides.model_fields) == set(MODEL_FIELDS)
    passed_elsewhere = {"data", "model", "init_from", "name", "serve_when_done"}
    assert set(JobRequest.model_fields) == set(TRAINING_FIELDS) | passed_elsewhere


def test_trainer_args_use_the_trainer_flags() -> None:
    req = JobRequest(data="stdlib", preset="tiny", max_steps=40, lr=0.002, model={"block_size": 64}, compile=False)
    args = req.trainer_args(["/data/a.txt", "stdlib"], init_from="/ckpt/job-1/best")
    assert args[:3] == ["--data", "/data/a.txt", "stdlib"]
    line = " ".join(args)
    for part in ["--preset tiny", "--max-steps 40", "--lr 0.002", "--block-size 64",
                 "--init-from /ckpt/job-1/best", "--no-compile"]:
        assert part in line
    assert "--out" not in args
    assert req.data == ["stdlib"]  # one source is a list of one


def test_bad_combinations_name_their_field() -> None:
    with pytest.raises(ConfigProblem) as e:
        JobRequest(data="stdlib", lr=0.001, min_lr=0.01).trainer_args(["stdlib"], None)
    assert e.value.param == "min_lr"
    with pytest.raises(ConfigProblem) as e:
        JobRequest(data="stdlib", model={"n_embd": 64, "n_head": 3}).trainer_args(["stdlib"], None)
    assert e.value.param == "model"
    with pytest.raises(ValidationError):
        JobRequest(data="stdlib", device="tpu")
    with pytest.raises(ValidationError):
        JobRequest(data=["stdlib"] * 33)


def test_a_job_with_a_time_budget_and_no_preset_is_planned_by_the_trainer() -> None:
    """max_time means what `--max-time` means; no preset lets the trainer's planner choose the model."""
    args = JobRequest(data="stdlib", max_time=300).trainer_args(["stdlib"], None)
    assert args[args.index("--max-time") + 1] == "300.0"
    assert "--preset" not in args and "--max-steps" not in args
    cfg = TrainConfig.model_validate({"data": ["stdlib"], "max_time": 300})
    assert cfg.planned and cfg.time_scheduled and cfg.step_limit is None
    with_preset = JobRequest(data="stdlib", preset="tiny", max_time=60, model={"n_layer": 1})
    assert "--preset" in with_preset.trainer_args(["stdlib"], None)
    assert "--n-layer" in JobRequest(data="stdlib", model={"n_layer": 3}).trainer_args(["stdlib"], None)


def test_playground_train_form_offers_budgets_and_shows_the_plan() -> None:
    """The Train tab's budget choices are the admin API's max_time; a `plan` record fills the plan table."""
    from html.parser import HTMLParser
    from pathlib import Path

    static = Path(__file__).resolve().parents[1] / "app" / "static"

    class Options(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.select: str | None = None
            self.options: dict[str, list[str]] = {}
            self.ids: set[str] = set()

        def handle_starttag(self, tag: str, attrs: list) -> None:
            a = dict(attrs)
            self.ids.add(a.get("id") or "")
            if tag == "select":
                self.select = a.get("id")
            elif tag == "option" and self.select:
                self.options.setdefault(self.select, []).append(a["value"])

    page = Options()
    page.feed((static / "index.html").read_text())
    budgets = [float(v) for v in page.options["job-budget"]]
    assert budgets == [60, 300, 900, 3600]
    assert all(JobRequest(data="stdlib", max_time=b).max_time == b for b in budgets)
    assert page.options["job-preset"][0] == "auto" and {"job-plan", "job-plan-rows"} <= page.ids
    js = (static / "train.js").read_text()
    assert 'case "plan":' in js and "max_time: Number($(\"job-budget\").value)" in js
