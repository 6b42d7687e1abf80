"""Listing the checkpoint directories under the checkpoint root, cheaply (no torch, no weights loaded).

A checkpoint directory is one holding `config.json` and `model.safetensors` (see model/checkpoint.py). The
parameter count comes from the safetensors header (8-byte little-endian length, then a JSON table of tensor
shapes), so listing a 500 MB checkpoint reads a few kilobytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

WEIGHTS, CONFIG, META = "model.safetensors", "config.json", "meta.json"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def safetensors_params(path: Path) -> int | None:
    """Number of parameters stored in a safetensors file, from its header; None if unreadable."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > _MAX_HEADER:
                return None
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError):
        return None
    total = 0
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        total += math.prod(info.get("shape") or [])
    return total


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _dir_size(path: Path) -> int:
    size = 0
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False):
            size += entry.stat(follow_symlinks=False).st_size
    return size


def describe_checkpoint(path: Path, root: Path) -> dict[str, Any]:
    """Summary of one checkpoint directory: name, step, losses, params, size, created, shape."""
    meta = _read_json(path / META)
    config = _read_json(path / CONFIG)
    val_loss = meta.get("val_loss", meta.get("best_val_loss"))
    created = meta.get("created")
    if not isinstance(created, (int, float)):
        created = (path / CONFIG).stat().st_mtime
    return {
        "name": path.relative_to(root).as_posix(),
        "path": str(path),
        "step": meta.get("step"),
        "val_loss": val_loss,
        "train_loss": meta.get("train_loss", meta.get("loss")),
        "tokens_seen": meta.get("tokens_seen"),
        "params": safetensors_params(path / WEIGHTS),
        "size_bytes": _dir_size(path),
        "created": created,
        "config": {k: config.get(k) for k in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size")},
    }


def find_checkpoints(root: Path) -> list[Path]:
    """Every checkpoint directory under `root`, recursively; hidden dirs (temp/old saves) and symlinks skipped."""
    root = root.resolve()
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if CONFIG in filenames and WEIGHTS in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []  # a checkpoint's own subdirectories are not checkpoints
    return found


def list_checkpoints(root: Path, job_ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Summaries of every checkpoint under `root`, newest first; `job` names the job whose run dir holds it."""
    root = root.resolve()
    items = []
    for path in find_checkpoints(root):
        try:
            item = describe_checkpoint(path, root)
        except OSError:
            continue  # deleted while we looked
        first = item["name"].split("/", 1)[0]
        item["job"] = first if job_ids is not None and first in job_ids else None
        items.append(item)
    items.sort(key=lambda c: c["created"] or 0, reverse=True)
    return items
