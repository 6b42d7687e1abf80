"""The per-app objects routes need, kept on `app.state.ctx` (one app instance, one context: no globals)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sse_starlette import EventSourceResponse

from pocketgpt.app.engine.holder import EngineHolder
from pocketgpt.app.generation import Generation, GenerationSpec, prepare
from pocketgpt.app.metrics import Metrics
from pocketgpt.app.settings import Settings
from pocketgpt.app.shutdown import Drain


@dataclass
class AppContext:
    settings: Settings
    holder: EngineHolder
    metrics: Metrics
    drain: Drain

    def sse(self, content: AsyncIterable[Any]) -> EventSourceResponse:
        """A server-sent events response with this app's keep-alive pings, ended cleanly at shutdown."""
        return self.drain.sse(content, ping=self.settings.sse_ping)


def get_ctx(request: Request) -> AppContext:
    """FastAPI dependency: this app's context."""
    return request.app.state.ctx


def watch_disconnect(request: Request) -> asyncio.Future[None]:
    """A future that resolves when the client goes away (call only after the body has been read)."""

    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return asyncio.ensure_future(wait())


async def start_generation(ctx: AppContext, spec: GenerationSpec, request: Request) -> Generation:
    """Tokenize `spec` off the event loop, admit it with this app's limits (raises APIError: 404/422/429/503) and
    attach it to the request, where the access log reads its tokens and timings. While the server shuts down: 503."""
    ctx.drain.check()
    prepared = await prepare(ctx.holder, spec)
    generation = Generation.start(ctx.holder, spec, timeout=ctx.settings.request_timeout, metrics=ctx.metrics,
                                  retry_after=ctx.settings.retry_after, prepared=prepared)
    request.state.generation = generation
    return ctx.drain.track(generation)
