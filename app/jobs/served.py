"""The hot-swapped checkpoint, remembered across restarts.

A successful hot swap (POST /admin/model, or a job's `serve_when_done`) is recorded in the job store, with the
checkpoint the server was configured with at the time. On start-up the recorded checkpoint is served again when
the configuration is unchanged and it is still a checkpoint inside the checkpoint root; otherwise the configured
one is (with a warning when the recorded one is unusable). So a crash or a restart (`restart: unless-stopped`)
keeps serving what an operator swapped in, and editing POCKETGPT_CHECKPOINT still takes effect.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pocketgpt.app.jobs.datasets import DataPathError, resolve_checkpoint_name
from pocketgpt.app.jobs.store import JobStore

log = logging.getLogger("pocketgpt")

KEY = "served_checkpoint"


def _configured(checkpoint: Path | None) -> str | None:
    return str(Path(checkpoint).resolve()) if checkpoint is not None else None


def remember(store: JobStore, checkpoint_dir: Path, configured: Path | None, path: str | Path) -> None:
    """Record that `path` (a checkpoint inside `checkpoint_dir`) is now served."""
    try:
        name = Path(path).resolve().relative_to(Path(checkpoint_dir).resolve()).as_posix()
    except ValueError:
        log.warning("%s is outside the checkpoint root: it will not be served again after a restart", path)
        return
    store.set_setting(KEY, {"checkpoint": name, "configured": _configured(configured), "at": time.time()})


def recall(store: JobStore, checkpoint_dir: Path, configured: Path | None) -> Path | None:
    """The checkpoint to serve again after a restart, or None (serve the configured one)."""
    record = store.get_setting(KEY)
    if not isinstance(record, dict) or not isinstance(record.get("checkpoint"), str):
        return None
    if record.get("configured") != _configured(configured):
        log.info("POCKETGPT_CHECKPOINT changed since %s was hot-swapped in: serving the configured checkpoint",
                 record["checkpoint"])
        return None
    try:
        return resolve_checkpoint_name(record["checkpoint"], Path(checkpoint_dir))
    except DataPathError as exc:
        log.warning("not serving the hot-swapped checkpoint %r again: %s; serving the configured one instead",
                    record["checkpoint"], exc)
        return None
