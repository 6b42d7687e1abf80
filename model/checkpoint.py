"""The checkpoint directory: safe to load, written atomically.

    model.safetensors  weights (safetensors: loading never executes code)
    config.json        ModelConfig
    tokenizer.json     the BPE tokenizer
    meta.json          format version, step, tokens seen, losses, created time, training config, fingerprint,
                       and "chat_template" for checkpoints fine-tuned on conversations (see model.chat)
    train_state.pt     optional: optimizer/scheduler/RNG/data position, loaded only with weights_only=True

Format versions: 1 had multi-head attention only; 2 (this one) adds the Llama-family fields of ModelConfig
(`n_kv_head`, `qkv_bias`, `mlp_width`, `rope_scaling`). `migrate_config` reads a version-1 config.json as the
same model in version 2 terms, so old checkpoints load unchanged; a newer version than this code knows is refused.

A save writes a sibling temp directory, fsyncs it, then swaps it in with renames, so a crash mid-save leaves
the previous checkpoint whole (at worst under `.<name>.old`, which `resolve_checkpoint` recovers).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pocketgpt.model.chat import META_KEY as CHAT_TEMPLATE_KEY
from pocketgpt.model.chat import ChatTemplate
from pocketgpt.model.chat_jinja import JinjaChatTemplate
from pocketgpt.model.config import ModelConfig
from pocketgpt.model.gpt import GPT
from pocketgpt.model.quantize import assert_not_quantized
from pocketgpt.model.tokenizer import Tokenizer

FORMAT_VERSION = 2
WEIGHTS, CONFIG, TOKENIZER, META, TRAIN_STATE = (
    "model.safetensors", "config.json", "tokenizer.json", "meta.json", "train_state.pt",
)


class CheckpointError(Exception):
    """A checkpoint is missing, damaged or does not match its config; the message names the file or tensor."""


@dataclass
class Checkpoint:
    model: GPT
    config: ModelConfig
    tokenizer: Tokenizer
    meta: dict[str, Any]
    path: Path
    chat_template: ChatTemplate | JinjaChatTemplate | None = None  # from meta.json; None: not a chat model


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _weights_to_save(model: GPT) -> dict[str, torch.Tensor]:
    assert_not_quantized(model, "save")  # int8 weights are lossy and serving-only: never a checkpoint
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as wte.weight; safetensors refuses shared storage
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(
    path: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    chat_template: ChatTemplate | JinjaChatTemplate | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Atomically write a checkpoint directory at `path`, replacing any previous one.

    `extra_files` (file name -> contents) are written inside it too, e.g. LoRA adapters beside the weights.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        save_file(_weights_to_save(model), str(tmp / WEIGHTS))
        model.config.save(tmp / CONFIG)
        tokenizer.save(tmp / TOKENIZER)
        # The version always describes what this code writes, even when `meta` was copied from an older one.
        full_meta = {"created": time.time(), **(meta or {}), "format_version": FORMAT_VERSION}
        if chat_template is not None:
            chat_template.check(tokenizer)  # never write a template the tokenizer cannot render
            full_meta[CHAT_TEMPLATE_KEY] = chat_template.to_dict()
        (tmp / META).write_text(json.dumps(full_meta, indent=2, default=str) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        for name, data in (extra_files or {}).items():
            if Path(name).name != name or (tmp / name).exists():
                raise ValueError(f"extra checkpoint file {name!r} must be a new plain file name")
            (tmp / name).write_bytes(data)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """The directory to load for `path`, recovering a save that crashed between its two renames."""
    p = Path(path)
    old = p.with_name(f".{p.name}.old")
    if not p.exists() and old.is_dir():
        return old
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {p}")
    return p


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint (cheap: loads no weights)."""
    p = resolve_checkpoint(path) / META
    try:
        return json.loads(p.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"missing {p}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from e


def migrate_config(data: dict[str, Any], version: int) -> dict[str, Any]:
    """config.json written at format `version` -> the field set of FORMAT_VERSION (same model, same weights)."""
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"meta.json format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format {version} is newer than this pocketgpt reads ({FORMAT_VERSION}): "
                              "upgrade pocketgpt to load it")
    if version == 1:
        # Version 1 fused q/k/v with one key/value head per query head, biases all or none, derived MLP width.
        data = {"n_kv_head": data.get("n_head"), "qkv_bias": False, "mlp_width": None, "rope_scaling": None, **data}
    return data


def _load_weights(path: Path, model: GPT) -> None:
    try:
        tensors = load_file(str(path))
    except FileNotFoundError as e:
        raise CheckpointError(f"missing {path}") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or not a checkpoint): {e}") from e
    expected = _weights_to_save(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match config.json: missing tensors {missing}, unexpected {unexpected}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Checkpoint:
    """Load model (in eval mode, on `device`, cast to `dtype`), tokenizer and meta from a checkpoint dir."""
    root = resolve_checkpoint(path)
    meta = read_meta(root)
    try:
        raw = json.loads((root / CONFIG).read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        config = ModelConfig.from_dict(migrate_config(raw, meta.get("format_version", 1)))
    except FileNotFoundError as e:
        raise CheckpointError(f"missing {root / CONFIG}") from e
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{root / CONFIG} is invalid: {e}") from e
    try:
        tokenizer = Tokenizer.from_file(root / TOKENIZER)
    except FileNotFoundError as e:
        raise CheckpointError(f"missing {root / TOKENIZER}") from e
    except Exception as e:  # the tokenizers library raises its own exception types
        raise CheckpointError(f"{root / TOKENIZER} is invalid: {e}") from e
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{root / TOKENIZER} has {tokenizer.vocab_size} tokens but config.json vocab_size is {config.vocab_size}"
        )
    try:
        chat_template = ChatTemplate.from_meta(meta)
        if chat_template is not None:
            chat_template.check(tokenizer)
    except ValueError as e:
        raise CheckpointError(f"{root / META}: invalid {CHAT_TEMPLATE_KEY}: {e}") from None
    model = GPT(config)
    _load_weights(root / WEIGHTS, model)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    return Checkpoint(model=model, config=config, tokenizer=tokenizer, meta=meta, path=root,
                      chat_template=chat_template)


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    """Training state for resume, or None if the checkpoint has none. Never unpickles arbitrary objects."""
    p = resolve_checkpoint(path) / TRAIN_STATE
    if not p.exists():
        return None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{p} is not a valid training state (refused to unpickle): {e}") from e
