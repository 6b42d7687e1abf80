"""The Ray Serve side of `pocketgpt serve --ray`: each replica runs the same FastAPI app with its own engine.

Two deployments: `PocketGPTRouter`, the HTTP ingress (Serve's proxy hands it every request), and `PocketGPT`,
the model replicas. The router forwards each request through a streaming DeploymentHandle (Serve balances
those over the replicas) and relays the answer (app/asgi_relay.py). It is there so that a replica dying
mid-stream ends its streams with an `error` event: with the replica itself as the ingress, its death just
cut the proxy's HTTP response.

Imported only in Ray mode (it imports ray at the top); `app/ray_cli.py` deploys it by import path
(`pocketgpt.app.ray_serve:app`) with a Serve config, so that the deployment's code version stays fixed and a
change of `user_config` is a lightweight update: Serve calls `reconfigure` on every live replica, and a
replica started later (a restart, or autoscaling up) gets the current `user_config` before it takes traffic.

The served checkpoint is that `user_config` (`{"checkpoint": "/abs/path"}`), so Serve's own config is the one
place that says which model the cluster serves. `POST /admin/model` on any replica loads the checkpoint there
first (a bad one answers 422 and changes nothing), then writes it into the deployment's `user_config` and
waits until Serve reports the application RUNNING again, i.e. every replica has reconfigured.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.context import _get_global_client
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ServeDeploySchema
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pocketgpt.app.asgi_relay import relay, serve_asgi
from pocketgpt.app.engine.holder import EngineHolder
from pocketgpt.app.errors import APIError
from pocketgpt.app.main import create_app
from pocketgpt.app.ray_cli import APP_NAME, DEPLOYMENT, ROUTER
from pocketgpt.app.settings import Settings
from pocketgpt.model.checkpoint import load_checkpoint

REPLICA_HEADER = "x-pocketgpt-replica"
SWAP_TIMEOUT_S = 600.0  # every replica loads the checkpoint; a large model on a busy cluster takes a while

log = logging.getLogger("pocketgpt.ray")

# What a streaming handle call raises when the replica behind it is gone (died, or being replaced).
REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)

# Admin routes that create or steer training jobs: one job manager must own the queue and the trainer
# processes, so replicas (N identical processes) run no jobs. See README "Scaling out".
_JOB_ROUTES = ("/admin/jobs", "/admin/datasets")


class ReplicaMiddleware:
    """Add `X-Pocketgpt-Replica` to every response, and refuse job-changing admin calls on a replica."""

    def __init__(self, app: ASGIApp, replica_id: str) -> None:
        self.app = app
        self.replica_id = replica_id.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(),
                                                                                 self.replica_id)]}
            await send(message)

        if scope["method"] == "POST" and scope["path"].startswith(_JOB_ROUTES):
            error = APIError(501, "Training jobs are not run by Ray Serve replicas (one job manager must own the "
                             "queue): run them on one admin server (`pocketgpt serve` with POCKETGPT_ADMIN_TOKEN, "
                             "POCKETGPT_RAY_JOBS_ADDRESS and POCKETGPT_RAY_SERVE_ADDRESS; README \"Scaling out\").",
                             code="jobs_not_available")
            await error.response()(scope, receive, send_tagged)
            return
        await self.app(scope, receive, send_tagged)


def _build_replica_app() -> FastAPI:
    """Called by Ray Serve in each replica process: the server's app, its settings from the environment
    (`ray_cli` passes them as the runtime_env's POCKETGPT_* variables), the model from `user_config`."""
    app = create_app(Settings(), replica=True)
    app.state.replica = replica_info()  # GET /info reports it
    app.state.swap_all_replicas = functools.partial(publish_checkpoint, app.state.holder)
    app.add_middleware(ReplicaMiddleware, replica_id=app.state.replica["id"])
    return app


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(_build_replica_app)
class PocketGPT:
    """One replica: the FastAPI app (`self.app`) and the engine it holds."""

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve the checkpoint named by `user_config`; in-flight requests finish on the previous engine."""
        checkpoint = (config or {}).get("checkpoint")
        if not checkpoint:
            return
        holder = self.app.state.holder
        current = holder.current
        if current is not None and Path(current.path).resolve() == Path(checkpoint).resolve():
            return  # this replica swapped first (it took the admin call), or nothing changed
        await holder.swap(checkpoint, wait_drained=False)
        log.info("replica %s serves %s", self.app.state.replica["id"], checkpoint)

    async def forward(self, request: dict[str, Any]) -> AsyncIterator[tuple]:
        """One request relayed by the router, through this replica's app; its response as it is sent."""
        async for item in serve_asgi(self.app, request):
            yield item


@serve.deployment(name=ROUTER)
class PocketGPTRouter:
    """The HTTP ingress: relays every request to a model replica and ends a stream cut by its death cleanly."""

    def __init__(self, replicas: DeploymentHandle) -> None:
        self.replicas = replicas.options(stream=True)
        self.max_body_bytes = Settings().max_body_bytes

    async def __call__(self, request: Request) -> Response:
        return await relay(request, self.replicas.forward.remote, self.max_body_bytes, REPLICA_GONE)


async def publish_checkpoint(holder: EngineHolder, path: Path) -> None:
    """Make every replica serve `path`: load it here first, then update the deployment's `user_config` and
    wait until Serve reports the application RUNNING. Raises what loading raises (CheckpointError)."""
    # This replica first: a checkpoint that does not load fails here, before any other replica is touched.
    await holder.swap(path, wait_drained=False)
    await asyncio.to_thread(_apply_user_config, {"checkpoint": str(Path(path).resolve())})


class ClusterSwapper:
    """`POST /admin/model` and `serve_when_done` on an admin server outside Ray Serve (POCKETGPT_RAY_SERVE_ADDRESS):
    swap the model of the `pocketgpt serve --ray` deployment on that cluster instead of a local engine."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def __call__(self, path: Path) -> None:
        # Load it here first (CPU, then dropped): a checkpoint that does not load must not reach the replicas,
        # whose failed reconfigure would take the deployment down. Raises CheckpointError.
        await asyncio.to_thread(load_checkpoint, path)
        await asyncio.to_thread(self._apply, Path(path))

    def _apply(self, path: Path) -> None:
        if not ray.is_initialized():
            ray.init(address=self.address, logging_level="WARNING")
        _apply_user_config({"checkpoint": str(path.resolve())})


def _apply_user_config(user_config: dict[str, Any], timeout_s: float = SWAP_TIMEOUT_S) -> None:
    """Rewrite the live Serve config with a new `user_config` for our deployment and wait for RUNNING."""
    client = _get_global_client()
    details = client.get_serve_details()
    apps = []
    for name, app in details["applications"].items():
        if app.get("deployed_app_config") is None:
            continue  # an application deployed from code (serve.run), not from a config: not ours to rewrite
        config = dict(app["deployed_app_config"])
        if name == APP_NAME:
            config["deployments"] = [
                {**d, "user_config": user_config} if d["name"] == DEPLOYMENT else d for d in config["deployments"]
            ]
        apps.append(config)
    client.deploy_apps(ServeDeploySchema(applications=apps))
    # apply_config moved the application to DEPLOYING before returning; RUNNING means every replica has
    # reconfigured (a replica whose reconfigure fails is replaced, and the replacement loads the new one).
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications[APP_NAME]
        if status.status == "RUNNING":
            return
        if status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"replicas failed to load the checkpoint: {status.message}")
        time.sleep(0.2)
    raise TimeoutError(f"replicas did not all serve the new checkpoint within {timeout_s:.0f}s")


def replica_info() -> dict[str, Any]:
    """What /info adds on a replica: its Serve replica id, process id and node."""
    ctx = serve.get_replica_context()
    return {"id": ctx.replica_id.unique_id, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}


app = PocketGPTRouter.bind(PocketGPT.bind())
