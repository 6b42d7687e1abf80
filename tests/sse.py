"""Server-sent events in the tests, read with httpx-sse (the client library), not a parser of our own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
from httpx_sse import EventSource, ServerSentEvent


# httpx-sse 0.4.3 yields an empty event for a comment (`: ping`) that follows an event with an `id:` (its
# issue #35; the WHATWG algorithm dispatches nothing there). This server never sends an event without data, so
# an empty one is that artefact and is dropped.
def iter_events(response: httpx.Response) -> Iterator[ServerSentEvent]:
    """The events of a streaming response as they arrive (comments such as `: ping` are skipped)."""
    return (e for e in EventSource(response).iter_sse() if e.data)


async def aiter_events(response: httpx.Response) -> AsyncIterator[ServerSentEvent]:
    """`iter_events` for an async response."""
    async for e in EventSource(response).aiter_sse():
        if e.data:
            yield e


def read_events(response: httpx.Response) -> list[tuple[str, str]]:
    """(event, data) of every event of a streaming response, read to its end."""
    return [(e.event, e.data) for e in iter_events(response)]


def events_in_text(text: str) -> list[tuple[str, str]]:
    """(event, data) of every event in a whole `text/event-stream` body already read (e.g. by schemathesis)."""
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=text.encode())
    return read_events(response)
