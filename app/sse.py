"""What the server hands sse-starlette, in one place."""

from __future__ import annotations

# sse-starlette documents `ping=0` as "no pings", but releases before its fix for issue #206 slept 0 s between
# pings: a busy loop flooding the client. An interval no stream outlives means "off" in every release.
NO_PING_S = 10.0**9


def ping_interval(seconds: float) -> float:
    """The `ping=` argument for EventSourceResponse: POCKETGPT_SSE_PING, with 0 meaning no keep-alive pings."""
    return seconds if seconds > 0 else NO_PING_S
