"""Request bodies of the admin API, validated at the edge (unknown fields and out-of-range values are 422).

A job request is checked twice before anything is queued: by `JobRequest` (field types and sanity upper bounds,
tighter than the trainer's) and then, assembled with its resolved data paths, by the trainer's own schema
`training.config.TrainConfig` (cross-field rules) plus the model's shape rules. The trainer's command line is
then `TrainConfig.to_argv()`, so the flag names are the trainer's, not a copy of them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pocketgpt.model.config import preset as model_preset
from pocketgpt.training.config import TrainConfig

Preset = Literal["tiny", "small", "gpt2"]
DataSource = Annotated[str, Field(min_length=1, max_length=1024)]
BIG = 10_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelOverrides(_Strict):
    """Changes to the preset's model shape (the combination is checked against the model's own rules)."""

    n_layer: int | None = Field(None, ge=1, le=64)
    n_head: int | None = Field(None, ge=1, le=64)
    n_kv_head: int | None = Field(None, ge=1, le=64, description="key/value heads (grouped-query attention)")
    n_embd: int | None = Field(None, ge=8, le=4096)
    block_size: int | None = Field(None, ge=8, le=8192)
    vocab_size: int | None = Field(None, ge=260, le=200_000, description="model vocabulary (default: tokenizer's)")
    dropout: float | None = Field(None, ge=0.0, lt=1.0)


# Fields of JobRequest passed through to TrainConfig unchanged (a test checks they exist there).
TRAINING_FIELDS = (
    "task", "preset", "tokenizer_vocab", "val_fraction", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps",
    "weight_decay", "grad_clip", "seed", "max_steps", "max_time", "target_loss", "eval_every", "eval_batches",
    "sample_tokens", "log_every", "device", "compile",
)


class JobRequest(_Strict):
    """Body of `POST /admin/jobs`. Unset training settings take the trainer's defaults."""

    data: list[DataSource] = Field(
        min_length=1, max_length=32,
        description="`stdlib`, a dataset id, or a path under the data root; or a list of them (at most 32)")
    task: Literal["pretrain", "sft"] | None = Field(
        None, description="sft: fine-tune init_from on JSONL prompt/completion or chat-messages examples")
    preset: Preset | None = Field(
        None, description="model shape; unset: the trainer plans the model for the data, budget and machine")
    model: ModelOverrides | None = None
    tokenizer_vocab: int | None = Field(None, ge=260, le=200_000)
    val_fraction: float | None = Field(None, gt=0, lt=1)
    batch_size: int | None = Field(None, ge=1, le=4096)
    grad_accum: int | None = Field(None, ge=1, le=1024)
    lr: float | None = Field(None, ge=0, le=1.0)
    min_lr: float | None = Field(None, ge=0, le=1.0)
    warmup_steps: int | None = Field(None, ge=0, le=BIG)
    weight_decay: float | None = Field(None, ge=0, le=1.0)
    grad_clip: float | None = Field(None, ge=0, le=1000.0)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    max_steps: int | None = Field(None, ge=1, le=BIG)
    max_time: float | None = Field(None, gt=0, le=30 * 86400, description="seconds of wall time")
    target_loss: float | None = Field(None, gt=0, le=100.0)
    eval_every: int | None = Field(None, ge=1, le=BIG)
    eval_batches: int | None = Field(None, ge=1, le=10_000)
    sample_tokens: int | None = Field(None, ge=0, le=4096)
    log_every: int | None = Field(None, ge=1, le=BIG)
    device: str | None = Field(None, pattern=r"^(auto|cpu|mps|cuda(:\d{1,2})?)$")
    compile: bool | None = None
    init_from: str | None = Field(None, min_length=1, max_length=1024,
                                  description="checkpoint name under the checkpoint root, or a job id")
    name: str | None = Field(None, min_length=1, max_length=200)
    serve_when_done: bool = Field(False, description="hot-load the job's best checkpoint when it succeeds")

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def trainer_args(self, data: list[str], init_from: str | None) -> list[str]:
        """Trainer flags (after `train`, before `--out`) for resolved data and init checkpoint.

        Raises ConfigProblem (naming the request field) if the trainer's schema or the model refuses it.
        """
        overrides = self.model.model_dump(exclude_none=True) if self.model else {}
        try:
            model_preset(self.preset or "small", **overrides)  # unset: planned, the overrides still apply
        except (ValueError, TypeError) as e:
            raise ConfigProblem("model", f"model: {e}") from None
        values: dict[str, Any] = {k: getattr(self, k) for k in TRAINING_FIELDS if getattr(self, k) is not None}
        values.update(overrides, data=data)
        if init_from is not None:
            values["init_from"] = init_from
        try:
            config = TrainConfig.model_validate(values)
        except ValidationError as e:
            err = e.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else _first_field_named(err["msg"])
            param = f"model.{field}" if field in overrides else field
            message = str(err["msg"]).removeprefix("Value error, ")
            raise ConfigProblem(param, f"{param}: {message}" if err["loc"] else message) from None
        return config.to_argv()


def _first_field_named(message: str) -> str | None:
    """The field a cross-field error message names first ("min_lr (0.1) must not exceed lr" -> min_lr)."""
    hits = [(m.start(), name) for name in TrainConfig.model_fields
            if (m := re.search(rf"\b{name}\b", message)) is not None]
    return min(hits)[1] if hits else None


class ConfigProblem(ValueError):
    """A job request the trainer would refuse; `param` names the request field."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class ModelSwapRequest(_Strict):
    """Body of `POST /admin/model`."""

    checkpoint: str = Field(min_length=1, max_length=1024,
                            description="checkpoint name under the checkpoint root, or a job id (its best)")
