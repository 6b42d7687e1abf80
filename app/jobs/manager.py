"""The job manager: a FIFO queue of training jobs, each run as its own `python -m pocketgpt.training train` process.

Lifecycle, all persisted in the store so a server restart loses nothing:

    queued --(a slot frees up)--> running --> succeeded | failed | cancelled | interrupted
    cancelled | interrupted --(resume)--> queued   (runs again with `--resume RUN_DIR` if `last/` exists)

- At most `max_concurrent` jobs run at once; the rest wait in `queued_at` order.
- A watcher task per running job polls its process and tails its `metrics.jsonl` into the job row.
- Cancel sends SIGTERM (the trainer saves `last/` and exits 143), then SIGKILL after `cancel_grace_s`.
- Server shutdown does the same to every running job and marks it `interrupted` (resumable); queued jobs stay
  queued and start when the server next starts.
- Server start: a job still marked `running` whose process is alive (the server crashed, the trainer did not)
  is adopted and watched by pid; one whose process is gone is settled from its metrics records: `succeeded` if
  it wrote a successful end record, otherwise `interrupted` (or `failed` if it wrote an error record).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocketgpt.app.jobs.datasets import DataPathError, check_links
from pocketgpt.app.jobs.metrics import METRICS_FILE, Attempt, MetricsTail, apply_record
from pocketgpt.app.jobs.process import LOG_FILE, TrainerProcess, final_status, tail_lines
from pocketgpt.app.jobs.store import (
    CANCELLED,
    FAILED,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    JobStore,
)

log = logging.getLogger("pocketgpt.jobs")

DEFAULT_TRAINER_CMD = [sys.executable, "-m", "pocketgpt.training", "train"]
RESUMABLE = (INTERRUPTED, CANCELLED)
# Called with a succeeded job's checkpoint directory when it asked to be served; returns nothing, raises on error.
ServeHook = Callable[[Path], Awaitable[Any]]
# Called with a job just before its trainer starts; raises DataPathError when its inputs are no longer allowed
# (e.g. a symlink leaving the data root appeared in its data folder while it was queued).
Preflight = Callable[["Job"], None]


class JobNotFound(KeyError):
    """No job with this id."""


class JobConflict(Exception):
    """The job is in a state that does not allow the operation (e.g. resuming a running job)."""


@dataclass
class _Run:
    proc: TrainerProcess
    tail: MetricsTail
    attempt: Attempt = field(default_factory=Attempt)
    intent: str | None = None  # "cancel" or "shutdown" once we have signalled it
    term_sent_at: float | None = None
    killed: bool = False
    task: asyncio.Task | None = None


def _drop_flag(args: list[str], flag: str) -> list[str]:
    """`args` without `flag` and its value."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        else:
            out.append(a)
    return out


def new_job_id() -> str:
    """A short random id that is also a safe directory name."""
    return f"job-{secrets.token_hex(6)}"


