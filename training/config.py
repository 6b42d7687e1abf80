"""The training configuration: one typed, validated object.

This module imports neither torch nor the model package, so the server can import it cheaply to validate a
training job at the edge: `TrainConfig.model_validate(job)`; `to_argv()` turns a config back into the
`python -m pocketgpt.training train` command line that runs it.

Precedence when the command line builds a config: defaults < the saved config of a resumed run (`--resume`)
< a config file (`--config`, TOML or JSON, flat keys named like the fields) < flags given explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pocketgpt.training.errors import UserError

PresetName = Literal["tiny", "small", "gpt2"]  # the keys of model.config.PRESETS (a test keeps them equal)
STDLIB = "stdlib"  # the built-in corpus: the running interpreter's standard library sources
MIN_TOKENIZER_VOCAB = 260  # model.tokenizer.MIN_VOCAB_SIZE, repeated to keep this module import-light
DEFAULT_STEPS = 2000  # the step schedule's length when neither --max-steps nor --max-time is given
MODEL_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "vocab_size", "dropout")


class TrainConfig(BaseModel):
    """Everything a training run needs; the defaults train the `small` model on the stdlib on a laptop CPU."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- task and data -----------------------------------------------------------------------------
    task: Literal["pretrain", "sft"] = Field(
        "pretrain", description="pretrain: next-token prediction on text; sft: supervised fine-tuning of "
        "init_from on JSONL prompt/completion or chat-messages examples, loss on the answers only",
    )
    data: list[str] = Field(
        default_factory=lambda: [STDLIB], min_length=1,
        description="text files, folders (read recursively), glob patterns, .jsonl files with a 'text' field, "
        "or 'stdlib' (the Python standard library sources, tests excluded)",
    )
    data_dir: str | None = Field(None, description="where prepared token files go (default: OUT/data)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of tokens held out for validation (the end)")
    tokenizer_vocab: int = Field(
        8192, ge=MIN_TOKENIZER_VOCAB, le=2**32 - 1,
        description="BPE vocabulary size to train (planned when no --preset is given; 8192 with a preset)",
    )
    # -- model -------------------------------------------------------------------------------------
    preset: PresetName | None = Field(
        None, description="model shape: tiny, small or gpt2; without it the shape, vocabulary, batch and learning "
        "rate are planned from the data, the time budget and a throughput probe of this machine (any flag given "
        "overrides its part of the plan)",
    )
    n_layer: int | None = Field(None, gt=0, description="override the preset's layer count")
    n_head: int | None = Field(None, gt=0, description="override the preset's attention heads")
    n_kv_head: int | None = Field(None, gt=0, description="key/value heads for grouped-query attention (must "
                                  "divide n_head; default: one per head)")
    n_embd: int | None = Field(None, gt=0, description="override the preset's width")
    block_size: int | None = Field(None, gt=0, description="override the preset's context length in tokens")
    vocab_size: int | None = Field(None, gt=0, description="model vocabulary (default: the tokenizer's size)")
    dropout: float | None = Field(None, ge=0, lt=1, description="override the preset's dropout")
    # -- optimisation ------------------------------------------------------------------------------
    batch_size: int = Field(16, gt=0, description="sequences per micro-step, summed over all processes")
    grad_accum: int = Field(1, gt=0, description="micro-steps per optimizer step")
    lr: float = Field(1e-3, ge=0, description="peak learning rate")
    min_lr: float = Field(1e-4, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.1, ge=0, description="weight decay (2-D weight matrices only)")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw, or muon: Muon for the transformer blocks' weight matrices and AdamW for the "
        "rest, at the same learning rate (Moonshot's RMS matching)",
    )
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this (0: off)")
    seed: int = Field(1337, description="seed of model init, data sampling and dropout")
    # -- LoRA (fine-tuning only) -------------------------------------------------------------------
    lora_r: int | None = Field(None, ge=1, le=1024, description="train rank-R LoRA adapters only, base frozen "
                               "(needs init_from or resume); checkpoints hold the merged weights")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scale numerator: updates are alpha/r * B A "
                                     "(default 2 * lora_r)")
    lora_targets: str = Field("q,k,v,o", pattern=r"^[a-z]+(,[a-z]+)*$",
                              description="comma-separated projections to adapt: q, k, v, o, gate, up, down")
    save_adapter: bool = Field(False, description="also save the LoRA adapters beside each checkpoint's weights")
    # -- stopping, evaluation, logging -------------------------------------------------------------
    max_steps: int | None = Field(
        None, gt=0, description=f"optimizer steps to train, the cosine schedule's length (default: {DEFAULT_STEPS} "
        "without --max-time; no step limit with it)",
    )
    max_time: float | None = Field(
        None, gt=0, description="time budget in seconds of wall time, data preparation included; without "
        "--max-steps the learning-rate schedule follows it, and the final evaluation and checkpoints fit in it",
    )
    time_schedule: Literal["wsd", "cosine"] = Field(
        "wsd", description="schedule shape over the time budget: wsd (warmup-stable-decay) or cosine",
    )
    warmup_frac: float = Field(0.05, ge=0, lt=1, description="time schedule: share of the budget warming up")
    decay_frac: float = Field(0.3, ge=0, le=1, description="time schedule (wsd): share of the budget decaying")
    target_loss: float | None = Field(None, gt=0, description="stop once the validation loss reaches this")
    eval_every: int = Field(200, gt=0, description="evaluate and save a checkpoint every N steps")
    eval_batches: int = Field(20, gt=0, description="validation batches per evaluation")
    sample_tokens: int = Field(48, ge=0, description="length of the greedy sample shown at each evaluation")
    log_every: int = Field(10, gt=0, description="write a train metrics record every N steps")
    # -- runtime -----------------------------------------------------------------------------------
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto, cpu, cuda[:N] or mps")
    compile: bool = Field(False, description="torch.compile the model")
    dist_timeout: float = Field(
        300.0, gt=0, description="seconds a process of a multi-process (torchrun) run waits for the others, to "
        "join and at each collective, before it fails with its output; a process that dies is noticed at once",
    )
    out: str = Field("runs/pocketgpt", description="run directory: checkpoints and metrics.jsonl")
    resume: str | None = Field(None, description="continue the run in this run directory (from RUN_DIR/last)")
    init_from: str | None = Field(None, description="start from this checkpoint's weights and tokenizer")
    overwrite: bool = Field(False, description="start afresh in an OUT that already holds a run")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.resume and self.init_from:
            raise ValueError("give either resume or init_from, not both")
        if self.task == "sft" and not (self.init_from or self.resume):
            raise ValueError("task sft fine-tunes a checkpoint: give init_from (or resume an sft run)")
        if self.lora_r is not None and not (self.init_from or self.resume):
            raise ValueError("lora_r fine-tunes a checkpoint: give init_from (or resume a LoRA run)")
        if self.save_adapter and self.lora_r is None:
            raise ValueError("save_adapter needs lora_r")
        if self.warmup_frac + self.decay_frac > 1:
            raise ValueError(f"warmup_frac + decay_frac ({self.warmup_frac} + {self.decay_frac}) exceed 1")
        return self

    @property
    def time_scheduled(self) -> bool:
        """Whether the learning rate follows the time budget (--max-time without --max-steps)."""
        return self.max_time is not None and self.max_steps is None

    @property
    def step_limit(self) -> int | None:
        """The step count that ends the run: max_steps, the default without a time budget, or none."""
        if self.max_steps is not None:
            return self.max_steps
        return None if self.max_time is not None else DEFAULT_STEPS

    @property
    def planned(self) -> bool:
        """Whether the planner chooses the shape: a fresh pretraining run with no --preset."""
        return self.preset is None and self.task == "pretrain" and not self.resume and not self.init_from

    def model_overrides(self) -> dict[str, Any]:
        """The model shape fields given explicitly (not None)."""
        return {k: getattr(self, k) for k in MODEL_FIELDS if getattr(self, k) is not None}

    @property
    def prepared_dir(self) -> Path:
        """Folder of the prepared token files."""
        return Path(self.data_dir) if self.data_dir else Path(self.out) / "data"

    def to_argv(self) -> list[str]:
        """Command-line flags that rebuild this config (fields set explicitly, or differing from defaults)."""
        argv: list[str] = []
        defaults = TrainConfig()
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name not in self.model_fields_set and value == getattr(defaults, name):
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else f"--no-{name.replace('_', '-')}")
            elif isinstance(value, list):
                argv += [flag, *value]
            elif value is not None:
                argv += [flag, str(value)]
        return argv


def validate_config(values: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig, turning validation errors into one readable UserError."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in e.errors()
        )
        raise UserError(f"invalid training config: {problems}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML (.toml) or JSON (.json) file of config fields."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            values = tomllib.loads(p.read_text(encoding="utf-8"))
        elif p.suffix.lower() == ".json":
            values = json.loads(p.read_text(encoding="utf-8"))
        else:
            raise UserError(f"config file {p} must end in .toml or .json")
    except (ValueError, UnicodeDecodeError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"config file {p} cannot be parsed: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {p} must hold a table/object of fields")
    return values
