"""The job manager against a fake trainer (tests/fake_trainer.py): lifecycle, queue, cancel, restart, resume."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from pocketgpt.app.jobs.manager import JobConflict, JobManager, JobNotFound
from pocketgpt.app.jobs.metrics import Attempt
from pocketgpt.app.jobs.process import final_status
from pocketgpt.app.jobs.store import CANCELLED, FAILED, INTERRUPTED, QUEUED, RUNNING, SUCCEEDED, JobStore

FAKE = str(Path(__file__).with_name("fake_trainer.py"))
ROOT = Path(__file__).resolve().parents[1]


def make_manager(tmp_path: Path, **kw) -> JobManager:
    kw.setdefault("poll_interval_s", 0.05)
    kw.setdefault("cancel_grace_s", 5.0)
    return JobManager(JobStore(tmp_path / "jobs.db"), tmp_path / "ckpt", project_dir=ROOT,
                      trainer_cmd=[sys.executable, FAKE, "train"], **kw)


async def wait_for(manager: JobManager, job_id: str, predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = manager.get(job_id)
        if predicate(job):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out; job is {manager.get(job_id)}")


def done(job) -> bool:
    return job.terminal


def test_job_runs_to_success_and_tracks_progress(tmp_path: Path) -> None:
    served: list[Path] = []
    recorded: list[Path] = []  # what the app persists so a restart serves it again

    async def on_serve(path: Path) -> None:
        served.append(path)

    async def main():
        m = make_manager(tmp_path, on_serve=on_serve, on_served=recorded.append)
        await m.start()
        job = m.submit({"data": "stdlib"}, ["--data", "stdlib", "--max-steps", "8", "--eval-every", "4"],
                       name="first", serve_when_done=True)
        assert job.status in (QUEUED, RUNNING) and job.run_dir == str(tmp_path / "ckpt" / job.id)
        job = await wait_for(m, job.id, done)
        await wait_for(m, job.id, lambda j: j.served_checkpoint)
        await m.shutdown()
        return m.get(job.id)

    job = asyncio.run(main())
    assert job.status == SUCCEEDED and job.exit_code == 0 and job.error is None
    assert (job.step, job.total_steps, job.params) == (8, 8, 56)
    assert job.train_loss == pytest.approx(5.0 / 8) and job.val_loss == pytest.approx(5.0 / 8 + 0.1)
    assert job.best_val_loss == pytest.approx(job.val_loss) and job.tokens_per_s == 1000.0
    assert job.eta_s == 0 and job.tokens_seen == 8 * 64
    assert (job.best_checkpoint, job.last_checkpoint) == (f"{job.id}/best", f"{job.id}/last")
    assert job.served_checkpoint == f"{job.id}/best" and served == [tmp_path / "ckpt" / job.id / "best"]
    assert recorded == served
    log = (tmp_path / "ckpt" / job.id / "train.log").read_text()
    assert "fake trainer: steps 0..8" in log and "pocketgpt: starting" in log


def test_queue_runs_one_at_a_time_in_order(tmp_path: Path) -> None:
    async def main():
        m = make_manager(tmp_path, max_concurrent=1)
        await m.start()
        a = m.submit({}, ["--data", "stdlib", "--max-steps", "5"])
        b = m.submit({}, ["--data", "stdlib", "--max-steps", "5"])
        assert m.get(a.id).status == RUNNING and m.get(b.id).status == QUEUED
        b = await wait_for(m, b.id, done)
        a = m.get(a.id)
        await m.shutdown()
        return a, b

    a, b = asyncio.run(main())
    assert a.status == b.status == SUCCEEDED
    assert a.finished_at <= b.started_at  # b waited for a


def test_failure_reports_error_record_and_log_tail(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_FAIL_AT", "3")

    async def main():
        m = make_manager(tmp_path)
        await m.start()
        job = m.submit({}, ["--data", "stdlib", "--max-steps", "10"], serve_when_done=True)
        job = await wait_for(m, job.id, done)
        await m.shutdown()
        return job

    job = asyncio.run(main())
    assert job.status == FAILED and job.exit_code == 1 and job.served_checkpoint is None
    assert job.error.startswith("ValueError: fake failure")
    assert "Traceback" in job.error  # the log's last lines follow the message


def test_cancel_running_and_queued_then_resume_continues(tmp_path: Path) -> None:
    async def main():
        m = make_manager(tmp_path)
        await m.start()
        a = m.submit({}, ["--data", "stdlib", "--max-steps", "400", "--eval-every", "5"], )
        b = m.submit({}, ["--data", "stdlib", "--max-steps", "5"])
        assert m.cancel(b.id).status == CANCELLED  # queued: cancelled at once
        await wait_for(m, a.id, lambda j: (j.step or 0) >= 10)
        assert m.cancel(a.id).cancel_requested
        a = await wait_for(m, a.id, done)
        stopped_at = a.step
        with pytest.raises(JobConflict):
            m.cancel(a.id)
        resumed = m.resume(a.id)
        assert resumed.status in (QUEUED, RUNNING)
        await wait_for(m, a.id, lambda j: j.status == RUNNING and j.resumed_from_step is not None)
        m.cancel(a.id)
        final = await wait_for(m, a.id, done)
        await m.shutdown()
        return a, stopped_at, final, m.get(b.id)

    a, stopped_at, final, b = asyncio.run(main())
    assert a.status == CANCELLED and a.exit_code == 143 and a.last_checkpoint == f"{a.id}/last"
    assert final.status == CANCELLED and final.attempts == 2
    assert final.resumed_from_step == stopped_at and final.step >= stopped_at
    assert b.status == CANCELLED and b.attempts == 0


def test_cancel_escalates_to_sigkill_after_grace(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_IGNORE_TERM", "1")

    async def main():
        m = make_manager(tmp_path, cancel_grace_s=0.5)
        await m.start()
        job = m.submit({}, ["--data", "stdlib", "--max-steps", "100000"])
        await wait_for(m, job.id, lambda j: (j.step or 0) >= 2)
        m.cancel(job.id)
        job = await wait_for(m, job.id, done, timeout=10)
        await m.shutdown()
        return job

    job = asyncio.run(main())
    assert job.status == CANCELLED and job.exit_code == -signal.SIGKILL


def test_shutdown_interrupts_then_restart_resumes_to_success(tmp_path: Path) -> None:
    async def first():
        m = make_manager(tmp_path)
        await m.start()
        a = m.submit({}, ["--data", "stdlib", "--max-steps", "60", "--eval-every", "5"])
        b = m.submit({}, ["--data", "stdlib", "--max-steps", "3"])
        await wait_for(m, a.id, lambda j: (j.step or 0) >= 6)
        await m.shutdown()
        return m.get(a.id), m.get(b.id)

    a, b = asyncio.run(first())
    assert a.status == INTERRUPTED and a.error is None and a.pid is None
    assert b.status == QUEUED  # queued jobs wait for the next server

    async def second():
        m = make_manager(tmp_path, max_concurrent=2)
        await m.start()  # b starts again at once
        with pytest.raises(JobConflict):
            m.resume(b.id)
        m.resume(a.id)
        a2 = await wait_for(m, a.id, done)
        b2 = await wait_for(m, b.id, done)
        await m.shutdown()
        return a2, b2

    a2, b2 = asyncio.run(second())
    assert a2.status == SUCCEEDED and a2.step == 60 and a2.resumed_from_step == a.step and a2.attempts == 2
    assert b2.status == SUCCEEDED


def test_restart_adopts_a_live_trainer_or_settles_a_dead_one(tmp_path: Path) -> None:
    """A server that died without shutdown: the orphaned trainer is adopted; a vanished one is interrupted."""

    async def crash():
        m = make_manager(tmp_path)
        await m.start()
        a = m.submit({}, ["--data", "stdlib", "--max-steps", "40"])
        await wait_for(m, a.id, lambda j: (j.step or 0) >= 2)
        for run in m._runs.values():  # simulate a crash: stop watching without signalling anything
            run.task.cancel()
        return m.get(a.id)

    a = asyncio.run(crash())
    assert a.status == RUNNING and a.pid

    async def restart():
        m = make_manager(tmp_path)
        await m.start()
        assert m.get(a.id).status == RUNNING
        job = await wait_for(m, a.id, done)
        await m.shutdown()
        return job

    adopted = asyncio.run(restart())
    assert adopted.status == SUCCEEDED and adopted.step == 40 and adopted.exit_code is None

    store = JobStore(tmp_path / "jobs.db")
    store.update_job(a.id, status=RUNNING, pid=2**22 + 12345)  # a pid that is not running

    async def restart_again():
        m = make_manager(tmp_path)
        await m.start()
        return m.get(a.id)

    # Its metrics end with a successful end record, so it settles as succeeded, not interrupted.
    assert asyncio.run(restart_again()).status == SUCCEEDED
    (Path(a.run_dir) / "metrics.jsonl").write_text('{"type": "start", "total_steps": 40}\n')
    store.update_job(a.id, status=RUNNING, pid=os.getpid())  # alive, but not a trainer of this job
    job = asyncio.run(restart_again())
    assert job.status == INTERRUPTED and "resume" in job.error


def test_unknown_job_and_bad_trainer_command(tmp_path: Path) -> None:
    async def main():
        m = JobManager(JobStore(tmp_path / "jobs.db"), tmp_path / "ckpt", trainer_cmd=["/nonexistent/trainer"],
                       poll_interval_s=0.05)
        await m.start()
        with pytest.raises(JobNotFound):
            m.get("job-nope")
        job = m.submit({}, ["--data", "stdlib"])
        await m.shutdown()
        return job

    job = asyncio.run(main())
    assert job.status == FAILED and "could not start the trainer" in job.error


@pytest.mark.parametrize(
    ("rc", "intent", "end", "error", "expected"),
    [
        (0, None, None, None, SUCCEEDED),
        (143, "cancel", "cancelled", None, CANCELLED),
        (143, "shutdown", "cancelled", None, INTERRUPTED),
        (-9, "shutdown", None, None, INTERRUPTED),
        (143, None, "cancelled", None, CANCELLED),
        (1, None, None, "boom", FAILED),
        (2, None, None, None, FAILED),
        (-9, None, None, None, FAILED),
        (None, None, "succeeded", None, SUCCEEDED),
        (None, None, None, None, INTERRUPTED),
        (None, None, None, "boom", FAILED),
    ],
)
def test_final_status_table(rc, intent, end, error, expected) -> None:
    attempt = Attempt(end={"status": end} if end else None, error=error)
    status, message = final_status(rc, intent, attempt)
    assert status == expected
    assert (message is not None) == (expected == FAILED)
