"""Relay HTTP requests to an ASGI app in another process, as a stream of messages, and end a cut stream cleanly.

`pocketgpt serve --ray` puts a thin router deployment in front of the model replicas (app/ray_serve.py):
Ray Serve's proxy hands each request to a router, the router calls a replica through a streaming
DeploymentHandle, and the replica runs the request through its FastAPI app (`serve_asgi`), yielding the
response as it is sent. Why the extra hop: when a replica process dies, the caller of its stream learns it as
an exception, and only a caller that is *not* that replica can still finish the client's response. The router
(`relay`) turns that exception into the stream's own error shape:

- `/v1/generate` (and any other SSE route): `event: error` with the `{"error": {...}}` envelope;
- the OpenAI routes: a `data: {"error": {...}}` chunk, then `data: [DONE]`;
- not answered yet (the replica died first): sent once more, then a 503 `replica_unavailable` envelope.

No Ray import here: the Ray specifics (which exceptions mean "the replica is gone") are passed in, so the relay
is tested in the default suite against the real app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message

from pocketgpt.app.errors import APIError

log = logging.getLogger("pocketgpt.ray")

# The ASGI scope keys a request needs on the other side (plain data: Ray pickles them across processes).
_SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
               "headers", "client", "server")
OPENAI_STREAM_PATHS = ("/v1/completions", "/v1/chat/completions")
DISCONNECT_GRACE_S = 2.0  # then the app's task is cancelled
QUEUE_MESSAGES = 256  # a replica's app runs at most this far ahead of the router reading its response
ATTEMPTS = 2  # a request whose replica died before answering is sent once more


def forwarded(scope: dict[str, Any], body: bytes) -> dict[str, Any]:
    """What a router sends a replica: the request's scope (plain values only) and its whole body."""
    return {"scope": {k: scope[k] for k in _SCOPE_KEYS if k in scope}, "body": body}


async def serve_asgi(app: ASGIApp, request: dict[str, Any]) -> AsyncIterator[tuple]:
    """Run one forwarded request through `app`; yield ("start", status, headers) then ("body", bytes) items.
    Body messages already waiting are joined into one item, so a busy stream makes fewer Ray hops. Closing
    the generator early (the client went away) tells the app `http.disconnect`, as a server would."""
    queue: asyncio.Queue[Message | None] = asyncio.Queue(QUEUE_MESSAGES)
    disconnected = asyncio.Event()
    body_pending = True

    async def receive() -> Message:
        nonlocal body_pending
        if body_pending:
            body_pending = False
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        scope = {**request["scope"], "asgi": {"version": "3.0", "spec_version": "2.3"}}
        try:
            await app(scope, receive, queue.put)
        finally:
            await queue.put(None)

    task = asyncio.ensure_future(run())
    try:
        ended = app_done = False
        while not (ended or app_done):
            message = await queue.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield ("start", message["status"], list(message.get("headers", [])))
                continue
            chunks = [message.get("body", b"")]
            ended = not message.get("more_body", False)
            while not ended and not queue.empty():  # only body messages follow the start
                more = queue.get_nowait()
                if more is None:
                    app_done = True
                    break
                chunks.append(more.get("body", b""))
                ended = not more.get("more_body", False)
            body = b"".join(chunks)
            if body or ended:
                yield ("body", body)
        if not ended and task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # the app failed before finishing its response
    finally:
        disconnected.set()
        if not task.done():  # the caller went away mid-response: the app gets a moment to see the disconnect
            await asyncio.wait({task}, timeout=DISCONNECT_GRACE_S)
            task.cancel()
        with contextlib.suppress(BaseException):
            await task


def cut_stream_tail(path: str, error: APIError) -> bytes:
    """The bytes that end an SSE stream cut by `error`, in that route's error shape."""
    data = json.dumps(error.body(), ensure_ascii=False, separators=(",", ":"))
    if path in OPENAI_STREAM_PATHS:
        return ServerSentEvent(data).encode() + ServerSentEvent("[DONE]").encode()
    return ServerSentEvent(data, event="error").encode()


def replica_gone() -> APIError:
    """The error a request gets when the replica serving it died (Ray restarts it; a retry goes elsewhere)."""
    return APIError(503, "the replica serving this request stopped; retry the request (Ray Serve restarts the "
                    "replica and routes new requests to the others)", code="replica_unavailable")


async def relay(request: Request, call: Callable[[dict[str, Any]], Any], max_body_bytes: int,
                gone: tuple[type[BaseException], ...]) -> Response:
    """Forward `request` through `call` (a streaming call of `serve_asgi` on a replica) and stream its answer
    back. An exception in `gone` (or any other failure) ends a stream in its own error shape."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            return APIError(413, f"request body exceeds the limit of {max_body_bytes} bytes",
                            code="body_too_large").response()
    message = forwarded(request.scope, bytes(body))
    for attempt in range(1, ATTEMPTS + 1):
        stream = call(message)
        try:
            _, status, headers = await stream.__anext__()
            break
        except gone as exc:
            # Nothing reached the client yet, so another replica may take it: Serve routes around a dead
            # replica once it learns of the death, which can take a moment after the process is gone.
            log.warning("replica gone before answering %s %s (attempt %d): %r", request.method, request.url.path,
                        attempt, exc)
    else:
        return replica_gone().response()
    sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
    response = StreamingResponse(_body(stream, request.url.path if sse else None, gone), status_code=status)
    response.raw_headers = [(bytes(k), bytes(v)) for k, v in headers]  # as the replica sent them
    return response


async def _body(stream: Any, sse_path: str | None, gone: tuple[type[BaseException], ...]) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for _, chunk in stream:
            yield chunk
        finished = True
    except Exception as exc:  # whatever cut it, a stream ends in its own error shape
        if sse_path is None:
            raise  # a plain body cut mid-way has no error shape: the connection ends
        error = replica_gone() if isinstance(exc, gone) else APIError(
            500, "the replica failed while streaming this response", code="replica_error")
        log.warning("stream %s cut: %r", sse_path, exc)
        finished = True
        yield cut_stream_tail(sse_path, error)
    finally:
        if not finished and hasattr(stream, "cancel"):
            stream.cancel()  # the client went away: stop the replica's side too (it tells its app)
