"""Server shutdown for the requests in flight: a grace period, then a clean end for each one still running.

On SIGTERM or SIGINT uvicorn stops accepting connections and waits for the open ones, up to its graceful
timeout; sse-starlette, left to itself, cancels every stream within half a second, cutting it mid-body (no
`done`, no `error`: curl exit 18). Instead the app's `Drain`, once the shutdown begins:

- refuses new generations with 503 `server_shutting_down`, and /readyz answers 503, so a balancer moves on;
- gives the generations in flight `shutdown_grace_s` to finish as usual;
- then ends each one still running with 503 `server_shutting_down`: a /v1/generate stream gets an `error`
  event, an OpenAI stream an error chunk and `[DONE]`, a JSON request the 503 envelope. Every response is
  complete, so the connection closes cleanly and uvicorn moves on to the lifespan's shutdown.

It learns of the shutdown from whichever comes first: a hook chained in front of the server's own SIGTERM /
SIGINT handler (so requests that are not streams drain too), sse-starlette's shutdown detection (every stream's
`shutdown_event` is the drain's one event), or the lifespan's shutdown. sse-starlette's own cancel waits
`shutdown_grace_s + 1` seconds, and `pocketgpt serve` gives uvicorn `shutdown_grace_s + 2`, so neither cuts a
stream that the drain is about to end cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import weakref
from collections.abc import AsyncIterable, Callable
from types import FrameType
from typing import Any

import anyio
from sse_starlette import EventSourceResponse

from pocketgpt.app.errors import APIError
from pocketgpt.app.generation import Generation
from pocketgpt.app.sse import ping_interval

log = logging.getLogger("pocketgpt")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
SSE_CANCEL_MARGIN_S = 1.0  # sse-starlette force-cancels a stream this long after the drain would have ended it
UVICORN_MARGIN_S = 2.0  # and uvicorn cancels what is left this long after it (pocketgpt serve)


def shutting_down_error() -> APIError:
    """The error a request gets when the server shuts down under it (or refuses it while shutting down)."""
    return APIError(503, "the server is shutting down; retry on another instance or once it is back",
                    code="server_shutting_down")


class Drain:
    """The server's shutdown as the requests see it (one per app, on the AppContext)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.draining = False
        # sse-starlette sets this when it detects the shutdown; we set it when we detect it first.
        self.event = anyio.Event()
        self._generations: weakref.WeakSet[Generation] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[None]] = set()
        self._hooks: list[tuple[int, Callable[..., Any], Callable[..., Any]]] = []  # (signal, ours, previous)

    # -- lifespan ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Watch for the shutdown: the stream event, and the process's SIGTERM / SIGINT where a server set a
        Python handler for them (uvicorn does, from the main thread) that we can chain in front of."""
        self.draining, self.event = False, anyio.Event()  # an app served again after a shutdown starts afresh
        self._spawn(self._watch_event())
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (a test server in a thread)
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue  # the default action (exit) or ignored: nothing graceful to add to

            def handler(signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous) -> None:
                loop.call_soon_threadsafe(self.begin)  # handlers run between bytecodes: defer to the loop
                previous(signum, frame)

            signal.signal(sig, handler)
            self._hooks.append((sig, handler, previous))

    async def close(self) -> None:
        """Lifespan shutdown: end whatever still runs now, and put the signal handlers back."""
        self.begin()
        self.abort_all()
        for task in list(self._tasks):
            task.cancel()
        self._unhook()

    # -- the shutdown ------------------------------------------------------------------------------
    def begin(self) -> None:
        """The server is shutting down: refuse new work, give running generations `grace` seconds (idempotent)."""
        if self.draining:
            return
        self.draining = True
        self.event.set()
        running = sum(1 for g in list(self._generations) if not g.finished)
        if running:
            log.warning("shutting down: %d generation(s) in flight get %gs to finish", running, self.grace)
        self._spawn(self._end_after_grace())

    def abort_all(self) -> None:
        """End every generation still running with 503 server_shutting_down."""
        left = [g for g in list(self._generations) if not g.finished]
        if left:
            log.warning("shutting down: ending %d generation(s) still running", len(left))
        for generation in left:
            generation.abort(shutting_down_error())

    # -- requests ----------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise 503 server_shutting_down once the shutdown has begun (call before admitting work)."""
        if self.draining:
            raise shutting_down_error()

    def track(self, generation: Generation) -> Generation:
        """Have the drain end `generation` if it still runs when the grace is over."""
        self._generations.add(generation)
        return generation

    def sse(self, content: AsyncIterable[Any], ping: float) -> EventSourceResponse:
        """An SSE response whose shutdown the drain drives: sse-starlette's detection sets the drain's event,
        and its force-cancel waits until after the drain has ended the stream cleanly."""
        return EventSourceResponse(content, ping=ping_interval(ping), shutdown_event=self.event,
                                   shutdown_grace_period=self.grace + SSE_CANCEL_MARGIN_S)

    # -- internals ---------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_event(self) -> None:
        await self.event.wait()
        self.begin()

    async def _end_after_grace(self) -> None:
        await asyncio.sleep(self.grace)
        self.abort_all()

    def _unhook(self) -> None:
        for sig, ours, previous in self._hooks:
            if signal.getsignal(sig) is ours:  # nobody replaced ours since: put the server's back
                signal.signal(sig, previous)
        self._hooks.clear()
