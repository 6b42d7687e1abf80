"""RUN_DIR/metrics.jsonl: the record stream the server's admin API follows live.

One JSON object per line, flushed as soon as it is written, appended to across resumes. `RECORD_FIELDS` is
the contract: each record has exactly the keys listed for its type. Non-finite floats are written as null
(JSON has no NaN). Imports neither torch nor the model, so a reader can use these names.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, TextIO

METRICS_FILENAME = "metrics.jsonl"

RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "start": ("type", "time", "total_steps", "params", "tokens_per_step", "resumed_from_step", "preset", "run_dir"),
    "train": ("type", "step", "total_steps", "loss", "lr", "tokens_per_s", "elapsed_s", "eta_s", "tokens_seen"),
    "eval": ("type", "step", "val_loss", "val_ppl", "val_bpb", "sample", "best"),
    "checkpoint": ("type", "step", "path", "kind"),
    "end": ("type", "status", "step", "reason", "best_val_loss", "best_path", "last_path"),
    "error": ("type", "message"),
    # after start, when the planner chose the settings: [{"name", "value", "why"}, ...] (training.planner)
    "plan": ("type", "rows"),
    # task sft, after each eval record: greedy answers to held-out examples scored against their references
    # (percentages; `scored` = how many were generated).
    "sft_eval": ("type", "step", "scored", "exact_match", "bleu", "rouge1", "rouge2", "rougeL"),
}
SFT_SCORES = RECORD_FIELDS["sft_eval"][2:]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends records to a metrics.jsonl; with `path=None` (ranks other than 0) it writes nothing."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._fh: TextIO | None = None

    def write(self, record_type: str, **fields: Any) -> None:
        """Write one record; its fields must be exactly those of `RECORD_FIELDS[record_type]`."""
        keys = RECORD_FIELDS[record_type]
        if set(fields) != set(keys[1:]):
            raise ValueError(f"{record_type} record has fields {sorted(fields)}, expected {keys[1:]}")
        record = {"type": record_type, **{k: _clean(fields[k]) for k in keys[1:]}}
        if self.path is None:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the whole run
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()

    def start(self, *, total_steps: int | None, params: int, tokens_per_step: int, resumed_from_step: int | None,
              preset: str, run_dir: str) -> None:
        self.write("start", time=time.time(), total_steps=total_steps, params=params,
                   tokens_per_step=tokens_per_step, resumed_from_step=resumed_from_step, preset=preset,
                   run_dir=run_dir)

    def error(self, message: str) -> None:
        self.write("error", message=message)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a partly written last line is ignored)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
