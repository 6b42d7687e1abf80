"""Server shutdown with requests in flight (issue 13, item 12).

Over a real server process (`run_server`, what `pocketgpt serve` runs): SIGTERM while streams are open ends
each one cleanly (an `error` event on /v1/generate, an error chunk then `[DONE]` on /v1/completions, the
chunked body properly terminated) and the process exits 0 within the grace. In-process: new requests during
the drain get 503, /readyz answers 503, JSON requests still running at the end of the grace get the 503 envelope.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pocketgpt.app.engine.loader import load_engine
from pocketgpt.app.jobs.events import job_events
from pocketgpt.app.jobs.manager import JobManager
from pocketgpt.app.jobs.store import RUNNING, Job, JobStore
from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import slowed
from tests.conftest import make_tiny_checkpoint
from tests.serverproc import Proc, base_env, free_port, wait_ready
from tests.sse import aiter_events, iter_events

GRACE = 1.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A long context, so a 400-token stream at 20 ms a step is still running when the server is stopped.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("shutdown") / "tiny", block_size=512)


@pytest.fixture
def server(checkpoint: Path, tmp_path: Path) -> Iterator[tuple[str, Proc]]:
    port = free_port()
    env = base_env(POCKETGPT_CHECKPOINT=str(checkpoint), POCKETGPT_PORT=str(port), POCKETGPT_DEVICE="cpu",
                   POCKETGPT_SHUTDOWN_GRACE_S=str(GRACE), POCKETGPT_TEST_STEP_DELAY="0.02",
                   POCKETGPT_DB=str(tmp_path / "jobs.db"))
    proc = Proc(["python", "-m", "tests.slow_server"], env=env, log=tmp_path / "server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, timeout=90)
        yield base, proc
    finally:
        proc.stop()


class StreamReader(threading.Thread):
    """Reads one SSE stream to its end in a thread: its events, and the error if the body was cut."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[tuple[str, str]] = []
        self.failure: BaseException | None = None
        self.started_streaming = threading.Event()
        self.ended_at = float("inf")

    def run(self) -> None:
        try:
            with httpx.Client(timeout=30) as client, client.stream("POST", self.url, json=self.body) as response:
                response.raise_for_status()
                for sse in iter_events(response):  # raises RemoteProtocolError if the chunked body is cut off
                    self.events.append((sse.event, sse.data))
                    self.started_streaming.set()
        except BaseException as exc:  # reported by the test
            self.failure = exc
        finally:
            self.ended_at = time.monotonic()
            self.started_streaming.set()


def test_sigterm_ends_open_streams_cleanly_and_exits_zero(server: tuple[str, Proc]) -> None:
    base, proc = server
    generate = StreamReader(f"{base}/v1/generate", {"prompt": "The", "max_new_tokens": 400, "stream": True})
    completions = StreamReader(f"{base}/v1/completions", {"prompt": "The", "max_tokens": 400, "stream": True})
    for reader in (generate, completions):
        reader.start()
    for reader in (generate, completions):
        assert reader.started_streaming.wait(30), "no event within 30 s"
    time.sleep(0.3)  # a few tokens in: the streams are well under way

    t0 = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    for reader in (generate, completions):
        reader.join(GRACE + 10)
    code = proc.popen.wait(60)
    exited = time.monotonic() - t0
    log = proc.log()

    assert generate.failure is None, f"/v1/generate stream cut: {generate.failure!r}\n{log[-3000:]}"
    assert completions.failure is None, f"/v1/completions stream cut: {completions.failure!r}\n{log[-3000:]}"
    # /v1/generate: tokens, then one error event naming the shutdown (no `done`: the output is incomplete).
    kinds = [kind for kind, _ in generate.events]
    assert kinds[0] == "token" and kinds[-1] == "error" and "done" not in kinds, kinds
    assert json.loads(generate.events[-1][1])["error"]["code"] == "server_shutting_down"
    # /v1/completions: chunks, an error chunk, then [DONE].
    data = [payload for _, payload in completions.events]
    assert data[-1] == "[DONE]", data[-3:]
    assert json.loads(data[-2])["error"]["code"] == "server_shutting_down", data[-3:]
    assert "choices" in json.loads(data[0])
    # Both streams ended at the end of the grace (the server's sse-starlette would have cut them at 0.5 s, and
    # uvicorn at grace + 2 s); the process then stopped on its own with status 0 (interpreter teardown with
    # torch loaded takes a few seconds more on a loaded machine, hence the loose bound on the exit itself).
    for reader in (generate, completions):
        assert reader.ended_at - t0 < GRACE + 2, f"a stream ended {reader.ended_at - t0:.1f}s after SIGTERM"
    assert code == 0, f"exit {code}\n{log[-3000:]}"
    assert exited < 45, f"took {exited:.1f}s to exit\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]


