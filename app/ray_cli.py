"""`pocketgpt serve --ray [ADDRESS]`: deploy the server as a Ray Serve application and keep it up until Ctrl-C.

The deployment is described as a Ray Serve config (the same shape as a `serve deploy` YAML file), so Serve
treats it declaratively: the code version comes from the import path and runtime_env, and a later change of
`user_config` (a model swap) reconfigures live replicas instead of replacing them. Settings travel to the
replicas as POCKETGPT_* variables in the application's runtime_env; the checkpoint travels as `user_config`.
Paths are made absolute here: replicas do not share this process's working directory (on a cluster, every
node must see them at the same path: a shared mount).

Ray is imported only inside `run()`: `serve_cli` checks it is installed before calling in.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from pocketgpt.app.settings import Settings

APP_NAME = "pocketgpt"  # the same names as app/ray_serve.py, which this module must not import (it loads ray)
DEPLOYMENT = "PocketGPT"
ROUTER = "PocketGPTRouter"  # the HTTP ingress in front of the replicas (app/ray_serve.py says why)
IMPORT_PATH = "pocketgpt.app.ray_serve:app"
DEPLOY_TIMEOUT_S = 900.0


def parse_autoscale(text: str) -> tuple[int, int]:
    """`MIN:MAX` -> (MIN, MAX) with 0 <= MIN <= MAX and MAX >= 1; raises ValueError saying what is wrong."""
    lo, sep, hi = text.partition(":")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise ValueError(f"--autoscale takes MIN:MAX (two whole numbers), got {text!r}")
    low, high = int(lo), int(hi)
    if high < 1 or low > high:
        raise ValueError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


def check_model(settings: Settings) -> str | None:
    """Why the configured model cannot be deployed, or None. The checkpoint is loaded here once (on the CPU, then
    dropped): one that does not load would fail every replica, again and again, instead of one clear line."""
    from pocketgpt.app.jobs.service import admin_enabled
    from pocketgpt.model.checkpoint import CheckpointError, load_checkpoint

    if settings.checkpoint is None:
        if admin_enabled(settings):
            return None  # as without Ray: start empty, load one through POST /admin/model
        return "no checkpoint configured: set POCKETGPT_CHECKPOINT or pass --checkpoint DIR"
    try:
        load_checkpoint(settings.checkpoint)
    except CheckpointError as exc:
        return f"cannot load checkpoint {settings.checkpoint}: {exc}"
    return None


def replica_env(settings: Settings) -> dict[str, str]:
    """The settings as the POCKETGPT_* variables a replica reads, without the checkpoint (user_config has it)
    and with relative paths made absolute."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None or name == "checkpoint":
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, Path):
            value = value.resolve()
        elif isinstance(value, list):
            value = ",".join(value)
        env[f"POCKETGPT_{name.upper()}"] = str(value)
    return env


def serve_config(settings: Settings, *, replicas: int | None, autoscale: tuple[int, int] | None,
                 replica_cpus: float, gpus_per_replica: float) -> dict[str, Any]:
    """The Ray Serve config (ServeDeploySchema shape) for one pocketgpt application."""
    checkpoint = str(settings.checkpoint.resolve()) if settings.checkpoint else None
    deployment: dict[str, Any] = {
        "name": DEPLOYMENT,
        "user_config": {"checkpoint": checkpoint},
        # A replica's engine decodes MAX_RUNNING requests at once and queues MAX_QUEUE more; beyond that Serve
        # holds requests at the proxy (or routes them to another replica) instead of the replica answering 429.
        "max_ongoing_requests": settings.max_running + settings.max_queue,
        "ray_actor_options": {"num_cpus": replica_cpus, "num_gpus": gpus_per_replica},
    }
    if autoscale is not None:
        deployment["autoscaling_config"] = {
            "min_replicas": autoscale[0], "max_replicas": autoscale[1],
            # Scale out when replicas hold more requests than they have KV-cache slots.
            "target_ongoing_requests": settings.max_running,
        }
    else:
        deployment["num_replicas"] = replicas or 1
    most = autoscale[1] if autoscale is not None else (replicas or 1)
    router: dict[str, Any] = {
        "name": ROUTER, "num_replicas": 1,
        # It only relays bytes; reserving no CPU keeps it off the replicas' budget (and schedulable anywhere).
        "ray_actor_options": {"num_cpus": 0},
        # Every request the replicas can hold passes through it, so it must hold as many.
        "max_ongoing_requests": most * deployment["max_ongoing_requests"],
    }
    return {"applications": [{
        "name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
        "runtime_env": {"env_vars": replica_env(settings)}, "deployments": [deployment, router],
    }]}


def run(settings: Settings, address: str, *, replicas: int | None, autoscale: tuple[int, int] | None,
        replica_cpus: float) -> int:
    """Connect to (or start) Ray, deploy, wait until every replica is up, then serve until SIGINT/SIGTERM."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    # From here on SIGTERM unwinds like Ctrl-C does, through the clean-up below, even while deploying.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        ray.init(address=address or None, include_dashboard=False, logging_level="WARNING")
        use_gpus = settings.device in ("auto", "cuda") and ray.cluster_resources().get("GPU", 0) >= 1
        config = serve_config(settings, replicas=replicas, autoscale=autoscale, replica_cpus=replica_cpus,
                              gpus_per_replica=1 if use_gpus else 0)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        _get_global_client().deploy_apps(ServeDeploySchema(**config))
        problem = _wait_running(serve)
        if problem:
            print(f"pocketgpt serve --ray: the deployment failed: {problem}", file=sys.stderr)
            return 1
        count = f"{autoscale[0]}..{autoscale[1]} autoscaled" if autoscale else str(replicas or 1)
        print(f"pocketgpt: serving {count} replica(s) through Ray Serve at http://{settings.host}:{settings.port}"
              f" ({'one GPU each' if use_gpus else 'CPU'}; Ray cluster {ray.get_runtime_context().gcs_address})",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        # Remove our application (Serve's apps outlive their driver on a cluster that was already running),
        # without waiting on a cluster that may be going down too; a local instance we started stops with us.
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                serve.delete(APP_NAME, _blocking=False)
            ray.shutdown()


def _wait_running(serve: Any, timeout_s: float = DEPLOY_TIMEOUT_S) -> str | None:
    """None once the application is RUNNING; the reason when it failed (or timed out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            return None
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            return status.message or status.status
        time.sleep(0.5)
    return f"not running after {timeout_s:.0f}s"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
