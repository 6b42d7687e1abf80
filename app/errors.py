"""One error envelope for every failure: `{"error": {"message", "type", "param", "code"}}`.

Routes raise `APIError`; FastAPI's validation errors and Starlette's HTTP errors (404, 405, 413) are
rewritten into the same shape, so a client has exactly one error format to parse.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# HTTP status -> OpenAI-style error type, for errors raised without an explicit type. Other 4xx statuses are
# `invalid_request_error` and other 5xx `server_error` (see `error_type`): a client's mistake is never typed as the
# server's.
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    429: "overloaded_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    """The error type for `status` (ERROR_TYPES, else by status class)."""
    return ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500 else "server_error")


class APIError(Exception):
    """An error with an HTTP status that is rendered as the envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The envelope, as a JSON-ready dict."""
        return envelope(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body past the limit. An HTTPException so FastAPI re-raises it unchanged."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class BodyTimeout(StarletteHTTPException):
    """Raised when a client does not send its body in time (408; the connection is closed after the answer)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within {seconds:g} seconds "
                         "(POCKETGPT_BODY_TIMEOUT)", headers={"Connection": "close"})


def envelope(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_UNION_TAG = re.compile(r"[^\w]")
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "any"}


def _field_loc(error: dict[str, Any]) -> list[str]:
    """The field an error is about: without the location kind ("body") and without the union member pydantic
    tried ("stop.constrained-str", "prompt.str"), which is not a field of the request."""
    loc = [str(p) for p in error.get("loc", ())]
    if loc and loc[0] in ("query", "path", "header"):
        return loc[1:2]  # a parameter's name, e.g. "Last-Event-ID"
    if loc and loc[0] == "body":
        loc = loc[1:]
    return [p for p in loc if not _UNION_TAG.search(p) and p not in _TYPE_NAMES]


_NOT_AN_OBJECT = {"model_attributes_type", "dict_type", "model_type"}


def _body_not_json(error: dict[str, Any], content_type: str | None) -> APIError | None:
    """A body that is not a JSON object, said in terms of what to send (FastAPI does not parse a body whose
    Content-Type is not JSON, so the model then sees bytes or a string)."""
    if tuple(error.get("loc", ())) != ("body",) or error.get("type") not in _NOT_AN_OBJECT:
        return None
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        sent = f"Content-Type {media!r}" if media else "no Content-Type"
        return APIError(422, f"the request body must be JSON sent with Content-Type: application/json (this "
                        f"request has {sent})", code="invalid_content_type")
    return APIError(422, "the request body must be a JSON object", code="invalid_body")


def validation_error(exc: RequestValidationError, content_type: str | None = None) -> APIError:
    """The first validation problem, naming its field in `param` (e.g. "temperature" or "stop.1")."""
    errors = exc.errors()
    if not errors:
        return APIError(422, "invalid request")
    first = errors[0]
    not_json = _body_not_json(first, content_type)
    if not_json is not None:
        return not_json
    loc = _field_loc(first)
    # A value that fits no member of a union gets one error per member; the member of the value's own type says
    # what is wrong ("at most 4 items"), the others only that it is not their type.
    same = [e for e in errors if _field_loc(e)[: len(loc)] == loc]
    first = next((e for e in same if not str(e.get("type", "")).endswith("_type")), first)
    loc = _field_loc(first)
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(422, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                        code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(422, f"unknown field {param!r}", param=param, code="unknown_field")
    if kind == "missing":
        message = f"field {param!r} is required" if param else "request body is required"
        return APIError(422, message, param=param, code="missing_field")
    message = first.get("msg", "invalid value")
    return APIError(422, f"{param}: {message}" if param else message, param=param, code="invalid_value")


# Starlette calls each handler only for its own exception class, so the handlers take that class.
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc, request.headers.get("content-type")).response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 408: "body_timeout",
             413: "body_too_large"}
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed for {request.url.path}"
    error = APIError(exc.status_code, message, code=codes.get(exc.status_code), headers=dict(exc.headers or {}))
    return error.response()


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    return APIError(500, "internal server error").response()


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the app can produce through the envelope."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
