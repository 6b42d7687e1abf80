"""A truthful /openapi.json: the one error envelope on every error status, SSE documented as text/event-stream,
response schemas for the JSON bodies, and the bearer security the routes actually enforce.

FastAPI alone would declare `422: HTTPValidationError` (`{"detail": [...]}`), a shape this server never sends
(app/errors.py rewrites every error into `{"error": {...}}`), and it cannot see statuses raised as `APIError`,
streams, or what the auth dependencies check. `install_openapi(app)` post-processes the generated document once,
from the table below; tests/test_fuzz_api.py holds the server to it with schemathesis.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import fastapi.routing
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from pocketgpt.app.auth import require_api_key
from pocketgpt.app.routes.admin import require_admin
from pocketgpt.app.routes.tokenize import DetokenizeResponse, TokenizeResponse
from pocketgpt.model.chat import ROLES as CHAT_ROLES

ENVELOPE_REF = "#/components/schemas/ErrorResponse"
_REF = "#/components/schemas/{model}"


# -- the error envelope -------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str = Field(description="what went wrong, for a person")
    type: str = Field(description="error class: invalid_request_error, authentication_error, overloaded_error, ...")
    param: str | None = Field(description="the request field to blame, when there is one")
    code: str | None = Field(description="machine-readable reason, e.g. queue_full, invalid_admin_token")


class ErrorResponse(BaseModel):
    """Every error this server answers with, whatever its status."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


# -- success bodies -----------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class OpenAIUsage(Usage):
    """OpenAI's usage: `prompt_tokens_details.cached_tokens` counts prompt tokens served by the prefix cache."""

    prompt_tokens_details: PromptTokensDetails


class Timings(BaseModel):
    ttft_ms: float | None
    total_ms: float
    tokens_per_s: float


class TopLogprobId(BaseModel):
    id: int
    logprob: float


class GenerateLogprob(BaseModel):
    """/v1/generate's logprobs of one sampled token (raw model distribution) and its top alternatives."""

    id: int
    logprob: float
    top_logprobs: list[TopLogprobId]


class GenerateChoice(BaseModel):
    """One of a /v1/generate request's n choices (choice i sampled with seed + i)."""

    index: int
    text: str
    finish_reason: Literal["eos", "stop_sequence", "length"]
    stop_sequence: str | None
    seed: int
    completion_tokens: int
    logprobs: list[GenerateLogprob] | None = Field(None, description="only with `logprobs` in the request")


class GenerateResponse(BaseModel):
    """POST /v1/generate without `stream` (also the data of the stream's `done` event). The top-level fields are
    choice 0's; with n > 1, `choices` holds every choice and `usage`/`timings` cover them all."""

    id: str
    model: str
    text: str
    finish_reason: Literal["eos", "stop_sequence", "length"]
    stop_sequence: str | None
    seed: int
    usage: Usage
    timings: Timings
    logprobs: list[GenerateLogprob] | None = Field(None, description="only with `logprobs` in the request")
    choices: list[GenerateChoice] | None = Field(None, description="every choice, present when n > 1")


