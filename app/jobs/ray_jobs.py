"""Run one training job on a Ray cluster, as a local stand-in process the job manager treats like a trainer.

    python -m pocketgpt.app.jobs.ray_jobs --address http://HEAD:8265 [--gpus N] [--workers N] -- ARGS...

submits `python -m pocketgpt.training train ARGS...` as a Ray job (Ray's job submission API, through the
cluster's dashboard; with `--workers N`, N > 0, the job is `python -m pocketgpt.training.ray_train --workers N
-- ARGS...`: the trainer in N Ray Train workers, DDP, training/ray_train.py), copies the job's log to stdout,
and exits when the job does: 0 when it succeeded, 143 when it was stopped, the trainer's exit code (or 1)
when it failed. SIGTERM or SIGINT stops the Ray job, which sends SIGTERM to the trainer, so it saves `last/`
as it does locally. Because it behaves like a trainer process, the job manager's whole lifecycle (queue,
metrics and events from the run directory, logs, cancel, interrupted at server shutdown, resume,
serve_when_done) works unchanged; the run directory must be on storage the admin server
and every Ray node mount at the same path.

Used when `POCKETGPT_RAY_JOBS_ADDRESS` is set (app/jobs/service.py). Imports ray only when run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import shlex
import signal
import sys
import time

STOPPED_EXIT = 128 + signal.SIGTERM  # what a trainer stopped by SIGTERM exits with locally
POLL_S = 0.5
SUBMIT_RETRY_S = 120.0


def trainer_entrypoint(python: str, args: list[str], workers: int = 0) -> str:
    """The Ray job's shell command: the trainer with `args`, quoted; with `workers` the Ray Train driver that
    runs it in that many DDP workers (a module name only: the app imports nothing of training)."""
    if workers > 0:
        return shlex.join([python, "-m", "pocketgpt.training.ray_train", "--workers", str(workers), "--", *args])
    return shlex.join([python, "-m", "pocketgpt.training", "train", *args])


def exit_code(status: str, driver_exit_code: int | None) -> int:
    """A Ray job's final status as the exit code of a local trainer."""
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return STOPPED_EXIT
    return driver_exit_code if driver_exit_code else 1


async def run(address: str, args: list[str], python: str, gpus: float, stop_wait_s: int, workers: int = 0) -> int:
    """Submit, follow, and on SIGTERM/SIGINT stop the job; returns the exit code. Ray gives the stopped trainer
    `stop_wait_s` seconds (its RAY_JOB_STOP_WAIT_TIME_S, read by the job's supervisor) to save before SIGKILL.
    With `workers` the driver needs no GPU (each Ray Train worker reserves its own), so `gpus` is not asked."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    entrypoint = trainer_entrypoint(python, args, workers)
    gpus = 0 if workers > 0 else gpus
    env = {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": str(stop_wait_s)}
    submit = functools.partial(client.submit_job, entrypoint=entrypoint, entrypoint_num_gpus=gpus or None,
                               submission_id=f"pocketgpt-{int(time.time() * 1000)}", runtime_env={"env_vars": env})
    deadline = time.monotonic() + SUBMIT_RETRY_S
    while True:
        try:
            job_id = await asyncio.to_thread(submit)
            break
        except RuntimeError as exc:  # a node's job agent still starting answers 500 "try again later"
            if "try again" not in str(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(2)
    print(f"pocketgpt: submitted Ray job {job_id} to {address}: {entrypoint}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logs = asyncio.ensure_future(_copy_logs(client, job_id))
    stopping = False
    while True:
        status = await asyncio.to_thread(client.get_job_status, job_id)
        if status.is_terminal():
            break
        if stop.is_set() and not stopping:
            print(f"pocketgpt: stopping Ray job {job_id}", flush=True)
            await asyncio.to_thread(client.stop_job, job_id)
            stopping = True
        if stopping:
            await asyncio.sleep(POLL_S)
        else:  # wake at once on a signal
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)
    with contextlib.suppress(asyncio.TimeoutError, Exception):
        await asyncio.wait_for(logs, 10)  # the rest of the log, once the job has ended
    info = await asyncio.to_thread(client.get_job_info, job_id)
    code = exit_code(str(status.value), getattr(info, "driver_exit_code", None))
    print(f"pocketgpt: Ray job {job_id} {status.value} (exit code {code})", flush=True)
    return code


async def _copy_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketgpt.app.jobs.ray_jobs", description=__doc__.split("\n")[0])
    parser.add_argument("--address", required=True, help="the Ray cluster's job API (its dashboard), http://HOST:8265")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs reserved for the trainer (default 0)")
    parser.add_argument("--python", default="python", help="the interpreter on the cluster (default: python)")
    parser.add_argument("--stop-wait", type=int, default=30, help="seconds a stopped trainer gets to save (30)")
    parser.add_argument("--workers", type=int, default=0, help="Ray Train DDP workers (0: one trainer process)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the trainer's arguments")
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    return asyncio.run(run(ns.address, args, ns.python, ns.gpus, ns.stop_wait, ns.workers))


if __name__ == "__main__":
    sys.exit(main())
