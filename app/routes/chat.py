"""POST /v1/chat/completions: OpenAI chat completions (JSON and SSE) for checkpoints with a chat template.

The messages are rendered with the served checkpoint's template (model.chat, the same code the fine-tuning
trainer used; an imported model's own Jinja template, model.chat_jinja), and generation stops at the
template's end marker or any of the model's end tokens. A checkpoint without a template answers 400
`no_chat_template`. A stream is `data: {chunk}` lines: the first delta carries the role, the last chunk with a
choice carries `finish_reason`, then, with `stream_options.include_usage`, a chunk with empty `choices` and the
usage, and finally `data: [DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import ServerSentEvent

from pocketgpt.app.auth import require_api_key
from pocketgpt.app.context import AppContext, get_ctx, start_generation, watch_disconnect
from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.errors import APIError
from pocketgpt.app.generation import Generation, PromptRenderer, wait_or_cancel
from pocketgpt.app.logprob_format import chat_logprobs
from pocketgpt.app.routes.openai import openai_chunks
from pocketgpt.app.schemas import ChatCompletionRequest, openai_finish_reason
from pocketgpt.model.chat import ChatTemplate

router = APIRouter(dependencies=[Depends(require_api_key)])


def chat_renderer(messages: list[dict[str, str]]) -> PromptRenderer:
    """Render `messages` with the template of whichever engine admits the request."""

    def render(engine: Engine) -> tuple[list[int], tuple[int, ...]]:
        template = ChatTemplate.from_meta(engine.meta)  # validated when the checkpoint was loaded
        if template is None:
            raise APIError(
                400, f"model {engine.name!r} has no chat template, so it cannot take chat messages: it was not "
                "fine-tuned on conversations. Use /v1/completions with a text prompt, or fine-tune it with "
                "`pocketgpt train --task sft` on messages data.", param="messages", code="no_chat_template")
        try:
            rendered = template.render(engine.tokenizer, messages, add_generation_prompt=True)
        except ValueError as e:  # a model's own template refused them, or content holds a special token
            raise APIError(422, str(e), param="messages", code="invalid_messages") from None
        return rendered.ids, template.stop_ids(engine.tokenizer)

    return render


def _head(generation: Generation, created: int, chunk: bool) -> dict[str, Any]:
    return {"id": generation.id.replace("gen-", "chatcmpl-", 1),
            "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": created, "model": generation.model}


def _delta(delta: dict[str, str], finish_reason: str | None, index: int) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _chunks(generation: Generation, include_usage: bool) -> AsyncIterator[ServerSentEvent]:
    tokenizer = generation.engine.tokenizer
    asked = generation.ticket.request.logprobs is not None
    return openai_chunks(generation, include_usage, _head(generation, int(time.time()), chunk=True),
                         piece=lambda text, i: _delta({"content": text}, None, i),
                         finish=lambda reason, i: _delta({}, reason, i),
                         opening=lambda i: _delta({"role": "assistant", "content": ""}, None, i),
                         logprobs=(lambda tokens, i: chat_logprobs(tokenizer, (t.logprob for t in tokens)))
                         if asked else None)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           ctx: AppContext = Depends(get_ctx)) -> Response:
    """OpenAI chat completions for one conversation (n choices of its next message)."""
    spec = body.to_spec(ctx.settings, chat_renderer)
    request.state.user = body.user
    generation = await start_generation(ctx, spec, request)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return ctx.sse(_chunks(generation, include_usage))
    result = await wait_or_cancel(generation, watch_disconnect(request))
    if result is None:
        return Response(status_code=499)
    tokenizer = generation.engine.tokenizer
    return JSONResponse({
        **_head(generation, int(time.time()), chunk=False),
        "choices": [{"index": r.index, "message": {"role": "assistant", "content": r.text},
                     "logprobs": chat_logprobs(tokenizer, r.logprobs) if r.logprobs is not None else None,
                     "finish_reason": openai_finish_reason(r.finish_reason)} for r in generation.finals()],
        "usage": generation.openai_usage(),
    })
