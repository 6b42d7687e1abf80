"""OpenAI-compatible routes: POST /v1/completions (JSON and SSE), GET /v1/models and GET /v1/models/{id}.

Point the official client at the server with `OpenAI(base_url="http://host:port/v1", api_key=...)`.
A stream is `data: {chunk}` lines ending with `data: [DONE]`; with `stream_options.include_usage` a last chunk
with empty `choices` carries the usage. With `n` > 1 the choices' chunks interleave, each naming its `index`,
and each choice's last chunk carries its `finish_reason`; the usage counts the prompt once and sums the choices'
completion tokens, as OpenAI's does.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import ServerSentEvent

from pocketgpt.app.auth import require_api_key
from pocketgpt.app.context import AppContext, get_ctx, start_generation, watch_disconnect
from pocketgpt.app.engine.types import DoneEvent
from pocketgpt.app.errors import APIError
from pocketgpt.app.generation import Generation, check_model, wait_or_cancel
from pocketgpt.app.schemas import CompletionRequest, openai_finish_reason

router = APIRouter(dependencies=[Depends(require_api_key)])


def dumps(data: object) -> str:
    """Compact JSON for SSE data lines."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _head(generation: Generation, created: int) -> dict[str, Any]:
    return {"id": generation.id.replace("gen-", "cmpl-", 1), "object": "text_completion", "created": created,
            "model": generation.model}


def _choice(text: str, finish_reason: str | None, index: int = 0) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


async def openai_chunks(
    generation: Generation,
    include_usage: bool,
    head: dict[str, Any],
    piece: Callable[[str, int], dict[str, Any]],
    finish: Callable[[str, int], dict[str, Any]],
    opening: Callable[[int], dict[str, Any]] | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """The OpenAI stream shape shared by completions and chat: `opening(index)` per choice first, `piece(text,
    index)` per token text, `finish(reason, index)` when a choice ends, an optional usage chunk, errors as the
    envelope, then `[DONE]`."""
    extra = {"usage": None} if include_usage else {}

    def chunk(choice: dict[str, Any]) -> ServerSentEvent:
        return ServerSentEvent(dumps({**head, "choices": [choice], **extra}))

    try:
        if opening is not None:
            for index in range(generation.n):
                yield chunk(opening(index))
        async for event in generation.events():
            if isinstance(event, DoneEvent):
                yield chunk(finish(openai_finish_reason(event.finish_reason), event.choice))
            elif event.text:  # a held-back token (half a character, a possible stop string) has nothing to show
                yield chunk(piece(event.text, event.choice))
        if include_usage:
            yield ServerSentEvent(dumps({**head, "choices": [], "usage": generation.openai_usage()}))
    except APIError as exc:
        yield ServerSentEvent(dumps(exc.body()))
    yield ServerSentEvent("[DONE]")


def _chunks(generation: Generation, include_usage: bool) -> AsyncIterator[ServerSentEvent]:
    return openai_chunks(generation, include_usage, _head(generation, int(time.time())),
                         piece=lambda text, i: _choice(text, None, i), finish=lambda reason, i: _choice("", reason, i))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, ctx: AppContext = Depends(get_ctx)) -> Response:
    """OpenAI legacy completions for one prompt (n choices of it)."""
    spec = body.to_spec(ctx.settings)
    generation = await start_generation(ctx, spec, request)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return ctx.sse(_chunks(generation, include_usage))
    result = await wait_or_cancel(generation, watch_disconnect(request))
    if result is None:
        return Response(status_code=499)
    return JSONResponse({
        **_head(generation, int(time.time())),
        "choices": [_choice(r.text, openai_finish_reason(r.finish_reason), r.index) for r in generation.finals()],
        "usage": generation.openai_usage(),
    })


def _card(ctx: AppContext) -> dict[str, Any]:
    engine = ctx.holder.current
    if engine is None:
        raise APIError(503, "the model is not loaded yet", code="model_not_ready")
    created = int(engine.meta.get("created") or 0)
    return {"id": engine.name, "object": "model", "created": created, "owned_by": "pocketgpt"}


@router.get("/v1/models")
async def models(ctx: AppContext = Depends(get_ctx)) -> dict[str, Any]:
    """The served model (one, or none while loading)."""
    return {"object": "list", "data": [_card(ctx)]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, ctx: AppContext = Depends(get_ctx)) -> dict[str, Any]:
    """One model (the openai SDK's `models.retrieve`): the served one, by its id (which may hold a `/`) or by
    the other names it answers to; any other id is 404 `model_not_found`."""
    card = _card(ctx)
    check_model(model_id, card["id"])
    return card
