"""Helpers for the admin API tests that run a real uvicorn server and the real trainer."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import httpx

from pocketgpt.app.engine.loader import load_engine
from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import slowed
from tests.conftest import small_corpus
from tests.sse import iter_events

TOKEN = "admin-token-for-tests"
API_KEY = "inference-key-for-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
USER = {"Authorization": f"Bearer {API_KEY}"}
# A job that trains in a few seconds on 2 CPU cores: tiny preset, short context, small batches.
FAST_JOB = {"preset": "tiny", "model": {"block_size": 64}, "batch_size": 4, "eval_every": 5, "eval_batches": 2,
            "log_every": 1, "sample_tokens": 8, "warmup_steps": 2, "device": "cpu"}


def corpus_bytes() -> bytes:
    """~28 KB of mixed text: enough windows of 65 tokens for a tiny run."""
    return "".join(small_corpus(60)).encode()


def make_settings(root: Path, checkpoint: Path | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "checkpoint": checkpoint, "admin_token": TOKEN, "api_keys": [API_KEY], "data_dir": root / "data",
        "checkpoint_dir": root / "ckpt", "db": root / "jobs.db", "max_upload_bytes": 200_000,
        "max_body_bytes": 20_000, "cancel_grace_s": 30.0, "device": "cpu", "log_level": "warning",
    }
    values.update(overrides)
    return Settings(**values)


def make_app(settings: Settings, step_delay: float = 0.0):
    return create_app(settings, engine_factory=functools.partial(load_engine, runner=slowed(step_delay)))


def upload(client: httpx.Client, data: bytes, filename: str = "corpus.txt") -> dict[str, Any]:
    r = client.post("/admin/datasets", headers=ADMIN, files={"file": (filename, data, "text/plain")})
    assert r.status_code == 201, r.text
    return r.json()


def start_job(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/admin/jobs", headers=ADMIN, json={**FAST_JOB, **body})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/admin/jobs/{r.json()['id']}"
    return r.json()


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    r = client.get(f"/admin/jobs/{job_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def wait_job(client: httpx.Client, job_id: str, predicate, timeout: float = 120.0) -> dict[str, Any]:
    """Poll the job until `predicate(job)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(client, job_id)
        if predicate(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; job: {json.dumps(job, indent=1)}")
        time.sleep(0.2)


def follow_events(client: httpx.Client, job_id: str, timeout: float = 120.0) -> list[tuple[str, dict]]:
    """The job's SSE stream until its final `status` event."""
    events: list[tuple[str, dict]] = []
    deadline = time.monotonic() + timeout
    with client.stream("GET", f"/admin/jobs/{job_id}/events", headers=ADMIN, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for event in iter_events(r):
            events.append((event.event, json.loads(event.data)))
            if event.event == "status":
                return events
            assert time.monotonic() < deadline, f"no final status event; got {[e for e, _ in events]}"
    raise AssertionError(f"stream ended without a status event: {[e for e, _ in events]}")


def generate(client: httpx.Client, prompt: str = "The quick", **body: Any) -> dict[str, Any]:
    r = client.post("/v1/generate", headers=USER,
                    json={"prompt": prompt, "max_new_tokens": 8, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()
