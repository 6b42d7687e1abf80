"""Wiring between the app and the jobs package: whether the admin API is on, the manager, served names."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

from pocketgpt.app.engine.holder import EngineHolder
from pocketgpt.app.jobs import served
from pocketgpt.app.jobs.datasets import check_links, resolve_data_source
from pocketgpt.app.jobs.manager import JobManager, ServeHook
from pocketgpt.app.jobs.store import Job, JobStore
from pocketgpt.app.settings import Settings


def admin_enabled(settings: Settings) -> bool:
    """The admin API (and with it the job manager and its database) exists only with an admin token set."""
    token = settings.admin_token
    return token is not None and bool(token.get_secret_value())


def create_job_manager(settings: Settings, holder: EngineHolder, on_serve: ServeHook | None = None) -> JobManager:
    """A job manager over the configured database and checkpoint root; jobs with serve_when_done hot-load
    their checkpoint through `on_serve` (every Ray Serve replica), else through `holder`; every successful swap
    is remembered in the store (app/jobs/served.py)."""
    store = JobStore(settings.db)

    def preflight(job: Job) -> None:
        """The job's data and init_from are checked again as it starts (it may have waited in the queue)."""
        for source in job.request.get("data", []):
            resolve_data_source(source, store, settings.data_dir)
        if "--init-from" in job.args:
            init_from = Path(job.args[job.args.index("--init-from") + 1])
            check_links(init_from, settings.checkpoint_dir, f"init_from {init_from.name!r}")

    return JobManager(
        store, settings.checkpoint_dir, max_concurrent=settings.max_concurrent_jobs,
        cancel_grace_s=settings.cancel_grace_s, on_serve=on_serve or holder.swap, preflight=preflight,
        trainer_cmd=trainer_command(settings),
        on_served=functools.partial(served.remember, store, settings.checkpoint_dir, settings.checkpoint),
    )


def trainer_command(settings: Settings) -> list[str] | None:
    """The command a job's arguments are appended to: None (the manager's local trainer), or with
    POCKETGPT_RAY_JOBS_ADDRESS a stand-in that runs the trainer as a Ray job (app/jobs/ray_jobs.py), under
    Ray Train with POCKETGPT_RAY_TRAIN_WORKERS."""
    if not settings.ray_jobs_address:
        return None
    return [sys.executable, "-m", "pocketgpt.app.jobs.ray_jobs", "--address", settings.ray_jobs_address,
            # Ray's own SIGKILL comes first, so this stand-in can still report how the job ended.
            "--gpus", str(settings.ray_job_gpus), "--stop-wait", str(max(1, math.floor(settings.cancel_grace_s * 0.8))),
            "--workers", str(settings.ray_train_workers), "--"]


def named_for(path: Path, settings: Settings) -> Settings:
    """Settings for loading `path`: unless a model name is configured, a checkpoint under the checkpoint root
    is named by its path there (`job-0123/best`, not just `best`), so /v1/models says which one is served."""
    if settings.model_name is not None:
        return settings
    try:
        name = Path(path).resolve().relative_to(Path(settings.checkpoint_dir).resolve()).as_posix()
    except ValueError:
        return settings  # elsewhere: the engine's default, the directory's name
    return settings.model_copy(update={"model_name": name})
