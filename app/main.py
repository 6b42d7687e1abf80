"""The FastAPI application: `create_app(settings)` builds one, the lifespan loads the model.

Run it with `pocketgpt serve --checkpoint DIR`, or with uvicorn and settings from the environment:

    POCKETGPT_CHECKPOINT=runs/small uvicorn app.main:app           # `app` is built on first access
    POCKETGPT_CHECKPOINT=runs/small uvicorn --factory app.main:create_app

Importing this module builds nothing and reads no settings: the module-level `app` is created lazily (PEP 562
`__getattr__`) when uvicorn asks for it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pocketgpt.app.context import AppContext
from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.holder import EngineHolder
from pocketgpt.app.engine.loader import load_engine
from pocketgpt.app.errors import install_error_handlers
from pocketgpt.app.jobs import served
from pocketgpt.app.jobs.manager import JobManager
from pocketgpt.app.jobs.service import admin_enabled, create_job_manager, named_for
from pocketgpt.app.log import configure_logging
from pocketgpt.app.metrics import Metrics
from pocketgpt.app.middleware import AccessMiddleware, BodyLimitMiddleware, EnvelopeCORSMiddleware
from pocketgpt.app.openapi import install_openapi
from pocketgpt.app.routes import admin, chat, generate, health, openai, playground, tokenize
from pocketgpt.app.settings import Settings
from pocketgpt.app.shutdown import Drain
from pocketgpt.model.checkpoint import CheckpointError

# (checkpoint dir, settings, metrics) -> a started Engine. Tests pass partial(load_engine, runner=slowed(...)).
EngineFactory = Callable[[Path, Settings, Metrics], Engine]

log = logging.getLogger("pocketgpt")


class StartupError(Exception):
    """Start-up cannot continue; the message is the one line the operator sees."""


async def _load_swapped(ctx: AppContext, jobs: JobManager) -> bool:
    """Serve the checkpoint hot-swapped in before a restart, if there is one and it loads (app/jobs/served.py)."""
    settings = ctx.settings
    path = served.recall(jobs.store, settings.checkpoint_dir, settings.checkpoint)
    if path is None:
        return False
    try:
        await ctx.holder.load(path)
    except CheckpointError as exc:
        log.warning("not serving the hot-swapped checkpoint %s again: %s; serving the configured one", path, exc)
        return False
    log.info("serving %s again: it was hot-swapped in before the restart", path)
    return True


async def _load_model(ctx: AppContext, jobs: JobManager | None, replica: bool) -> None:
    """Load the checkpoint to serve at start-up; raises StartupError. A Ray Serve replica's model arrives through
    its deployment's config right after start-up, so it loads only a configured checkpoint."""
    if jobs is not None and not replica and await _load_swapped(ctx, jobs):
        return
    path = ctx.settings.checkpoint
    if path is None and jobs is None and not replica:
        raise StartupError("no checkpoint configured: set POCKETGPT_CHECKPOINT or pass --checkpoint DIR")
    if path is None:
        # With the admin API a server may start empty: train a model, then hot-load it (POST /admin/model).
        if not replica:
            log.warning("no checkpoint configured: serving no model until one is loaded through /admin/model")
        return
    try:
        await ctx.holder.load(path)
    except CheckpointError as exc:
        raise StartupError(f"cannot load checkpoint {path}: {exc}") from None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx: AppContext = app.state.ctx
    configure_logging(ctx.settings.log_level)
    replica = app.state.replica_mode
    # The job store also remembers a hot-swapped checkpoint, so it opens before the model loads.
    jobs = None
    if admin_enabled(ctx.settings):
        jobs = app.state.job_manager = create_job_manager(ctx.settings, ctx.holder,
                                                          on_serve=app.state.swap_all_replicas)
    try:
        await _load_model(ctx, jobs, replica)
    except StartupError as exc:
        app.state.startup_error = str(exc)  # StartupMessageMiddleware shows this instead of a traceback
        if jobs is not None:
            jobs.store.close()
        raise
    try:
        ctx.drain.start()  # from here on SIGTERM ends every request in flight cleanly (app/shutdown.py)
        if jobs is not None and not replica:  # one manager owns the job queue; replicas only read the store
            await jobs.start()
        yield
    finally:
        await ctx.drain.close()  # anything still running ends with server_shutting_down, not engine_stopped
        if jobs is not None:
            await jobs.shutdown()  # running training jobs save `last/` and become `interrupted`
            jobs.store.close()
        await ctx.holder.close()


class StartupMessageMiddleware:
    """Replace the traceback Starlette reports for a failed start-up with the StartupError's one line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_short(message: Message) -> None:
            line = getattr(scope["app"].state, "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and line:
                message = {**message, "message": line}
            await send(message)

        await self.app(scope, receive, send_short)


def create_app(settings: Settings | None = None, *, engine_factory: EngineFactory = load_engine,
               replica: bool = False) -> FastAPI:
    """Build an app. `settings` defaults to `Settings()` (the POCKETGPT_* environment), read now.

    `replica`: one of several identical Ray Serve replicas (app/ray_serve.py): the model arrives through the
    deployment's config after start-up, and the job manager only reads the store (it runs no jobs)."""
    settings = settings or Settings()
    metrics = Metrics()
    holder = EngineHolder(lambda path: engine_factory(path, named_for(path, settings), metrics))
    metrics.bind(holder)

    app = FastAPI(title="pocketgpt", version="0.1.0", lifespan=lifespan,
                  summary="A small GPT behind a continuous-batching engine.")
    app.state.ctx = AppContext(settings=settings, holder=holder, metrics=metrics,
                               drain=Drain(settings.shutdown_grace_s))
    # The same objects by name, for routes that read them directly (the admin router does).
    app.state.settings, app.state.holder, app.state.metrics = settings, holder, metrics
    app.state.drain = app.state.ctx.drain
    app.state.job_manager = None  # set by the lifespan when the admin API is enabled
    app.state.replica_mode = replica
    # Set when model swaps go to every Ray Serve replica rather than to `holder` (README "Scaling out").
    app.state.swap_all_replicas = None
    if settings.ray_serve_address and not replica:  # this server is the control plane of a Ray deployment
        from pocketgpt.app.ray_serve import ClusterSwapper  # imports ray: only when configured

        app.state.swap_all_replicas = ClusterSwapper(settings.ray_serve_address)
    install_error_handlers(app)
    app.include_router(generate.router)
    app.include_router(openai.router)
    app.include_router(chat.router)
    app.include_router(tokenize.router)
    app.include_router(health.router)
    app.include_router(admin.router)  # answers 403 until POCKETGPT_ADMIN_TOKEN is set
    playground.install(app)  # GET / and /static/*: the browser playground, open like /healthz
    install_openapi(app)  # the error envelope, SSE and security, as served (app/openapi.py)
    # add_middleware wraps: the last added runs first. Access (ids, logs) sees everything, 413s included.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, body_timeout=settings.body_timeout,
                       prefix_limits={"/admin/datasets": None})  # uploads stream to disk under their own limit
    if settings.cors_origins:  # closed by default: no CORS headers unless POCKETGPT_CORS_ORIGINS names origins
        app.add_middleware(EnvelopeCORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type",
                                                                         "X-Request-ID", "Last-Event-ID"],
                           expose_headers=["X-Request-ID", "Retry-After", "Location"])
    app.add_middleware(AccessMiddleware, metrics=metrics)
    app.add_middleware(StartupMessageMiddleware)
    return app


def __getattr__(name: str) -> Any:
    # `uvicorn app.main:app`: build the app (reading the environment) only when it is asked for.
    if name == "app":
        return create_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