class JobManager:
    """Queue, start, watch, cancel and resume training jobs. Use from one asyncio event loop."""

    def __init__(
        self,
        store: JobStore,
        checkpoint_dir: str | Path,
        *,
        project_dir: str | Path | None = None,
        trainer_cmd: list[str] | None = None,
        max_concurrent: int = 1,
        cancel_grace_s: float = 30.0,
        poll_interval_s: float = 0.5,
        log_tail_lines: int = 30,
        env: dict[str, str] | None = None,
        on_serve: ServeHook | None = None,
        preflight: Preflight | None = None,
        on_served: Callable[[Path], None] | None = None,
    ) -> None:
        self.store = store
        self.checkpoint_dir = Path(checkpoint_dir).resolve()
        # Relative paths and the trainer's working directory are the server's own; the trainer finds the package
        # through its environment (pocketgpt.launch), whatever that folder holds.
        self.project_dir = Path(project_dir or Path.cwd())
        self.trainer_cmd = list(trainer_cmd or DEFAULT_TRAINER_CMD)
        self.max_concurrent = max(1, max_concurrent)
        self.cancel_grace_s = cancel_grace_s
        self.poll_interval_s = poll_interval_s
        self.log_tail_lines = log_tail_lines
        self.env = env
        self.on_serve = on_serve
        self.preflight = preflight
        self.on_served = on_served  # told of every successful hot swap (it persists the served checkpoint)
        self._runs: dict[str, _Run] = {}
        self._serve_tasks: set[asyncio.Task] = set()
        self._closing = False

    # -- public API ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Settle jobs left running by a previous server, then start queued jobs."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for job in self.store.list_jobs(RUNNING):
            self._recover(job)
        self._pump()

    def submit(self, request: dict[str, Any], args: list[str], name: str | None = None,
               serve_when_done: bool = False) -> Job:
        """Queue a new job running `trainer_cmd + args + --out RUN_DIR`; it starts when a slot is free."""
        job_id = new_job_id()
        now = time.time()
        job = Job(
            id=job_id, status=QUEUED, request=request, args=list(args), name=name,
            run_dir=str(self.checkpoint_dir / job_id), serve_when_done=serve_when_done,
            created_at=now, queued_at=now,
        )
        self.store.insert_job(job)
        self._pump()
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        """The job row, or JobNotFound."""
        job = self.store.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, or ask a running one to stop (SIGTERM, SIGKILL after the grace)."""
        job = self.get(job_id)
        if job.status == QUEUED:
            return self.store.update_job(job_id, status=CANCELLED, cancel_requested=True, finished_at=time.time())
        run = self._runs.get(job_id)
        if job.status != RUNNING or run is None:
            raise JobConflict(f"job {job_id} is {job.status}; only queued or running jobs can be cancelled")
        if run.intent is None:
            run.intent, run.term_sent_at = "cancel", time.monotonic()
            run.proc.terminate()
        return self.store.update_job(job_id, cancel_requested=True)

    def resume(self, job_id: str) -> Job:
        """Queue an interrupted, cancelled or checkpointed failed job again; it continues from its `last/`."""
        job = self.get(job_id)
        # A failed job that saved a checkpoint (killed, disk full, ...) can continue once the cause is fixed.
        saved = any((Path(job.run_dir) / n).is_dir() for n in ("last", ".last.old"))
        if job.status not in RESUMABLE and not (job.status == FAILED and saved):
            raise JobConflict(f"job {job_id} is {job.status}; only interrupted or cancelled jobs, or failed jobs "
                              "with a saved checkpoint, can be resumed")
        job = self.store.update_job(
            job_id, status=QUEUED, queued_at=time.time(), finished_at=None, exit_code=None, error=None,
            cancel_requested=False, serve_error=None,
        )
        self._pump()
        return self.get(job_id)

    def log_path(self, job: Job) -> Path:
        return Path(job.run_dir) / LOG_FILE

    def metrics_path(self, job: Job) -> Path:
        return Path(job.run_dir) / METRICS_FILE

    def checkpoint_path(self, job: Job) -> Path | None:
        """The directory to serve for a job: its best checkpoint, else its last one, else None."""
        run_dir = Path(job.run_dir)
        named = [self.checkpoint_dir / n if n else None for n in (job.best_checkpoint, job.last_checkpoint)]
        for path in (named[0], run_dir / "best", named[1], run_dir / "last"):
            if path is not None and (path / "config.json").is_file():
                return path
        return None

    async def shutdown(self) -> None:
        """Stop every running job (SIGTERM, then SIGKILL after the grace) and mark it `interrupted`."""
        self._closing = True
        for run in self._runs.values():
            if run.intent is None:
                run.intent, run.term_sent_at = "shutdown", time.monotonic()
                run.proc.terminate()
        tasks = [r.task for r in self._runs.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.cancel_grace_s + 5 * self.poll_interval_s + 5)
        for job_id, run in list(self._runs.items()):  # watchers that did not finish in time
            if run.task is not None:
                run.task.cancel()
            run.proc.kill()
            self.store.update_job(job_id, status=INTERRUPTED, finished_at=time.time(), pid=None)
        self._runs.clear()
        for task in list(self._serve_tasks):
            task.cancel()

    # -- internals ----------------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Start queued jobs while there are free slots."""
        while not self._closing and len(self._runs) < self.max_concurrent:
            queued = self.store.queued_jobs()
            if not queued:
                return
            self._launch(queued[0])

    def _launch(self, job: Job) -> None:
        run_dir = Path(job.run_dir)
        args = list(job.args)
        # Continue from `last/` when a previous attempt saved one (`.last.old` is a save that crashed between
        # its renames, which the trainer recovers). The trainer refuses --init-from with --resume: the weights
        # come from `last/`. With no `last/` the job starts over from scratch in the same run dir.
        if job.attempts > 0 and any((run_dir / n).is_dir() for n in ("last", ".last.old")):
            args = [*_drop_flag(args, "--init-from"), "--resume", str(run_dir)]
        argv = [*self.trainer_cmd, *args, "--out", str(run_dir)]
        tail = MetricsTail(run_dir / METRICS_FILE)
        tail.read_new()  # skip records of earlier attempts; only this run's records decide its outcome
        try:
            if self.preflight is not None:
                self.preflight(job)
            proc = TrainerProcess.spawn(argv, self.project_dir, run_dir / LOG_FILE, env=self.env)
        except (OSError, DataPathError) as e:
            error = f"refused to start: {e}" if isinstance(e, DataPathError) else f"could not start the trainer: {e}"
            self.store.update_job(job.id, status=FAILED, error=error, finished_at=time.time(),
                                  attempts=job.attempts + 1)
            return
        log.info("job %s started (pid %d): %s", job.id, proc.pid, " ".join(argv))
        self.store.update_job(job.id, status=RUNNING, pid=proc.pid, started_at=time.time(), finished_at=None,
                              attempts=job.attempts + 1, exit_code=None, error=None)
        self._watch(job.id, _Run(proc=proc, tail=tail))

    def _recover(self, job: Job) -> None:
        """A job marked running when the server starts: adopt its live process, or settle it."""
        proc = TrainerProcess.adopt(job.pid, job.run_dir) if job.pid else None
        if proc is not None:
            log.info("job %s: adopting live trainer pid %d", job.id, proc.pid)
            self._watch(job.id, _Run(proc=proc, tail=MetricsTail(self.metrics_path(job))))
            return
        attempt = Attempt()
        self._consume(job.id, MetricsTail(self.metrics_path(job)), attempt)
        status, error = final_status(None, "cancel" if job.cancel_requested else None, attempt)
        if status == INTERRUPTED:
            error = "the server stopped while this job was running and its process is gone; resume it"
        self.store.update_job(job.id, status=status, error=error, finished_at=time.time(), pid=None)

    def _watch(self, job_id: str, run: _Run) -> None:
        self._runs[job_id] = run
        run.task = asyncio.get_running_loop().create_task(self._follow(job_id, run), name=f"job-{job_id}")

    async def _follow(self, job_id: str, run: _Run) -> None:
        """Poll the process and its metrics until it exits, then record the outcome."""
        try:
            while True:
                self._consume(job_id, run.tail, run.attempt)
                done, rc = run.proc.poll()
                if done:
                    self._consume(job_id, run.tail, run.attempt)
                    self._finish(job_id, run, rc)
                    return
                if run.term_sent_at is not None and not run.killed and \
                        time.monotonic() - run.term_sent_at > self.cancel_grace_s:
                    log.warning("job %s did not stop within %.0fs of SIGTERM: killing it", job_id,
                                self.cancel_grace_s)
                    run.proc.kill()
                    run.killed = True
                await asyncio.sleep(self.poll_interval_s)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bookkeeping bug must not leave the job "running" forever
            log.exception("watcher of job %s failed", job_id)
            run.proc.kill()
            self._runs.pop(job_id, None)
            self.store.update_job(job_id, status=FAILED, error="internal error while watching the job",
                                  finished_at=time.time(), pid=None)
            self._pump()

    def _consume(self, job_id: str, tail: MetricsTail, attempt: Attempt) -> None:
        """Fold newly written metrics records into the job row."""
        changes: dict[str, Any] = {}
        for rec in tail.read_new():
            changes.update(apply_record(rec, attempt, self.checkpoint_name))
        if changes:
            self.store.update_job(job_id, **changes)

    def _finish(self, job_id: str, run: _Run, rc: int | None) -> None:
        status, error = final_status(rc, run.intent, run.attempt)
        job = self.get(job_id)
        if status == FAILED:
            lines = tail_lines(self.log_path(job), self.log_tail_lines)
            error = f"{error}\n--- last lines of {LOG_FILE} ---\n{lines}" if lines else error
        log.info("job %s %s (exit code %s)", job_id, status, rc)
        job = self.store.update_job(job_id, status=status, error=error, exit_code=rc,
                                    finished_at=time.time(), pid=None)
        self._runs.pop(job_id, None)
        if status == SUCCEEDED and job.serve_when_done and self.on_serve is not None and not self._closing:
            task = asyncio.get_running_loop().create_task(self._serve(job))
            self._serve_tasks.add(task)
            task.add_done_callback(self._serve_tasks.discard)
        self._pump()

    async def _serve(self, job: Job) -> None:
        """Hot-load a succeeded job's checkpoint (serve_when_done); a failure is recorded, not raised."""
        path = self.checkpoint_path(job)
        try:
            if path is None:
                raise FileNotFoundError(f"job {job.id} left no checkpoint to serve")
            check_links(path, self.checkpoint_dir, f"the checkpoint of job {job.id}")
            if self.on_serve is None:
                raise RuntimeError("no serve callback is set")
            await self.on_serve(path)
            self.record_served(path)
            self.store.update_job(job.id, served_checkpoint=self.checkpoint_name(str(path)))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("job %s: serving its checkpoint failed: %s", job.id, e)
            self.store.update_job(job.id, serve_error=str(e) or type(e).__name__)

    def record_served(self, path: str | Path) -> None:
        """A hot swap to `path` succeeded (POST /admin/model or serve_when_done): pass it to `on_served`."""
        if self.on_served is not None:
            self.on_served(Path(path))

    def checkpoint_name(self, path: str | Path) -> str:
        """A trainer-written checkpoint path as a name relative to the checkpoint root (absolute if outside)."""
        p = Path(path)
        p = p if p.is_absolute() else self.project_dir / p
        with contextlib.suppress(ValueError, OSError):
            return p.resolve().relative_to(self.checkpoint_dir).as_posix()
        return str(p)
