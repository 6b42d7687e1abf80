"""Build what a training run needs from its config: device, data, model, optimizer, sampler, resumed state.

Three ways to start: from scratch (preset + overrides, a tokenizer trained on the data), `init_from` a
checkpoint (its weights, tokenizer and model config; a fresh optimizer at step 0), or `resume` RUN_DIR/last
(weights, optimizer, step, RNG and sampler state as they were, so the loss curve continues exactly).
Task `sft` reads JSONL examples instead of text (training.sft_data); when that adds chat markers to the
tokenizer, the model gets embedding rows for them (model.vocab).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pocketgpt.model.chat import ChatTemplate
from pocketgpt.model.chat_jinja import JinjaChatTemplate
from pocketgpt.model.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_train_state
from pocketgpt.model.config import ModelConfig, preset
from pocketgpt.model.gpt import GPT
from pocketgpt.model.tokenizer import Tokenizer
from pocketgpt.model.vocab import add_token_rows
from pocketgpt.training.config import TrainConfig
from pocketgpt.training.data import PreparedData, load_prepared, prepare_data
from pocketgpt.training.distributed import DistContext, main_then_others, pick_device, wrap_model
from pocketgpt.training.errors import UserError
from pocketgpt.training.lora import LoraSpec, attach, restore
from pocketgpt.training.optim import MuonAdamW, make_optimizer
from pocketgpt.training.sampler import WindowSampler
from pocketgpt.training.sft_data import SFTData, prepare_sft
from pocketgpt.training.sft_sampler import SFTSampler
from pocketgpt.training.state import restore_rng


@dataclass
class Run:
    device: torch.device
    data: PreparedData | SFTData
    model: GPT  # the plain module: evaluation, generation and checkpoints use it
    train_model: nn.Module  # what the training step calls: `model`, wrapped in DDP and/or compiled
    optimizer: torch.optim.AdamW | MuonAdamW
    sampler: WindowSampler | SFTSampler
    tokens_per_row: int  # tokens in one batch row: block_size, or the mean example length for sft
    chat_template: ChatTemplate | JinjaChatTemplate | None = None  # saved with every checkpoint of the run
    lora: LoraSpec | None = None  # adapters train, the rest of `model` is frozen
    preset: str = "custom"  # the preset the model was built from, for the metrics' start record
    start_step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    schedule_state: dict | None = None  # a resumed time-budget run's TimeBudget.state_dict()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.data.tokenizer


def _load(path: Path, what: str) -> Checkpoint:
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        raise UserError(f"cannot {what}: {e}") from None


def _model_config(cfg: TrainConfig, ckpt: Checkpoint | None, tokenizer: Tokenizer) -> ModelConfig:
    overrides = cfg.model_overrides()
    try:
        if ckpt is not None:
            # The weights fix the shape; only dropout may change when continuing from a checkpoint.
            changed = {k: v for k, v in overrides.items() if k != "dropout" and getattr(ckpt.config, k) != v}
            if changed:
                raise UserError(f"the model shape comes from the checkpoint {ckpt.path}; cannot change {changed}")
            return ckpt.config.with_overrides(dropout=overrides.get("dropout"))
        vocab = overrides.pop("vocab_size", tokenizer.vocab_size)
        if vocab < tokenizer.vocab_size:
            raise UserError(f"vocab_size {vocab} is smaller than the tokenizer's {tokenizer.vocab_size} tokens")
        return preset(cfg.preset or "small", vocab_size=vocab, **overrides)  # planned runs override every shape field
    except ValueError as e:
        raise UserError(str(e)) from None


def _preset_name(cfg: TrainConfig, ckpt: Checkpoint | None) -> str:
    if ckpt is None or cfg.resume:  # a resumed run's config is the one it was started with
        return cfg.preset or "planned"
    return str((ckpt.meta.get("config") or {}).get("preset", "custom"))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_run(cfg: TrainConfig, ctx: DistContext, log: Callable[[str], None]) -> Run:
    """Everything the training loop needs; raises UserError for bad paths, data or settings."""
    device = pick_device(cfg.device, ctx)
    source = Path(cfg.resume) / "last" if cfg.resume else Path(cfg.init_from) if cfg.init_from else None
    ckpt = _load(source, "resume" if cfg.resume else "initialise from checkpoint") if source else None

    def prepare() -> PreparedData:
        return prepare_data(
            cfg.data, cfg.prepared_dir, tokenizer_vocab=cfg.tokenizer_vocab, val_fraction=cfg.val_fraction,
            tokenizer=ckpt.tokenizer if ckpt else None, log=log,
        )

    data: PreparedData | SFTData
    if cfg.task == "sft":
        if ckpt is None:  # TrainConfig refuses this already; an explicit check survives `python -O`
            raise UserError("task 'sft' needs init_from or resume: a checkpoint with a tokenizer to fine-tune")
        # Every rank reads and encodes the (small) example files itself: nothing is written to share.
        data = prepare_sft(cfg.data, ckpt.tokenizer, ckpt.chat_template, block_size=ckpt.config.block_size,
                           val_fraction=cfg.val_fraction, seed=cfg.seed, log=log)
    else:
        data = main_then_others(ctx, device, prepare, lambda: load_prepared(cfg.prepared_dir))
    mcfg = _model_config(cfg, ckpt, data.tokenizer)
    if isinstance(data, PreparedData):
        data.check_context(mcfg.block_size)
    if cfg.batch_size % ctx.world_size:
        raise UserError(f"batch_size {cfg.batch_size} must be a multiple of the {ctx.world_size} processes")

    _seed_everything(cfg.seed)
    model = GPT(mcfg)
    if ckpt is not None:
        model.load_state_dict(ckpt.model.state_dict())
        if data.tokenizer.vocab_size > ckpt.tokenizer.vocab_size:  # sft added chat markers
            model = add_token_rows(model, ckpt.tokenizer.vocab_size, data.tokenizer.vocab_size)
    model.to(device).train()
    spec = _attach_lora(cfg, model)
    if isinstance(data, SFTData):
        sampler: WindowSampler | SFTSampler = SFTSampler(
            data.train, cfg.batch_size, cfg.seed, data.tokenizer.eot_id, ctx.rank, ctx.world_size)
        tokens_per_row, template = max(1, round(data.mean_length)), data.template
    else:
        sampler = WindowSampler(data.train, mcfg.block_size, cfg.batch_size, cfg.seed, ctx.rank, ctx.world_size)
        tokens_per_row, template = mcfg.block_size, ckpt.chat_template if ckpt else None
    run = Run(
        device=device, data=data, model=model, train_model=model,
        optimizer=make_optimizer(model, cfg.lr, cfg.weight_decay, device.type, cfg.optimizer),
        sampler=sampler, tokens_per_row=tokens_per_row, chat_template=template, lora=spec,
    )
    run.preset = _preset_name(cfg, ckpt)
    if cfg.resume:
        _restore(run, source)
    if ctx.rank > 0:
        # Dropout masks must differ between ranks; rank 0 keeps the stream a single process would have.
        torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank + run.start_step)
    run.train_model = wrap_model(model, ctx, device)
    if cfg.compile:
        run.train_model = torch.compile(run.train_model)
    return run


def _attach_lora(cfg: TrainConfig, model: GPT) -> LoraSpec | None:
    """With lora_r: freeze `model` and give it adapters (so the optimizer gets only theirs)."""
    if cfg.lora_r is None:
        return None
    try:
        spec = LoraSpec.parse(cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
        attach(model, spec)
    except ValueError as e:
        raise UserError(str(e)) from None
    return spec


def _restore(run: Run, source: Path) -> None:
    try:
        state = load_train_state(source)
    except CheckpointError as e:
        raise UserError(f"cannot resume: {e}") from None
    if state is None:
        raise UserError(f"cannot resume: {source} has no training state (it is a `best` or exported checkpoint)")
    if run.lora is not None:
        if "lora" not in state:
            raise UserError(f"cannot resume with lora_r: {source} was not saved by a LoRA run")
        restore(run.model, state["lora"])  # the saved weights are merged: take the adapters back out
    run.optimizer.load_state_dict(state["optimizer"])
    run.sampler.load_state_dict(state["sampler"])
    restore_rng(state["rng"])
    run.start_step, run.tokens_seen = state["step"], state["tokens_seen"]
    run.best_val_loss = state["best_val_loss"]
    run.schedule_state = state.get("schedule")
