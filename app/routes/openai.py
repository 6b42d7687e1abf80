"""OpenAI-compatible routes: POST /v1/completions (JSON and SSE) and GET /v1/models.

Point the official client at the server with `OpenAI(base_url="http://host:port/v1", api_key=...)`.
A stream is `data: {chunk}` lines ending with `data: [DONE]`; with `stream_options.include_usage` a last chunk
with empty `choices` carries the usage.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.auth import require_api_key
from app.context import AppContext, get_ctx, start_generation, watch_disconnect
from app.errors import APIError
from app.generation import Generation, wait_or_cancel
from app.schemas import CompletionRequest, openai_finish_reason

router = APIRouter(dependencies=[Depends(require_api_key)])


def _dumps(data: object) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _head(generation: Generation, created: int) -> dict[str, Any]:
    return {"id": generation.id.replace("gen-", "cmpl-", 1), "object": "text_completion", "created": created,
            "model": generation.model}


def _choice(text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


async def _chunks(generation: Generation, include_usage: bool) -> AsyncIterator[ServerSentEvent]:
    head = _head(generation, int(time.time()))
    extra = {"usage": None} if include_usage else {}
    try:
        async for token in generation.tokens():
            if token.text:  # a held-back token has nothing to show yet
                yield ServerSentEvent(_dumps({**head, "choices": [_choice(token.text, None)], **extra}))
        result = generation.result
        assert result is not None
        yield ServerSentEvent(_dumps({**head, "choices": [_choice("", openai_finish_reason(result.finish_reason))],
                                      **extra}))
        if include_usage:
            yield ServerSentEvent(_dumps({**head, "choices": [], "usage": result.usage()}))
    except APIError as exc:
        yield ServerSentEvent(_dumps(exc.body()))
    yield ServerSentEvent("[DONE]")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, ctx: AppContext = Depends(get_ctx)) -> Response:
    """OpenAI legacy completions for one prompt."""
    spec = body.to_spec(ctx.settings)
    generation = start_generation(ctx, spec, request)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(_chunks(generation, include_usage), ping=ctx.settings.sse_ping)
    result = await wait_or_cancel(generation, watch_disconnect(request))
    if result is None:
        return Response(status_code=499)
    return JSONResponse({
        **_head(generation, int(time.time())),
        "choices": [_choice(result.text, openai_finish_reason(result.finish_reason))],
        "usage": result.usage(),
    })


@router.get("/v1/models")
async def models(ctx: AppContext = Depends(get_ctx)) -> dict[str, Any]:
    """The served model (one, or none while loading)."""
    engine = ctx.holder.current
    if engine is None:
        raise APIError(503, "the model is not loaded yet", code="model_not_ready")
    created = int(engine.meta.get("created") or 0)
    return {"object": "list",
            "data": [{"id": engine.name, "object": "model", "created": created, "owned_by": "pocketgpt"}]}
