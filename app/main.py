"""The FastAPI application: `create_app(settings)` builds one, the lifespan loads the model.

Run it with `pocketgpt serve --checkpoint DIR`, or with uvicorn and settings from the environment:

    POCKETGPT_CHECKPOINT=runs/small uvicorn app.main:app           # `app` is built on first access
    POCKETGPT_CHECKPOINT=runs/small uvicorn --factory app.main:create_app

Importing this module builds nothing and reads no settings: the module-level `app` is created lazily (PEP 562
`__getattr__`) when uvicorn asks for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.context import AppContext
from app.engine.engine import Engine
from app.engine.holder import EngineHolder
from app.engine.loader import load_engine
from app.errors import install_error_handlers
from app.log import configure_logging
from app.metrics import Metrics
from app.middleware import AccessMiddleware, BodyLimitMiddleware
from app.routes import generate, health, openai
from app.settings import Settings
from model.checkpoint import CheckpointError

# (checkpoint dir, settings, metrics) -> a started Engine. Tests pass functools.partial(load_engine, step_delay=...).
EngineFactory = Callable[[Path, Settings, Metrics], Engine]


class StartupError(Exception):
    """Start-up cannot continue; the message is the one line the operator sees."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx: AppContext = app.state.ctx
    configure_logging(ctx.settings.log_level)
    path = ctx.settings.checkpoint
    try:
        if path is None:
            raise StartupError("no checkpoint configured: set POCKETGPT_CHECKPOINT or pass --checkpoint DIR")
        try:
            await ctx.holder.load(path)
        except CheckpointError as exc:
            raise StartupError(f"cannot load checkpoint {path}: {exc}") from None
    except StartupError as exc:
        app.state.startup_error = str(exc)  # StartupMessageMiddleware shows this instead of a traceback
        raise
    try:
        yield
    finally:
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


def create_app(settings: Settings | None = None, *, engine_factory: EngineFactory = load_engine) -> FastAPI:
    """Build an app. `settings` defaults to `Settings()` (the POCKETGPT_* environment), read now."""
    settings = settings or Settings()
    metrics = Metrics()
    holder = EngineHolder(lambda path: engine_factory(path, settings, metrics))
    metrics.bind(holder)

    app = FastAPI(title="pocketgpt", version="0.1.0", lifespan=lifespan,
                  summary="A small GPT behind a continuous-batching engine.")
    app.state.ctx = AppContext(settings=settings, holder=holder, metrics=metrics)
    # The same objects by name, for routes that read them directly (the admin router does).
    app.state.settings, app.state.holder, app.state.metrics = settings, holder, metrics
    install_error_handlers(app)
    app.include_router(generate.router)
    app.include_router(openai.router)
    app.include_router(health.router)
    # add_middleware wraps: the last added runs first. Access (ids, logs) sees everything, 413s included.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       prefix_limits={"/admin/datasets": None})  # uploads stream to disk under their own limit
    app.add_middleware(AccessMiddleware, metrics=metrics)
    app.add_middleware(StartupMessageMiddleware)
    return app


def __getattr__(name: str) -> Any:
    # `uvicorn app.main:app`: build the app (reading the environment) only when it is asked for.
    if name == "app":
        return create_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
