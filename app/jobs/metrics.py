"""Reading a trainer's `metrics.jsonl` as it grows, and folding its records into a job's progress columns.

The trainer appends one JSON object per line (records typed start / train / eval / checkpoint / end / error).
A reader may see a half-written last line, so only complete lines are consumed; a file that shrank (rewritten
by a fresh start) is read again from the top.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsTail:
    """Incremental reader of one JSONL file; `read_new()` returns the records appended since the last call."""

    def __init__(self, path: str | Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self._partial = b""

    def read_new(self) -> list[dict[str, Any]]:
        """Complete records written since the previous call (none if the file does not exist yet)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # truncated or replaced: start over
            self.offset, self._partial = 0, b""
        if size == self.offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(size - self.offset)
        self.offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        records = []
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a garbled line must not stop the job's bookkeeping
            if isinstance(rec, dict):
                records.append(rec)
        return records


@dataclass
class Attempt:
    """What the records of the current run (since its last `start` record) said about how it ended."""

    end: dict[str, Any] | None = None
    error: str | None = None


# Record field -> job column, per record type.
_TRAIN_FIELDS = {
    "step": "step", "total_steps": "total_steps", "loss": "train_loss", "lr": "lr",
    "tokens_per_s": "tokens_per_s", "elapsed_s": "elapsed_s", "eta_s": "eta_s", "tokens_seen": "tokens_seen",
}
_START_FIELDS = {"total_steps": "total_steps", "params": "params", "resumed_from_step": "resumed_from_step"}


def _pick(rec: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    return {col: rec[key] for key, col in mapping.items() if rec.get(key) is not None}


def apply_record(rec: dict[str, Any], attempt: Attempt, rel_path: Any = str) -> dict[str, Any]:
    """Job column changes implied by one record; updates `attempt` with end/error records.

    `rel_path` turns a checkpoint path written by the trainer into the name stored on the job.
    """
    kind = rec.get("type")
    if kind == "start":
        attempt.end, attempt.error = None, None  # a new run: earlier end/error records are history
        changes = _pick(rec, _START_FIELDS)
        if rec.get("resumed_from_step") is not None:
            changes["step"] = rec["resumed_from_step"]
        return changes
    if kind == "train":
        return _pick(rec, _TRAIN_FIELDS)
    if kind == "eval":
        changes = _pick(rec, {"step": "step", "val_loss": "val_loss"})
        if rec.get("best") and rec.get("val_loss") is not None:
            changes["best_val_loss"] = rec["val_loss"]
        return changes
    if kind == "checkpoint" and rec.get("path"):
        column = "best_checkpoint" if rec.get("kind") == "best" else "last_checkpoint"
        return {column: rel_path(rec["path"])}
    if kind == "end":
        attempt.end = rec
        changes: dict[str, Any] = _pick(rec, {"step": "step", "best_val_loss": "best_val_loss"})
        if rec.get("best_path"):
            changes["best_checkpoint"] = rel_path(rec["best_path"])
        if rec.get("last_path"):
            changes["last_checkpoint"] = rel_path(rec["last_path"])
        return changes
    if kind == "error":
        attempt.error = str(rec.get("message") or "unknown error")
        return {}
    return {}
