"""Operations: liveness, readiness, model info and Prometheus metrics. Only /info needs an API key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from pocketgpt.app.auth import require_api_key
from pocketgpt.app.context import AppContext, get_ctx
from pocketgpt.app.errors import APIError
from pocketgpt.app.metrics import CONTENT_TYPE
from pocketgpt.app.shutdown import shutting_down_error
from pocketgpt.model.chat import ChatTemplate

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(ctx: AppContext = Depends(get_ctx)) -> Response:
    """200 once a model is loaded and its engine thread is alive; 503 before, and once shutdown has begun."""
    if ctx.drain.draining:
        return shutting_down_error().response()
    engine = ctx.holder.current
    if engine is None or not engine.alive:
        return APIError(503, "the model is not loaded yet", code="model_not_ready").response()
    return JSONResponse({"status": "ready", "model": engine.name})


@router.get("/info", dependencies=[Depends(require_api_key)])
async def info(request: Request, ctx: AppContext = Depends(get_ctx)) -> dict[str, Any]:
    """Model, checkpoint path, config, context length, device, dtype, whether it takes chat messages
    (`chat_template`: /v1/chat/completions answers 400 `no_chat_template` without one) and the server's limits
    (and, under Ray Serve, which replica answered)."""
    engine = ctx.holder.current
    if engine is None:
        raise APIError(503, "the model is not loaded yet", code="model_not_ready")
    replica = getattr(request.app.state, "replica", None)  # set by app/ray_serve.py
    chat = ChatTemplate.from_meta(engine.meta) is not None  # validated when the checkpoint was loaded
    return {**engine.info(), "chat_template": chat, "limits": ctx.settings.limits(),
            **({"replica": replica} if replica else {})}


@router.get("/metrics")
async def metrics(ctx: AppContext = Depends(get_ctx)) -> Response:
    """Prometheus exposition format."""
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)
