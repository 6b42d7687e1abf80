"""The browser playground: `GET /` serves app/static/index.html, `/static/*` its CSS and JavaScript.

Both are open (no API key, no admin token): the page holds no secrets, and it asks for the keys itself, sending
them only from JavaScript to the API routes that need them. The static files are mounted under /static rather
than at `/`, so an unknown API path still gets the JSON 404 envelope, not a file-server 404.

The page loads nothing from other origins; the Content-Security-Policy says so, which also means a script
injected through model output (the page only ever sets it as text) would not run.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Everything from this origin only; `data:` images for the favicon. No inline scripts or styles.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate on each load (ETag/Last-Modified make that cheap), so a server upgrade is seen at once.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    """The playground page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


class _StaticFiles(StaticFiles):
    """StaticFiles that adds the page's headers (no-cache, nosniff) to every asset."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in PAGE_HEADERS.items()
                            if k != "Content-Security-Policy"]
                message = {**message, "headers": headers}
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


def install(app: FastAPI) -> None:
    """Add the page route and the /static mount to `app`."""
    app.include_router(router)
    app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="static")
