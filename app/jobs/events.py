"""A job's event stream: its metrics records as they are written, then one final `status` event.

A late subscriber first gets every record written so far (the file is the history), so there is no separate
event bus to keep in sync with the trainer; `Last-Event-ID` (the record's 1-based line number) skips records a
reconnecting client already has.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from pocketgpt.app.errors import envelope
from pocketgpt.app.jobs.manager import JobManager
from pocketgpt.app.jobs.metrics import MetricsTail
from pocketgpt.app.jobs.store import Job


def job_view(job: Job) -> dict[str, Any]:
    """The public JSON of a job (admin API)."""
    data = job.to_dict()
    data["object"] = "training.job"
    data["checkpoints"] = {"last": job.last_checkpoint, "best": job.best_checkpoint}
    data["url"] = f"/admin/jobs/{job.id}"
    data["events_url"] = f"/admin/jobs/{job.id}/events"
    data["logs_url"] = f"/admin/jobs/{job.id}/logs"
    return data


async def job_events(manager: JobManager, job_id: str, last_event_id: int = 0,
                     stopping: Callable[[], bool] = lambda: False) -> AsyncIterator[dict[str, Any]]:
    """Server-sent events for a job: one per metrics record (event = record type), then `status`; or, when
    `stopping()` turns true (server shutdown), an `error` event (the client reconnects with Last-Event-ID)."""
    job = manager.get(job_id)
    tail = MetricsTail(manager.metrics_path(job))
    seen = 0
    while True:
        job = manager.get(job_id)
        finished = job.terminal  # read the status *before* the file, so no record written before the end is lost
        for rec in tail.read_new():
            seen += 1
            if seen > last_event_id:
                yield {"event": str(rec.get("type") or "message"), "id": str(seen), "data": json.dumps(rec)}
        if finished:
            yield {"event": "status", "data": json.dumps(job_view(job))}
            return
        if stopping():
            error = envelope("the server is shutting down; reconnect with Last-Event-ID once it is back",
                             "service_unavailable", code="server_shutting_down")
            yield {"event": "error", "data": json.dumps(error)}
            return
        await asyncio.sleep(manager.poll_interval_s)
