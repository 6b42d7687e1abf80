"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer and break streaming and disconnects).

- BodyLimitMiddleware: 413 for a body over the limit, by Content-Length up front and by counting the bytes
  that actually arrive (a chunked body has no Content-Length); 408 for a body that does not arrive in time.
- EnvelopeCORSMiddleware: Starlette's CORS, with a refused preflight answered in the error envelope.
- AccessMiddleware: a request id (X-Request-ID in and out), request metrics, one access-log line per request,
  and the 500 envelope for anything unhandled. Metric labels come from bounded sets (known methods, route
  templates), never from what a client typed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pocketgpt.app.errors import APIError, BodyTimeout, BodyTooLarge
from pocketgpt.app.metrics import Metrics

access_log = logging.getLogger("pocketgpt.access")
error_log = logging.getLogger("pocketgpt.error")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
# Methods that get their own metric label; anything else a client sends is counted as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")


def _printable(text: str, limit: int) -> str:
    """Client-controlled text for a log line: at most `limit` characters, no spaces, quotes or control
    characters (a path with an encoded newline must not forge a second log line)."""
    cut = text[:limit] + ("..." if len(text) > limit else "")
    cut = cut.replace('"', "%22").replace(" ", "%20")
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode(), cut)


class BodyLimitMiddleware:
    """`max_body_bytes` for every path, except path prefixes given their own limit in `prefix_limits`
    (None there: the route streams its body and enforces its own limit, e.g. dataset uploads)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, prefix_limits: dict[str, int | None] | None = None,
                 body_timeout: float | None = None) -> None:
        self.app = app
        self.default = max_body_bytes
        self.prefix_limits = prefix_limits or {}
        self.body_timeout = body_timeout

    def _limit_for(self, path: str) -> int | None:
        for prefix, limit in self.prefix_limits.items():
            if path.startswith(prefix):
                return limit
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit_for(scope["path"])
        # A body under the general limit must arrive whole within the timeout; a streamed upload (its own limit,
        # up to hundreds of MB) must keep arriving: the timeout is then the most time between two chunks.
        receive = self._timed(receive, whole=limit is not None)
        try:
            if limit is None:
                await self.app(scope, receive, send)
            else:
                await self._limited(scope, receive, send, limit)
        except BodyTimeout as exc:  # read outside a route (the app's handler answers the ones inside)
            await APIError(408, exc.detail, code="body_timeout", headers=dict(exc.headers or {})).response()(
                scope, receive, send)

    def _timed(self, receive: Receive, whole: bool) -> Receive:
        """`receive` that raises BodyTimeout when the body stalls; no deadline once the body is complete (later
        receives wait for the client to disconnect, which may take as long as a stream lasts)."""
        timeout = self.body_timeout
        if timeout is None:
            return receive
        deadline = asyncio.get_running_loop().time() + timeout
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            wait = max(0.0, deadline - asyncio.get_running_loop().time()) if whole else timeout
            try:
                message = await asyncio.wait_for(receive(), wait)
            except asyncio.TimeoutError:
                raise BodyTimeout(timeout) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return timed_receive

    async def _limited(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await APIError(400, "invalid Content-Length header", code="invalid_header").response()(
                    scope, receive, send)
                return
            if int(declared) > limit:
                await self._too_large(scope, receive, send, limit)
                return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge:
            # Normally the app's HTTPException handler answers; this covers a body read outside a route.
            if started:
                raise
            await self._too_large(scope, receive, send, limit)

    @staticmethod
    async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        error = APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
        await error.response()(scope, receive, send)


class EnvelopeCORSMiddleware(CORSMiddleware):
    """CORS for the configured origins (only installed when POCKETGPT_CORS_ORIGINS names some). A preflight from
    another origin (or for another method or header) gets the error envelope instead of Starlette's plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        reason = bytes(response.body).decode(errors="replace")
        return APIError(400, f"CORS preflight refused: {reason}", code="cors_refused", headers=headers).response()


class AccessMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get("x-request-id", "")
        request_id = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            error_log.exception("unhandled error in %s %s (request %s)", _printable(scope["method"], 16),
                                _printable(scope["path"], 256), request_id)
            if status is not None:
                raise  # the response has begun: nothing valid can be sent any more
            await APIError(500, "internal server error").response()(scope, receive, send_with_id)
        finally:
            self._record(scope, state, status or 500, time.perf_counter() - started)

    def _record(self, scope: Scope, state: dict, status: int, seconds: float) -> None:
        route = scope.get("route")
        # Every label from a bounded set: the route template, not the raw path (404s share one label), a known
        # method or "other" (300 made-up methods were 300 new series), and a status the server itself chose.
        label = getattr(route, "path", None) or "unmatched"
        method = scope["method"] if scope["method"] in METHODS else "other"
        self.metrics.requests.labels(route=label, method=method, status=str(status)).inc()
        self.metrics.request_duration.labels(route=label).observe(seconds)
        fields = [f'rid={state.get("request_id")}',
                  f'"{_printable(scope["method"], 16)} {_printable(scope["path"], 256)}"', str(status),
                  f"{seconds * 1000:.1f}ms"]
        generation = state.get("generation")
        if generation is not None:
            result = generation.result
            if result is not None:
                completion = generation.usage()["completion_tokens"]  # every choice's, with n > 1
                fields += [f"prompt_tokens={result.prompt_tokens}", f"completion_tokens={completion}",
                           f"ttft_ms={result.ttft_ms or 0:.1f}", f"tokens_per_s={result.tokens_per_s:.1f}",
                           f"finish={result.finish_reason}", *([f"n={generation.n}"] if generation.n > 1 else [])]
            else:
                fields += [f"prompt_tokens={generation.prompt_tokens}",
                           f"finish={'error' if generation.error else 'cancelled'}"]
        user = state.get("user")  # OpenAI's `user` field: client-controlled, so escaped like the path
        if user:
            fields.append(f"user={_printable(user, 64)}")
        client = scope.get("client")
        if client:
            fields.insert(1, f"client={client[0]}")
        access_log.info(" ".join(fields))
