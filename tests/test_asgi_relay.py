"""The relay `pocketgpt serve --ray` puts between Serve's proxy and the replicas (app/asgi_relay.py), without Ray.

A router app relays over real HTTP to the real server app run in-process by `serve_asgi`, the same two calls
the Ray deployments make; the Ray handle is stood in for by a stream that can "die" after some messages,
raising as a handle does when its replica process is gone. tests/test_ray_serve.py does it with Ray.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from pocketgpt.app.asgi_relay import cut_stream_tail, relay, replica_gone, serve_asgi
from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import running_server
from tests.sse import iter_events

MAX_BODY = 10_000


class Gone(Exception):
    """What the stand-in handle raises when its 'replica' dies (Ray raises ActorDiedError and kin)."""


class Handle:
    """A streaming handle call: the replica's `serve_asgi` items, or Gone after `die_after` of them."""

    def __init__(self, items: AsyncIterator[tuple], die_after: int | None) -> None:
        self.items, self.die_after, self.cancelled = items, die_after, False

    def __aiter__(self) -> Handle:
        return self

    async def __anext__(self) -> tuple:
        if self.die_after is not None and self.die_after <= 0:
            await self.items.aclose()  # the replica's side stops with it
            raise Gone("replica died")
        if self.die_after is not None:
            self.die_after -= 1
        return await self.items.__anext__()

    def cancel(self) -> None:
        self.cancelled = True
        self.closing = asyncio.ensure_future(self.items.aclose())  # as Ray closes the replica's generator


class Router:
    """A router app like the Ray ingress, over a replica app in this process."""

    def __init__(self, replica: Any) -> None:
        self.replica, self.die_after = replica, None
        self.calls: list[Handle] = []

    def call(self, request: dict[str, Any]) -> Handle:
        handle = Handle(serve_asgi(self.replica, request), self.die_after)
        self.calls.append(handle)
        return handle

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            async with self.replica.router.lifespan_context(self.replica):  # the replica's engine
                yield

        async def endpoint(request: Request):
            return await relay(request, self.call, MAX_BODY, (Gone,))

        return Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST"])], lifespan=lifespan)


@pytest.fixture(scope="module")
def routed(tiny_checkpoint: Path) -> Iterator[tuple[str, Router]]:
    router = Router(create_app(Settings(checkpoint=tiny_checkpoint, max_new_tokens=400)))
    with running_server(router.app()) as base:
        yield base, router


@pytest.fixture
def router(routed: tuple[str, Router]) -> Iterator[Router]:
    yield routed[1]
    routed[1].die_after = None


def test_json_and_headers_pass_through(routed: tuple[str, Router]) -> None:
    base, _ = routed
    r = httpx.post(f"{base}/v1/generate", json={"prompt": "hi", "max_new_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert r.headers["content-type"] == "application/json" and r.headers["x-request-id"]
    assert r.headers["content-length"] == str(len(r.content))  # the replica's headers, as it sent them
    bad = httpx.post(f"{base}/v1/generate?x=1", json={"prompt": "hi", "max_new_tokens": 0}, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["param"]


def test_stream_passes_through_whole(routed: tuple[str, Router]) -> None:
    base, _ = routed
    body = {"prompt": "hi", "max_new_tokens": 20, "stream": True}
    with httpx.stream("POST", f"{base}/v1/generate", json=body, timeout=30) as r:
        events = [e.event for e in iter_events(r)]
    assert events == ["token"] * 20 + ["done"]


def test_replica_dying_mid_stream_ends_a_generate_stream_with_an_error_event(routed: tuple[str, Router],
                                                                            router: Router) -> None:
    base, _ = routed
    router.die_after = 4  # the start, then three body items
    body = {"prompt": "hi", "max_new_tokens": 100, "stream": True}
    with httpx.stream("POST", f"{base}/v1/generate", json=body, timeout=30) as r:
        assert r.status_code == 200
        events = [(e.event, e.data) for e in iter_events(r)]  # read to the end: no cut connection
    kinds = [kind for kind, _ in events]
    assert "token" in kinds and "done" not in kinds and kinds[-1] == "error"
    assert json.loads(events[-1][1])["error"]["code"] == "replica_unavailable"


def test_replica_dying_mid_stream_ends_an_openai_stream_with_an_error_chunk_and_done(
        routed: tuple[str, Router], router: Router) -> None:
    base, _ = routed
    router.die_after = 4
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 100, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        data = [e.data for e in iter_events(r)]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "replica_unavailable"
    assert all("choices" in json.loads(d) for d in data[:-2])
    # Chat streams share the shape (the tiny model here has no chat template to stream with).
    assert cut_stream_tail("/v1/chat/completions", replica_gone()) == cut_stream_tail("/v1/completions",
                                                                                       replica_gone())


def test_replica_gone_before_answering_is_tried_once_more_then_a_503(routed: tuple[str, Router],
                                                                     router: Router) -> None:
    base, _ = routed
    router.die_after = 0
    calls = len(router.calls)
    r = httpx.post(f"{base}/v1/generate", json={"prompt": "hi", "max_new_tokens": 3}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "replica_unavailable"
    assert len(router.calls) == calls + 2


def test_body_over_the_limit_is_refused_before_it_reaches_a_replica(routed: tuple[str, Router],
                                                                   router: Router) -> None:
    base, _ = routed
    calls = len(router.calls)
    r = httpx.post(f"{base}/v1/generate", content=b"x" * (MAX_BODY + 1), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert len(router.calls) == calls


def test_client_going_away_cancels_the_replica_side(routed: tuple[str, Router], router: Router) -> None:
    base, _ = routed
    body = {"prompt": "hi", "max_new_tokens": 100, "stream": True}
    with httpx.stream("POST", f"{base}/v1/generate", json=body, timeout=30) as r:
        next(iter_events(r))
    handle = router.calls[-1]
    for _ in range(200):
        if handle.cancelled:
            break
        time.sleep(0.05)
    assert handle.cancelled  # so Ray cancels the replica's generator, whose app then sees http.disconnect


def test_serve_asgi_joins_waiting_body_messages_and_tells_the_app_of_a_disconnect() -> None:
    seen: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        assert (await receive())["body"] == b"in"
        await send({"type": "http.response.start", "status": 201, "headers": [(b"a", b"b")]})
        for part in (b"1", b"2", b"3"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        seen.append((await receive())["type"])  # waits until the caller goes away

    async def main() -> list[tuple]:
        items = serve_asgi(app, {"scope": {"type": "http", "method": "POST", "path": "/"}, "body": b"in"})
        got = [await items.__anext__(), await items.__anext__()]
        await items.aclose()  # the caller leaves mid-response
        return got

    got = asyncio.run(main())
    assert got == [("start", 201, [(b"a", b"b")]), ("body", b"123")]  # three waiting messages, one item
    assert seen == ["http.disconnect"]
