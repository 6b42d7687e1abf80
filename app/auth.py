"""Optional bearer API keys for the inference routes. With no keys configured the routes are open."""

from __future__ import annotations

import hmac

from fastapi import Request

from pocketgpt.app.errors import APIError


def key_matches(presented: str, keys: list[str]) -> bool:
    """Constant-time comparison against every key (no early exit that would reveal which one is close)."""
    given = presented.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless `Authorization: Bearer <key>` carries a configured key."""
    keys = request.app.state.ctx.settings.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not key_matches(token.strip(), keys):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
