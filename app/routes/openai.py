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
from pocketgpt.app.engine.types import DoneEvent, Logprob, TokenEvent
from pocketgpt.app.errors import APIError
from pocketgpt.app.generation import Generation, GenerationResult, check_model, wait_or_cancel
from pocketgpt.app.logprob_format import CompletionLogprobs
from pocketgpt.app.schemas import CompletionRequest, openai_finish_reason

router = APIRouter(dependencies=[Depends(require_api_key)])


def dumps(data: object) -> str:
    """Compact JSON for SSE data lines."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _head(generation: Generation, created: int) -> dict[str, Any]:
    return {"id": generation.id.replace("gen-", "cmpl-", 1), "object": "text_completion", "created": created,
            "model": generation.model}


def _choice(text: str, finish_reason: str | None, index: int = 0,
            logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


async def openai_chunks(
    generation: Generation,
    include_usage: bool,
    head: dict[str, Any],
    piece: Callable[[str, int], dict[str, Any]],
    finish: Callable[[str, int], dict[str, Any]],
    opening: Callable[[int], dict[str, Any]] | None = None,
    logprobs: Callable[[list[TokenEvent], int], dict[str, Any]] | None = None,
    echo: Callable[[int], dict[str, Any]] | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """The OpenAI stream shape shared by completions and chat: `opening(index)` per choice first, `piece(text,
    index)` per token text, `finish(reason, index)` when a choice ends, an optional usage chunk, errors as the
    envelope, then `[DONE]`.

    `logprobs(tokens, index)` (requests that asked) sets a chunk's `logprobs` from the tokens of choice `index`
    it shows: every token of that choice since its last chunk, held-back ones included. `echo(index)` is a chunk
    sent for each choice before its first token's (or its finish), once the prompt's logprobs have arrived."""
    extra = {"usage": None} if include_usage else {}
    pending: list[list[TokenEvent]] = [[] for _ in range(generation.n)]  # per choice
    unechoed = set(range(generation.n))  # the choices whose echo chunk is still to come

    def chunk(choice: dict[str, Any]) -> ServerSentEvent:
        held = pending[choice["index"]]
        if logprobs is not None and held:
            choice["logprobs"] = logprobs(held, choice["index"])
            held.clear()
        return ServerSentEvent(dumps({**head, "choices": [choice], **extra}))

    try:
        if opening is not None:
            for index in range(generation.n):
                yield chunk(opening(index))
        async for event in generation.events():
            if echo is not None and event.choice in unechoed:
                unechoed.discard(event.choice)
                yield chunk(echo(event.choice))
            if isinstance(event, DoneEvent):
                yield chunk(finish(openai_finish_reason(event.finish_reason), event.choice))
                continue
            pending[event.choice].append(event)
            if event.text:  # a held-back token (half a character, a possible stop string) has nothing to show
                yield chunk(piece(event.text, event.choice))
        if include_usage:
            yield ServerSentEvent(dumps({**head, "choices": [], "usage": generation.openai_usage()}))
    except APIError as exc:
        yield ServerSentEvent(dumps(exc.body()))
    yield ServerSentEvent("[DONE]")


def _prompt_entries(generation: Generation) -> list[tuple[int, Logprob | None]]:
    """The prompt's (token, logprobs) for echo; the first token's logprobs are None."""
    return list(zip(generation.ticket.request.prompt_ids, generation.prompt_logprobs or (), strict=True))


def _chunks(generation: Generation, include_usage: bool, body: CompletionRequest) -> AsyncIterator[ServerSentEvent]:
    tokenizer = generation.engine.tokenizer
    # One builder per choice: text offsets run on across a choice's chunks.
    builders = [CompletionLogprobs(tokenizer) for _ in range(generation.n)] if body.logprobs is not None else None

    def echo(index: int) -> dict[str, Any]:
        logprobs = builders[index].build(_prompt_entries(generation)) if builders else None
        return _choice(generation.spec.prompt, None, index, logprobs)

    return openai_chunks(generation, include_usage, _head(generation, int(time.time())),
                         piece=lambda text, i: _choice(text, None, i), finish=lambda reason, i: _choice("", reason, i),
                         logprobs=(lambda tokens, i: builders[i].build((t.id, t.logprob) for t in tokens))
                         if builders else None,
                         echo=echo if body.echo else None)


def _completion_choice(generation: Generation, body: CompletionRequest, result: GenerationResult) -> dict[str, Any]:
    """One choice of a non-stream completion: its text (after the prompt with `echo`) and logprobs."""
    text, logprobs = result.text, None
    if body.logprobs is not None:
        entries = list(zip(result.token_ids, result.logprobs or (), strict=True))
        logprobs = CompletionLogprobs(generation.engine.tokenizer).build(
            _prompt_entries(generation) + entries if body.echo else entries)
    if body.echo:
        text = generation.spec.prompt + text
    return _choice(text, openai_finish_reason(result.finish_reason), result.index, logprobs)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, ctx: AppContext = Depends(get_ctx)) -> Response:
    """OpenAI legacy completions for one prompt (n choices of it)."""
    spec = body.to_spec(ctx.settings)
    request.state.user = body.user
    generation = await start_generation(ctx, spec, request)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return ctx.sse(_chunks(generation, include_usage, body))
    result = await wait_or_cancel(generation, watch_disconnect(request))
    if result is None:
        return Response(status_code=499)
    return JSONResponse({
        **_head(generation, int(time.time())),
        "choices": [_completion_choice(generation, body, r) for r in generation.finals()],
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
