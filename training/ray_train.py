"""DDP under Ray Train: the trainer in N Ray Train workers (`TorchTrainer`), one process group across nodes.

    python -m pocketgpt.training.ray_train --workers N [--use-gpu auto|yes|no] -- ARGS...

run inside a Ray job (app/jobs/ray_jobs.py submits it when POCKETGPT_RAY_TRAIN_WORKERS is set), or anywhere
`ray.init()` finds a cluster (RAY_ADDRESS). Each worker runs the same `python -m pocketgpt.training train ARGS`
as a subprocess, with the environment torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT), so the trainer's DDP path (training/distributed.py) is the one that runs under torchrun: rank 0
writes the run directory (which must be on storage every node mounts at the same path), the others read it.

Why a subprocess per worker and not the trainer in the worker itself: the trainer saves `last/` on SIGTERM, and
a Ray Train worker runs its function outside the main thread, where Python installs no signal handler. So the
trainer keeps its own process and its own process group (rank 0 picks a fresh port and sends it to the others
over the group Ray Train set up); SIGTERM or SIGINT here reaches every worker's trainer through a small stop
actor they poll, each saves and exits 128 + signum, and this driver exits with rank 0's code.

Imports ray only in functions: the module is importable without the ray extra.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

POLL_S = 0.5


class _Stop:
    """A flag the driver sets on SIGTERM/SIGINT and every worker polls; also collects the trainers' exit codes
    (a worker never raises on a failed trainer: Ray Train would then kill its peers, maybe mid-save)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.codes: dict[int, int] = {}

    def stop(self, signum: int) -> None:
        self.signum = self.signum or signum

    def stopping(self) -> int | None:
        return self.signum

    def exited(self, rank: int, code: int) -> None:
        self.codes[rank] = code

    def exit_codes(self) -> dict[int, int]:
        return dict(self.codes)


def exit_code(codes: dict[int, int], world_size: int) -> int:
    """The run's exit code: rank 0's when it failed or stopped, else another rank's failure, else 0; a rank
    that never reported (its worker died) makes it 1."""
    if codes.get(0):
        return codes[0]
    missing = [r for r in range(world_size) if r not in codes]
    failed = [c for _, c in sorted(codes.items()) if c]
    return failed[0] if failed else 1 if missing else 0


def _die_with_parent() -> None:
    """In the trainer's child process: SIGKILL when the worker that started it dies (Linux), so a killed Ray
    worker leaves no trainer behind holding the process group."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rendezvous_port() -> int:
    """A free port on rank 0's node for the trainers' own process group, sent to all ranks over Ray Train's."""
    import ray.train
    import torch.distributed as dist

    ports = [_free_port() if ray.train.get_context().get_world_rank() == 0 else 0]
    dist.broadcast_object_list(ports, src=0)
    return int(ports[0])


def _trainer_env(use_gpu: bool) -> dict[str, str]:
    """What torchrun would set for this worker's trainer. With GPUs LOCAL_RANK is the index, among the devices
    this worker sees, of the GPU Ray Train gave it (the trainer uses cuda:LOCAL_RANK)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    local = ray.train.torch.get_device().index if use_gpu else ctx.get_local_rank()
    return {**os.environ, "PYTHONUNBUFFERED": "1", "RANK": str(ctx.get_world_rank()),
            "WORLD_SIZE": str(ctx.get_world_size()), "LOCAL_RANK": str(local or 0),
            "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size()), "MASTER_PORT": str(_rendezvous_port())}


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: run the trainer until it exits, relaying a stop; report its exit code."""
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    env = _trainer_env(config["use_gpu"])
    cmd = [sys.executable, "-m", "pocketgpt.training", "train", *config["args"]]
    proc = subprocess.Popen(cmd, cwd=config["cwd"], env=env, preexec_fn=_die_with_parent)
    sent = False
    while proc.poll() is None:
        signum = ray.get(config["stop"].stopping.remote()) if not sent else None
        if signum:
            proc.send_signal(signum)  # each rank's trainer stops after its step; rank 0 saves last/
            sent = True
        time.sleep(POLL_S)
    ray.get(config["stop"].exited.remote(rank, proc.returncode))


def run(args: list[str], workers: int, use_gpu: str, cpus_per_worker: float) -> int:
    """Run the trainer with `args` in `workers` Ray Train workers; returns the run's exit code."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(ignore_reinit_error=True)
    gpu = ray.cluster_resources().get("GPU", 0) >= 1 if use_gpu == "auto" else use_gpu == "yes"
    stop = ray.remote(num_cpus=0)(_Stop).remote()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"args": args, "cwd": os.getcwd(), "use_gpu": gpu, "stop": stop},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if gpu else {})}),
        torch_config=TorchConfig(backend="gloo"),  # only to send the port: the trainers pick NCCL on GPUs
        run_config=RunConfig(name=f"pocketgpt-{int(time.time() * 1000)}", failure_config=FailureConfig(max_failures=0)),
    )
    print(f"pocketgpt: Ray Train, {workers} workers ({'one GPU each' if gpu else 'CPU'}): train {' '.join(args)}",
          flush=True)
    failure: list[BaseException] = []
    done = threading.Event()

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:
            failure.append(e)
        finally:
            done.set()

    def on_signal(signum: int, _frame: object) -> None:
        print(f"pocketgpt: {signal.Signals(signum).name}: stopping the trainers (rank 0 saves last/)", flush=True)
        stop.stop.remote(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    threading.Thread(target=fit, name="pocketgpt-ray-train", daemon=True).start()
    while not done.wait(POLL_S):
        pass
    codes = ray.get(stop.exit_codes.remote())
    code = exit_code(codes, workers)
    if failure and not code:
        code = 1
    print(f"pocketgpt: Ray Train run ended, trainer exit codes by rank {codes}"
          + (f"; Ray Train: {failure[0]}" if failure else ""), flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """`python -m pocketgpt.training.ray_train --workers N -- TRAIN ARGS...`."""
    parser = argparse.ArgumentParser(prog="python -m pocketgpt.training.ray_train", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, required=True, help="Ray Train workers (trainer processes)")
    parser.add_argument("--use-gpu", choices=("auto", "yes", "no"), default="auto",
                        help="one GPU per worker: auto = when the cluster has GPUs")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs Ray reserves per worker (1)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the trainer's arguments")
    ns = parser.parse_args(argv)
    if ns.workers < 1:
        parser.error("--workers must be at least 1")
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    return run(args, ns.workers, ns.use_gpu, ns.cpus_per_worker)


if __name__ == "__main__":
    # By reference, so Ray's workers import this module instead of unpickling copies of __main__'s functions.
    from pocketgpt.training import ray_train

    sys.exit(ray_train.main())