class CompletionLogprobs(BaseModel):
    """OpenAI completions' logprobs: one entry per token (with `echo`, the prompt's first; its logprob null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    model: str


class Info(BaseModel):
    model: str
    checkpoint: str
    config: dict[str, Any]
    context_length: int
    parameters: int | None
    device: str
    dtype: str
    prefix_cache_tokens: int = 0
    meta: dict[str, Any]
    chat_template: bool = Field(False, description="the model has a chat template: /v1/chat/completions works")
    limits: dict[str, Any]


class Job(BaseModel):
    """A training job (admin API)."""

    object: Literal["training.job"]
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
    name: str | None
    request: dict[str, Any]
    args: list[str]
    run_dir: str
    created_at: float
    attempts: int
    step: int | None
    total_steps: int | None
    error: str | None
    checkpoints: dict[str, str | None]
    url: str
    events_url: str
    logs_url: str


class JobList(BaseModel):
    object: Literal["list"]
    data: list[Job]


class Dataset(BaseModel):
    object: Literal["dataset"]
    id: str
    filename: str
    path: str
    bytes: int
    lines: int
    sha256: str
    created_at: float


class DatasetList(BaseModel):
    object: Literal["list"]
    data: list[Dataset]


class CheckpointItem(BaseModel):
    name: str
    path: str
    step: int | None
    val_loss: float | None
    params: int | None
    size_bytes: int
    created: float | None
    job: str | None
    serving: bool


class CheckpointList(BaseModel):
    object: Literal["list"]
    data: list[CheckpointItem]


class ServedModel(BaseModel):
    object: Literal["model"]
    checkpoint: str | None
    path: str | None
    draining: bool | None = None


# -- stream events: the `data` of each server-sent event -----------------------------------------------------
class TokenEvent(BaseModel):
    """/v1/generate `event: token`: one sampled token and the text it makes safe to show (may be "")."""

    index: int = Field(description="the token's position in its choice's output")
    id: int
    text: str
    logprob: GenerateLogprob | None = Field(None, description="only with `logprobs` in the request")
    choice: int = Field(description="which of the request's n choices it belongs to")


class CompletionChunkChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: OpenAIUsage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: OpenAIUsage | None = None


_MODELS: list[type[BaseModel]] = [
    ErrorResponse, GenerateResponse, CompletionResponse, ChatCompletionResponse, ModelCard, ModelList, Health, Ready,
    Info, Job, JobList, Dataset, DatasetList, CheckpointList, ServedModel, TokenEvent, CompletionChunk,
    ChatCompletionChunk, TokenizeResponse, DetokenizeResponse,
]


def _json_data(*models: str) -> dict[str, Any]:
    """An SSE `data` field holding JSON that matches one of `models`."""
    refs = [{"$ref": _REF.format(model=m)} for m in models]
    return {"type": "string", "contentMediaType": "application/json",
            "contentSchema": refs[0] if len(refs) == 1 else {"anyOf": refs}}


def _event(name: str | None, data: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {"data": data}
    if name is not None:
        properties["event"] = {"const": name}
    return {"type": "object", "required": ["data", *(["event"] if name else [])], "properties": properties}


def _openai_events(chunk: str) -> dict[str, Any]:
    """OpenAI streams: unnamed events whose data is a chunk (or an error envelope), then `[DONE]`."""
    return {"anyOf": [_event(None, {"const": "[DONE]"}), _event(None, _json_data(chunk, "ErrorResponse"))]}


# One schema per event (Open API 3.1 reads a text/event-stream `schema` as the schema of each event).
STREAM_EVENTS: dict[str, dict[str, Any]] = {
    "/v1/generate": {"anyOf": [_event("token", _json_data("TokenEvent")),
                               _event("done", _json_data("GenerateResponse")),
                               _event("error", _json_data("ErrorResponse"))]},
    "/v1/completions": _openai_events("CompletionChunk"),
    "/v1/chat/completions": _openai_events("ChatCompletionChunk"),
    # The job's metrics records (event = record type), then `status` with the job; or `error` at server shutdown.
    "/admin/jobs/{job_id}/events": {"anyOf": [
        _event("status", _json_data("Job")),
        _event("error", _json_data("ErrorResponse")),
        {"type": "object", "required": ["event", "data"],
         "properties": {"event": {"type": "string"}, "id": {"type": "string"},
                        "data": {"type": "string", "contentMediaType": "application/json",
                                 "contentSchema": {"type": "object", "required": ["type"]}}}},
    ]},
}

# -- what each operation answers ----------------------------------------------------------------------------
# Statuses every operation can answer: 400 (a malformed Content-Length), 408 (a body not sent in time), 413 (a body
# over the limit) and 500.
COMMON_ERRORS = (400, 408, 413, 500)
# The errors the generation routes add: 422 validation, 429 queue full, 503 no model / swapping, 504 timeout.
_GENERATION = (422, 429, 503, 504)


class Op:
    """The documented outcome of one operation: success status and body, error statuses, streaming."""

    def __init__(self, status: int, body: type[BaseModel] | str | None, errors: tuple[int, ...] = (),
                 stream: Literal["no", "optional", "only"] = "no") -> None:
        self.status, self.body, self.errors, self.stream = status, body, errors, stream


# (method, path) -> Op. Every route of the app must be here (a test checks); auth statuses are added from the
# route's dependencies (401 for API keys when configured, 401/403 for the admin API).
OPERATIONS: dict[tuple[str, str], Op] = {
    ("POST", "/v1/generate"): Op(200, GenerateResponse, _GENERATION, stream="optional"),
    ("POST", "/v1/completions"): Op(200, CompletionResponse, (404, *_GENERATION), stream="optional"),
    ("POST", "/v1/chat/completions"): Op(200, ChatCompletionResponse, (404, *_GENERATION), stream="optional"),
    ("POST", "/v1/tokenize"): Op(200, TokenizeResponse, (404, 422, 503)),
    ("POST", "/v1/detokenize"): Op(200, DetokenizeResponse, (404, 422, 503)),
    ("GET", "/v1/models"): Op(200, ModelList, (503,)),
    ("GET", "/v1/models/{model_id}"): Op(200, ModelCard, (404, 503)),
    ("GET", "/healthz"): Op(200, Health),
    ("GET", "/readyz"): Op(200, Ready, (503,)),
    ("GET", "/info"): Op(200, Info, (503,)),
    ("GET", "/metrics"): Op(200, "text/plain"),
    ("POST", "/admin/jobs"): Op(202, Job, (422,)),
    ("GET", "/admin/jobs"): Op(200, JobList, (422,)),
    ("GET", "/admin/jobs/{job_id}"): Op(200, Job, (404,)),
    ("GET", "/admin/jobs/{job_id}/events"): Op(200, None, (404, 422), stream="only"),
    ("GET", "/admin/jobs/{job_id}/logs"): Op(200, "text/plain", (404, 422)),
    ("POST", "/admin/jobs/{job_id}/cancel"): Op(200, Job, (404, 409)),
    ("POST", "/admin/jobs/{job_id}/resume"): Op(202, Job, (404, 409)),
    ("POST", "/admin/datasets"): Op(201, Dataset, (422,)),
    ("GET", "/admin/datasets"): Op(200, DatasetList),
    ("GET", "/admin/datasets/{dataset_id}"): Op(200, Dataset, (404,)),
    ("GET", "/admin/checkpoints"): Op(200, CheckpointList),
    ("GET", "/admin/model"): Op(200, ServedModel),
    ("POST", "/admin/model"): Op(200, ServedModel, (404, 422)),
}

_DESCRIPTIONS = {
    400: "Bad request (malformed header, unsupported parameter or upload)",
    401: "Missing or invalid bearer token",
    403: "The admin API is disabled (no POCKETGPT_ADMIN_TOKEN)",
    404: "Not found (or an unknown model)",
    408: "The request body did not arrive in time",
    409: "Conflict with the job's state",
    413: "Request body or upload over the limit",
    422: "Invalid request (a field, or a body that is not JSON)",
    429: "Busy: every slot and queue place taken (see Retry-After)",
    500: "Internal error",
    503: "No model loaded, or a model swap in progress",
    504: "The request timed out",
}


def api_routes(app: FastAPI) -> Iterator[tuple[str, set[str], APIRoute]]:
    """(path, methods, route) of every API route, looking into included routers (which recent FastAPI versions
    keep nested rather than copying their routes into the app)."""
    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if iter_contexts is None:
        for route in app.routes:
            if isinstance(route, APIRoute):
                yield route.path_format, set(route.methods), route
        return
    for context in iter_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIRoute):
            yield context.path_format, set(context.methods or ()), route


def _dependency_calls(route: APIRoute) -> set[Any]:
    calls, stack = set(), [route.dependant]
    while stack:
        dep = stack.pop()
        if dep.call is not None:
            calls.add(dep.call)
        stack.extend(dep.dependencies)
    return calls


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": ref}}}


def _sse(path: str) -> dict[str, Any]:
    return {"text/event-stream": {"schema": STREAM_EVENTS[path],
                                  "description": "server-sent events (see the route's description)"}}


# Request fields whose upper bound is a server setting (the request is refused with 422 beyond it).
_SETTING_BOUNDS = {
    ("GenerateRequest", "max_new_tokens"): ("maximum", "max_new_tokens"),
    ("CompletionRequest", "max_tokens"): ("maximum", "max_new_tokens"),
    ("ChatCompletionRequest", "max_tokens"): ("maximum", "max_new_tokens"),
    ("ChatCompletionRequest", "max_completion_tokens"): ("maximum", "max_new_tokens"),
    ("GenerateRequest", "prompt"): ("maxLength", "max_prompt_chars"),
    ("GenerateRequest", "regex"): ("maxLength", "max_schema_bytes"),  # bytes: a non-ASCII one may be 422 sooner
    ("GenerateRequest", "grammar"): ("maxLength", "max_schema_bytes"),
    ("CompletionRequest", "prompt"): ("maxLength", "max_prompt_chars"),
    ("ChatCompletionRequest", "messages"): ("maxItems", "max_messages"),
    ("TokenizeRequest", "prompt"): ("maxLength", "max_prompt_chars"),
    ("TokenizeRequest", "messages"): ("maxItems", "max_messages"),
    ("GenerateRequest", "n"): ("maximum", "n_limit"),
    ("CompletionRequest", "n"): ("maximum", "n_limit"),
    ("ChatCompletionRequest", "n"): ("maximum", "n_limit"),
}


def _server_bounds(schemas: dict[str, Any], settings: Any) -> None:
    """Write this server's limits into the request schemas, so the document says what will be accepted."""
    kinds = {"maximum": "integer", "maxLength": "string", "maxItems": "array"}
    for (model, field), (keyword, setting) in _SETTING_BOUNDS.items():
        prop = schemas.get(model, {}).get("properties", {}).get(field)
        if prop is None:
            continue
        bound = getattr(settings, setting)
        for branch in [prop, *prop.get("anyOf", [])]:
            if branch.get("type") == kinds[keyword]:
                branch[keyword] = bound
        if keyword == "maximum" and isinstance(prop.get("default"), int):
            prop["default"] = min(prop["default"], bound)  # an omitted field is never over the bound
    role = schemas.get("ChatMessage", {}).get("properties", {}).get("role")
    if role is not None:  # any other role is refused (400 unsupported_role)
        role["enum"] = [*CHAT_ROLES, "developer"]


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """Generate the document with FastAPI, then make it say what the server does."""
    schema = FastAPI.openapi(app)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    _, defs = models_json_schema([(m, "serialization") for m in _MODELS], ref_template=_REF)
    schemas.update(defs.get("$defs", {}))
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    settings = app.state.settings
    _server_bounds(schemas, settings)
    security = components.setdefault("securitySchemes", {})

    for path, methods, route in api_routes(app):
        deps = _dependency_calls(route)
        for method in methods:
            doc = schema["paths"].get(path, {}).get(method.lower())
            if doc is None:  # include_in_schema=False
                continue
            op = OPERATIONS.get((method, path))
            if op is None:  # undeclared: keep FastAPI's success response, still document the errors
                op = Op(int(next(iter(doc["responses"]))), None, (422,))
            errors = set(COMMON_ERRORS) | set(op.errors)
            if require_admin in deps:
                errors |= {401, 403}
                security["adminToken"] = {"type": "http", "scheme": "bearer",
                                          "description": "POCKETGPT_ADMIN_TOKEN (the admin API only)"}
                doc["security"] = [{"adminToken": []}]
            elif require_api_key in deps and settings.api_keys:
                errors.add(401)
                security["apiKey"] = {"type": "http", "scheme": "bearer",
                                      "description": "one of POCKETGPT_API_KEYS"}
                doc["security"] = [{"apiKey": []}]
            success = doc["responses"].get(str(op.status)) or doc["responses"].pop("200", None) or {}
            success.setdefault("description", "Successful Response")
            if op.stream == "only":
                success["content"] = _sse(path)
            elif isinstance(op.body, str):
                success["content"] = {op.body: {"schema": {"type": "string"}}}
            else:
                content = _json(_REF.format(model=op.body.__name__)) if op.body else \
                    success.get("content") or {"application/json": {"schema": {}}}
                if op.stream == "optional":
                    content = {**content, **_sse(path)}
                success["content"] = content
            responses = {str(op.status): success}
            for status in sorted(errors):
                responses[str(status)] = {"description": _DESCRIPTIONS.get(status, "Error"),
                                          "content": _json(ENVELOPE_REF)}
            doc["responses"] = responses
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi(app)` (built once, on first request) as /openapi.json."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
