"""POST /v1/tokenize and /v1/detokenize, as vLLM's: count tokens before sending a request, or read ids back.

`/v1/tokenize` takes a `prompt` (encoded exactly as /v1/completions encodes it, a BOS token included where the
model expects one; token healing, which only applies at generation, aside) or chat `messages` (rendered with
the served model's chat template and the assistant's turn opened, as /v1/chat/completions renders them), and
answers `{"tokens", "count", "max_model_len"}`. `/v1/detokenize` takes `{"tokens"}` and answers `{"prompt"}`;
ids outside the vocabulary are 422 naming the position (`tokens.3`).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from pocketgpt.app.auth import require_api_key
from pocketgpt.app.context import AppContext, get_ctx
from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.errors import APIError
from pocketgpt.app.generation import check_model
from pocketgpt.app.routes.chat import chat_renderer
from pocketgpt.app.schemas import MAX_MESSAGES_CAP, STRICT, ChatMessage

router = APIRouter(dependencies=[Depends(require_api_key)])

MAX_DETOKENIZE = 131_072  # ids per /v1/detokenize request


class TokenizeRequest(BaseModel):
    """POST /v1/tokenize: exactly one of `prompt` and `messages`."""

    model_config = ConfigDict(STRICT, extra="forbid")

    model: str | None = Field(None, description="the served model's id; optional")
    prompt: str | None = Field(None, description="text to tokenize as /v1/completions would")
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES_CAP)] | None = Field(
        None, description="a conversation to render with the model's chat template, as /v1/chat/completions would")


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    """POST /v1/detokenize."""

    model_config = ConfigDict(STRICT, extra="forbid")

    model: str | None = Field(None, description="the served model's id; optional")
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE, description="token ids of the served model's vocabulary")


class DetokenizeResponse(BaseModel):
    prompt: str


def _engine(ctx: AppContext, model: str | None) -> Engine:
    engine = ctx.holder.current
    if engine is None:
        raise APIError(503, "the model is not loaded yet", code="model_not_ready")
    check_model(model, engine.name)
    return engine


def _encode(engine: Engine, body: TokenizeRequest, ctx: AppContext) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise APIError(422, "give exactly one of prompt and messages", param="prompt", code="invalid_value")
    if body.prompt is not None:
        if len(body.prompt) > ctx.settings.max_prompt_chars:
            raise APIError(422, f"prompt is {len(body.prompt)} characters; the limit is "
                           f"{ctx.settings.max_prompt_chars}", param="prompt", code="prompt_too_long")
        return engine.tokenizer.encode_prompt(body.prompt, allow_special=False)
    if len(body.messages) > ctx.settings.max_messages:
        raise APIError(422, f"messages holds {len(body.messages)} messages; the limit is {ctx.settings.max_messages}",
                       param="messages", code="too_many_messages")
    messages = [m.as_dict(i) for i, m in enumerate(body.messages)]
    if sum(len(m["content"]) for m in messages) > ctx.settings.max_prompt_chars:
        raise APIError(422, f"messages hold more than {ctx.settings.max_prompt_chars} characters",
                       param="messages", code="prompt_too_long")
    return chat_renderer(messages)(engine)[0]


@router.post("/v1/tokenize")
async def tokenize(body: TokenizeRequest, ctx: AppContext = Depends(get_ctx)) -> TokenizeResponse:
    """Token ids of a prompt or a conversation, their count, and the model's context length."""
    engine = _engine(ctx, body.model)
    ids = await asyncio.to_thread(_encode, engine, body, ctx)  # a long prompt must not stall other streams
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.context_length)


@router.post("/v1/detokenize")
async def detokenize(body: DetokenizeRequest, ctx: AppContext = Depends(get_ctx)) -> DetokenizeResponse:
    """The text of token ids (special tokens vanish, as in generated text)."""
    engine = _engine(ctx, body.model)
    vocab = engine.tokenizer.vocab_size
    for i, token in enumerate(body.tokens):
        if not 0 <= token < vocab:
            raise APIError(422, f"tokens.{i} is {token}: ids run from 0 to {vocab - 1}", param=f"tokens.{i}",
                           code="invalid_token")
    return DetokenizeResponse(prompt=await asyncio.to_thread(engine.tokenizer.decode, body.tokens))
