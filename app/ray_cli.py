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
import json
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from pocketgpt.app.settings import Settings

APP_NAME = "pocketgpt"  # the same names as app/ray_serve.py, which this module must not import (it loads ray)
DEPLOYMENT = "PocketGPT"
ROUTER = "PocketGPTRouter"  # the HTTP ingress in front of the replicas (app/ray_serve.py says why)
IMPORT_PATH = "pocketgpt.app.ray_serve:app"
DEPLOY_TIMEOUT_S = 900.0
LOCAL_START_ATTEMPTS = 3
DELETE_WAIT_S = 20.0  # for Serve to take our application down at exit (its replicas' graceful shutdown)


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
        _init_ray(ray, address)
        use_gpus = settings.device in ("auto", "cuda") and ray.cluster_resources().get("GPU", 0) >= 1
        config = serve_config(settings, replicas=replicas, autoscale=autoscale, replica_cpus=replica_cpus,
                              gpus_per_replica=1 if use_gpus else 0)
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        _start_serve(serve, {"host": settings.host, "port": settings.port}, deadline)
        _get_global_client().deploy_apps(ServeDeploySchema(**config))
        problem = _wait_ready(serve, _routes_url(settings), deadline)
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
        # waiting a bounded time on a cluster that may be going down too; a local instance stops with us.
        if ray.is_initialized():
            deleting = threading.Thread(target=_delete_app, args=(serve,), daemon=True)
            deleting.start()
            deleting.join(DELETE_WAIT_S)
            ray.shutdown()


def _delete_app(serve: Any) -> None:
    with contextlib.suppress(Exception):
        serve.delete(APP_NAME)


def _init_ray(ray: Any, address: str, attempts: int = LOCAL_START_ATTEMPTS) -> None:
    """Connect to the cluster at `address`, or start a local instance. Ray gives a local raylet a fixed 30 s to
    register, which a loaded machine can overrun ("The current node timed out during startup"); a local start
    is tried again (a fresh instance), a cluster address is not (that is the cluster's problem to report)."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address or None, include_dashboard=False, logging_level="WARNING")
            return
        except Exception as exc:
            if address or attempt == attempts or "timed out during startup" not in str(exc):
                raise
            print(f"pocketgpt serve --ray: the local Ray instance was slow to start ({exc}); trying again",
                  file=sys.stderr, flush=True)
            _stop_children()  # the failed instance's GCS, dashboard, ...: Ray leaves them running


def _stop_children() -> None:
    """Kill this process's child processes: before Ray is up, the only ones are those of a local Ray instance
    that failed to start (ray.init leaves them behind, competing with the next attempt for the CPU)."""
    import psutil  # a dependency of ray

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=10)


def _start_serve(serve: Any, http_options: dict[str, Any], deadline: float) -> None:
    """`serve.start`, for as long as it takes. Serve waits a fixed 60 s for its HTTP proxy and then raises, though
    the proxy is still coming up (a loaded machine takes longer); a second call finds the controller started by
    the first and returns at once, and `_wait_ready` then waits for the proxy itself."""
    while True:
        try:
            serve.start(http_options=http_options)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
            print("pocketgpt serve --ray: still waiting for Ray Serve's HTTP proxy", file=sys.stderr, flush=True)


def _routes_url(settings: Settings) -> str:
    """The local proxy's route table (Serve's `/-/routes`), where this process can reach it."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}/-/routes"


def _routes_ready(url: str) -> bool:
    """Whether the proxy at `url` routes "/" to our application (it learns routes after the deploy, so an
    application RUNNING is not yet one the proxy sends requests to)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read()).get("/") == APP_NAME
    except (OSError, ValueError):
        return False  # not listening yet, or not answering JSON yet


def _wait_ready(serve: Any, routes_url: str, deadline: float) -> str | None:
    """None once the application is RUNNING, every proxy HEALTHY and the local one routes to us; the reason
    when the application failed (or the deadline passed)."""
    while time.monotonic() < deadline:
        status = serve.status()
        app = status.applications.get(APP_NAME)
        if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            return app.message or app.status
        proxies_up = bool(status.proxies) and all(p == "HEALTHY" for p in status.proxies.values())
        if app is not None and app.status == "RUNNING" and proxies_up and _routes_ready(routes_url):
            return None
        time.sleep(0.5)
    return f"not serving after {DEPLOY_TIMEOUT_S:.0f}s"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
