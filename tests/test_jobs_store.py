"""The jobs/datasets SQLite store: round trips, updates, FIFO order, schema version, reopen."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from pocketgpt.app.jobs.store import QUEUED, RUNNING, SCHEMA_VERSION, Dataset, Job, JobStore


def _job(job_id: str, status: str = QUEUED, queued_at: float | None = None) -> Job:
    now = time.time()
    return Job(id=job_id, status=status, request={"data": "stdlib", "preset": "tiny"}, args=["--data", "stdlib"],
               run_dir=f"/tmp/{job_id}", created_at=now, queued_at=queued_at or now, serve_when_done=True)


def test_job_round_trip_and_update(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db.sqlite")
    store.insert_job(_job("job-a"))
    job = store.get_job("job-a")
    assert job is not None and job.request == {"data": "stdlib", "preset": "tiny"}
    assert job.args == ["--data", "stdlib"] and job.serve_when_done is True and job.cancel_requested is False
    job = store.update_job("job-a", status=RUNNING, step=3, train_loss=1.5, cancel_requested=True)
    assert (job.status, job.step, job.train_loss, job.cancel_requested) == (RUNNING, 3, 1.5, True)
    assert store.get_job("missing") is None
    with pytest.raises(ValueError):
        store.update_job("job-a", no_such_column=1)
    with pytest.raises(KeyError):
        store.update_job("missing", step=1)


def test_queue_is_fifo_by_queued_at(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db.sqlite")
    store.insert_job(_job("job-late", queued_at=200.0))
    store.insert_job(_job("job-early", queued_at=100.0))
    store.insert_job(_job("job-run", status=RUNNING, queued_at=50.0))
    assert [j.id for j in store.queued_jobs()] == ["job-early", "job-late"]
    assert [j.id for j in store.list_jobs(RUNNING)] == ["job-run"]
    assert len(store.list_jobs()) == 3 and len(store.list_jobs(limit=1)) == 1


def test_reopen_keeps_everything_and_is_versioned(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = JobStore(path)
    store.insert_job(_job("job-a"))
    store.insert_dataset(Dataset(id="ds-1", filename="a.txt", path="datasets/ds-1.txt", bytes=3, lines=1,
                                 sha256="ab"))
    store.close()
    again = JobStore(path)
    assert again.schema_version == SCHEMA_VERSION
    assert again.get_job("job-a") is not None
    assert [d.id for d in again.list_datasets()] == ["ds-1"] and again.get_dataset("ds-1").bytes == 3
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    JobStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        JobStore(path)