def test_drain_refuses_new_work_and_ends_running_requests(checkpoint: Path) -> None:
    """In-process: the drain's effects without a signal (begin() is what the SIGTERM hook calls)."""
    settings = Settings(checkpoint=checkpoint, device="cpu", shutdown_grace_s=0.3, sse_ping=0)
    app = create_app(settings, engine_factory=functools.partial(load_engine, runner=slowed(0.02)))

    async def read_stream(client: httpx.AsyncClient, body: dict[str, Any]) -> list[tuple[str, str]]:
        async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
            return [(sse.event, sse.data) async for sse in aiter_events(response)]

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=transport, base_url="http://test", timeout=30) as client:
            body = {"prompt": "The", "max_new_tokens": 400}
            stream = asyncio.ensure_future(read_stream(client, body))
            plain = asyncio.ensure_future(client.post("/v1/generate", json=body))
            await asyncio.sleep(0.5)
            assert (await client.get("/readyz")).status_code == 200
            app.state.ctx.drain.begin()

            late = await client.post("/v1/generate", json=body)
            assert late.status_code == 503, late.text
            assert late.json()["error"]["code"] == "server_shutting_down"
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "server_shutting_down"

            events, answered = await asyncio.wait_for(asyncio.gather(stream, plain), 10)
            assert answered.status_code == 503, answered.text
            assert answered.json()["error"]["code"] == "server_shutting_down"
            assert events[0][0] == "token" and events[-1][0] == "error", events[-2:]
            assert json.loads(events[-1][1])["error"]["code"] == "server_shutting_down"

    asyncio.run(scenario())


def test_job_event_stream_ends_with_an_error_event_at_shutdown(tmp_path: Path) -> None:
    """A follower of a running job is told the server is going away (and can reconnect with Last-Event-ID),
    rather than having its stream cut."""
    store = JobStore(tmp_path / "jobs.db")
    manager = JobManager(store, tmp_path / "ckpt", poll_interval_s=0.01)
    now = time.time()
    store.insert_job(Job(id="job-1", status=RUNNING, request={}, args=[], run_dir=str(tmp_path / "ckpt" / "job-1"),
                         created_at=now, queued_at=now, started_at=now))
    stopping = threading.Event()

    async def follow() -> list[dict[str, Any]]:
        out = []
        async for event in job_events(manager, "job-1", stopping=stopping.is_set):
            out.append(event)
            if len(out) > 5:
                break
        return out

    async def scenario() -> list[dict[str, Any]]:
        task = asyncio.ensure_future(follow())
        await asyncio.sleep(0.1)
        assert not task.done()  # a running job's stream stays open...
        stopping.set()  # ...until the server shuts down
        return await asyncio.wait_for(task, 5)

    events = asyncio.run(scenario())
    store.close()
    assert [e["event"] for e in events] == ["error"]
    assert json.loads(events[0]["data"])["error"]["code"] == "server_shutting_down"


def test_an_app_served_again_after_a_shutdown_is_not_still_draining(checkpoint: Path) -> None:
    app = create_app(Settings(checkpoint=checkpoint, device="cpu", shutdown_grace_s=0))

    async def serve_once() -> tuple[int, int]:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30) as client:
            ready = await client.get("/readyz")
            generated = await client.post("/v1/generate", json={"prompt": "The", "max_new_tokens": 2})
            return ready.status_code, generated.status_code

    assert asyncio.run(serve_once()) == (200, 200)
    assert asyncio.run(serve_once()) == (200, 200)  # the first run's shutdown left nothing behind
