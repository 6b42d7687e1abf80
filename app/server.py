"""How uvicorn is configured for this app: connection cap, keep-alive, and a deadline for request headers.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) and, with `limit_concurrency`, answers 503 once
that many connections or requests are open; it has no deadline for a request's headers, so a client that connects
and sends half a request line holds its connection (and, under the cap, a place) for ever. `http_protocol` adds
that deadline to whichever HTTP protocol uvicorn would pick (httptools or h11). Request bodies have their own
deadline in the app (BodyLimitMiddleware, 408).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from pocketgpt.app.settings import Settings


class _HeaderDeadline:
    """Mixin for a uvicorn HTTP protocol: close a connection whose request headers are not complete within
    `header_timeout` seconds of its first byte (or of the connection opening). Between requests of a kept-alive
    connection uvicorn's own keep-alive timeout applies until the next request's first byte arrives."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    # The base protocol provides these.
    cycle: Any
    transport: Any
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not before:  # a request's headers are complete: its body has the app's deadline
            self._disarm_header_timer()
        elif self._awaiting_headers():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._awaiting_headers() and not self.transport.is_closing():
            self.transport.close()


def http_protocol(header_timeout: float, base: type[asyncio.Protocol] = AutoHTTPProtocol) -> type[asyncio.Protocol]:
    """`base` (uvicorn's choice by default) with a deadline of `header_timeout` seconds for request headers."""
    return type(f"HeaderDeadline{base.__name__}", (_HeaderDeadline, base), {"header_timeout": header_timeout})


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.Config / uvicorn.run keyword arguments that bound slow and numerous clients."""
    return {
        "http": http_protocol(settings.header_timeout),
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_timeout,
    }
