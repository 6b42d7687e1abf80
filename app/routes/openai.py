"""OpenAI-compatible routes: POST /v1/completions (JSON and SSE), GET /v1/models and GET /v1/models/{id}.

Point the official client at the server with `OpenAI(base_url="http://host:port/v1", api_key=...)`.
A stream is `data: {chunk}` lines ending with `data: [DONE]`; with `stream_options.include_usage` a last chunk
with empty `choices` carries the usage.
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
from pocketgpt.app.engine.types import Logprob, TokenEvent
from pocketgpt.app.errors import APIError
from pocketgpt.app.generation import Generation, check_model, wait_or_cancel
from pocketgpt.app.logprob_format import CompletionLogprobs
from pocketgpt.app.schemas import CompletionRequest, openai_finish_reason

router = APIRouter(dependencies=[Depends(require_api_key)])


def dumps(data: object) -> str:
    """Compact JSON for SSE data lines."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _head(generation: Generation, created: int) -> dict[str, Any]:
    return {"id": generation.id.replace("gen-", "cmpl-", 1), "object": "text_completion", "created": created,
            "model": generation.model}


def _choice(text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}


async def openai_chunks(
    generation: Generation,
    include_usage: bool,
    head: dict[str, Any],
    piece: Callable[[str], dict[str, Any]],
    finish: Callable[[str], dict[str, Any]],
    opening: dict[str, Any] | None = None,
    logprobs: Callable[[list[TokenEvent]], dict[str, Any]] | None = None,
    echo: Callable[[], dict[str, Any]] | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """The OpenAI stream shape shared by completions and chat: `piece(text)` per token text, `finish(reason)`
    last, an optional usage chunk, errors as the envelope, then `[DONE]`.

    `logprobs(tokens)` (requests that asked) sets a chunk's `logprobs` from the tokens it shows: every token
    since the last chunk, held-back ones included. `echo()` is a chunk sent before the first token's (or the
    finish), once the prompt's logprobs have arrived."""
    extra = {"usage": None} if include_usage else {}
    pending: list[TokenEvent] = []

    def chunk(choice: dict[str, Any]) -> ServerSentEvent:
        if logprobs is not None and pending:
            choice["logprobs"] = logprobs(pending)
            pending.clear()
        return ServerSentEvent(dumps({**head, "choices": [choice], **extra}))

    try:
        if opening is not None:
            yield chunk(opening)
        async for token in generation.tokens():
            if echo is not None:
                yield chunk(echo())
                echo = None
            pending.append(token)
            if token.text:  # a held-back token (half a character, a possible stop string) has nothing to show
                yield chunk(piece(token.text))
        result = generation.final()
        if echo is not None:  # nothing generated (max_tokens 0)
            yield chunk(echo())
        yield chunk(finish(openai_finish_reason(result.finish_reason)))
        if include_usage:
            yield ServerSentEvent(dumps({**head, "choices": [], "usage": result.openai_usage()}))
    except APIError as exc:
        yield ServerSentEvent(dumps(exc.body()))
    yield ServerSentEvent("[DONE]")


def _prompt_entries(generation: Generation) -> list[tuple[int, Logprob | None]]:
    """The prompt's (token, logprobs) for echo; the first token's logprobs are None."""
    return list(zip(generation.ticket.request.prompt_ids, generation.prompt_logprobs or (), strict=True))


def _chunks(generation: Generation, include_usage: bool, body: CompletionRequest) -> AsyncIterator[ServerSentEvent]:
    builder = CompletionLogprobs(generation.engine.tokenizer) if body.logprobs is not None else None

    def echo() -> dict[str, Any]:
        return _choice(generation.spec.prompt, None, builder.build(_prompt_entries(generation)) if builder else None)

    return openai_chunks(generation, include_usage, _head(generation, int(time.time())),
                         piece=lambda text: _choice(text, None), finish=lambda reason: _choice("", reason),
                         logprobs=(lambda tokens: builder.build((t.id, t.logprob) for t in tokens)) if builder
                         else None,
                         echo=echo if body.echo else None)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, ctx: AppContext = Depends(get_ctx)) -> Response:
    """OpenAI legacy completions for one prompt."""
    spec = body.to_spec(ctx.settings)
    request.state.user = body.user
    generation = await start_generation(ctx, spec, request)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return ctx.sse(_chunks(generation, include_usage, body))
    result = await wait_or_cancel(generation, watch_disconnect(request))
    if result is None:
        return Response(status_code=499)
    text, logprobs = result.text, None
    if body.logprobs is not None:
        entries = list(zip(result.token_ids, result.logprobs or (), strict=True))
        logprobs = CompletionLogprobs(generation.engine.tokenizer).build(
            _prompt_entries(generation) + entries if body.echo else entries)
    if body.echo:
        text = spec.prompt + text
    return JSONResponse({
        **_head(generation, int(time.time())),
        "choices": [_choice(text, openai_finish_reason(result.finish_reason), logprobs)],
        "usage": result.openai_usage(),
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
