"""The per-app objects routes need, kept on `app.state.ctx` (one app instance, one context: no globals)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Request

from app.engine.holder import EngineHolder
from app.metrics import Metrics
from app.settings import Settings


@dataclass
class AppContext:
    settings: Settings
    holder: EngineHolder
    metrics: Metrics


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
