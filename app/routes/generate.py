"""POST /v1/generate: one JSON body, or server-sent events with `stream: true`.

SSE events:
    event: token   data: {"index": 0, "id": 123, "text": "Hel", "choice": 0}
                   one per sampled token (text may be ""); `index` counts the tokens of choice `choice`; with
                   `logprobs: K` also "logprob": {"id", "logprob", "top_logprobs": [{"id", "logprob"}] (K of them)}
    event: done    data: the same object as the non-stream response, once every choice has finished
    event: error   data: {"error": {...}}                          if the request fails after the stream began
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import ServerSentEvent

from pocketgpt.app.auth import require_api_key
from pocketgpt.app.context import AppContext, get_ctx, start_generation, watch_disconnect
from pocketgpt.app.errors import APIError
from pocketgpt.app.generation import Generation, wait_or_cancel
from pocketgpt.app.logprob_format import logprob_dict
from pocketgpt.app.schemas import GenerateRequest

router = APIRouter(dependencies=[Depends(require_api_key)])


def _dumps(data: object) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


async def _events(generation: Generation) -> AsyncIterator[ServerSentEvent]:
    try:
        async for token in generation.tokens():
            data = {"index": token.index, "id": token.id, "text": token.text, "choice": token.choice}
            if token.logprob is not None:
                data["logprob"] = logprob_dict(token.logprob)
            yield ServerSentEvent(_dumps(data), event="token")
        yield ServerSentEvent(_dumps(generation.to_dict()), event="done")
    except APIError as exc:
        yield ServerSentEvent(_dumps(exc.body()), event="error")


@router.post("/v1/generate")
async def generate(body: GenerateRequest, request: Request, ctx: AppContext = Depends(get_ctx)) -> Response:
    """Continue `prompt` (`n` times, from one prefill). Validation, readiness and admission all happen before the
    first byte is sent."""
    spec = body.to_spec(ctx.settings)
    generation = await start_generation(ctx, spec, request)
    if body.stream:
        return ctx.sse(_events(generation))
    result = await wait_or_cancel(generation, watch_disconnect(request))
    if result is None:
        return Response(status_code=499)  # client closed the request; nobody reads this
    return JSONResponse(generation.to_dict())
