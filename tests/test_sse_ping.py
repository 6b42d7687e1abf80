"""POCKETGPT_SSE_PING over a real server: a positive interval sends `: ping` comments, 0 sends none.

sse-starlette releases before its fix for issue #206 treated `ping=0` as "ping every 0 s" (a busy loop); the app
maps 0 to an interval no stream outlives (app/sse.py), so 0 means off whatever the installed release does.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.sse import NO_PING_S, ping_interval
from pocketgpt.app.testing import byte_token_ids, running_server, scripted_factory, slowed
from pocketgpt.model.tokenizer import Tokenizer
from tests.sse import events_in_text

STEP_S = 0.05  # engine step delay: 24 tokens take about 1.2 s
TOKENS = 24


def stream_lines(base: str) -> tuple[list[str], float]:
    """The raw lines of one /v1/generate stream and how long it lasted."""
    t0 = time.monotonic()
    body = {"prompt": "a", "max_new_tokens": TOKENS, "stream": True}
    with httpx.stream("POST", f"{base}/v1/generate", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    return lines, time.monotonic() - t0


@pytest.mark.parametrize("ping", [0.2, 0.0])
def test_sse_ping_setting(ping: float, tokenizer: Tokenizer, tmp_path: Path) -> None:
    script = byte_token_ids(tokenizer, b"abcdefgh")  # never the end-of-text token: all TOKENS are sent
    settings = Settings(checkpoint=tmp_path, sse_ping=ping)
    app = create_app(settings, engine_factory=scripted_factory(tokenizer, script, runner=slowed(STEP_S)))
    with running_server(app) as base:
        lines, seconds = stream_lines(base)
    pings = [line for line in lines if line.startswith(":")]
    assert any(line.startswith("event: done") for line in lines), lines[-5:]
    assert seconds > 4 * 0.2, f"the stream must outlast several 0.2 s intervals (took {seconds:.2f} s)"
    if ping:
        assert len(pings) >= 2, f"{len(pings)} ping comments in a {seconds:.2f} s stream"
    else:
        assert pings == [], pings[:5]


def test_zero_maps_to_no_pings() -> None:
    assert ping_interval(0) == NO_PING_S
    assert ping_interval(2.5) == 2.5


def test_a_ping_after_an_event_with_an_id_is_not_an_event() -> None:
    """The job-events stream sends ids and pings; the tests' reader must not see a ping as an (empty) event."""
    body = 'event: train\nid: 1\ndata: {"step": 1}\n\n: ping - now\n\nevent: status\ndata: {}\n\n'
    assert events_in_text(body) == [("train", '{"step": 1}'), ("status", "{}")]
