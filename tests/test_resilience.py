"""Load and faults over real HTTP (uvicorn on 127.0.0.1, tiny model): an abort storm and an overload.

- Abort storm: ABORTS streams and requests opened and dropped at random points (before the first token,
  mid-stream, during a long prompt's prefill, before the response even started), 20 at a time, with some run to
  completion in between. Afterwards: 0 KV slots in use, 0 requests running or waiting, and the next request is
  served exactly as before the storm.
- Overload: far more concurrent requests than slots + queue. The excess gets 429 (with Retry-After) quickly, every
  admitted request finishes with exactly its solo output, and nothing hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import time
from pathlib import Path

import httpx
import pytest

from pocketgpt.app.engine.loader import load_engine
from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import running_server, slowed
from tests.conftest import make_tiny_checkpoint
from tests.prom import Scrape, scrape
from tests.sse import aiter_events

ABORTS = int(os.environ.get("POCKETGPT_ABORTS", "300"))
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 20  # ~200 tokens: prefilled 8 per step


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("resilience") / "tiny", block_size=256)


def metrics(base: str) -> Scrape:
    return scrape(base)


def wait_idle(base: str, timeout: float = 15.0) -> Scrape:
    """Poll until no KV slot is used and no request runs or waits; return the metrics then."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base)
        busy = {k: m(k) for k in ("pocketgpt_kv_slots_in_use", "pocketgpt_requests_running",
                                  "pocketgpt_requests_waiting") if m(k) != 0}
        if not busy:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"still busy after {timeout}s: {busy}")
        time.sleep(0.05)


def greedy(base: str, prompt: str, n: int) -> dict:
    r = httpx.post(f"{base}/v1/generate", json={"prompt": prompt, "max_new_tokens": n, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


async def read_stream(client: httpx.AsyncClient, body: dict, stop_after: int | None = None,
                      ) -> tuple[int, list[tuple[str, dict]]]:
    """POST a stream; read it whole (stop_after None) or drop the connection after `stop_after` token events."""
    events: list[tuple[str, dict]] = []
    async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, [("error", r.json())]
        if stop_after == 0:
            return 200, events  # headers only: dropped before the first token
        async for event in aiter_events(r):
            events.append((event.event, json.loads(event.data)))
            tokens = sum(1 for e, _ in events if e == "token")
            if stop_after is not None and tokens >= stop_after:
                return 200, events  # leaving the `async with` closes the connection mid-stream
    return 200, events


# -- abort storm -----------------------------------------------------------------------------------------------
def test_abort_storm_leaves_nothing_behind(checkpoint: Path) -> None:
    settings = Settings(checkpoint=checkpoint, max_running=8, max_queue=64, max_new_tokens=64, prefill_chunk=8,
                        sse_ping=0)
    factory = functools.partial(load_engine, runner=slowed(0.002))  # streams last long enough to be cut mid-way
    with running_server(create_app(settings, engine_factory=factory)) as base:
        reference = greedy(base, "The quick", 24)
        before = metrics(base)
        rng = random.Random(1234)
        kinds: dict[str, int] = {}
        completed: list[str] = []

        async def one(i: int, client: httpx.AsyncClient, gate: asyncio.Semaphore) -> None:
            kind = ["headers", "mid", "prefill", "early", "json", "full"][i % 6]
            kinds[kind] = kinds.get(kind, 0) + 1
            body = {"prompt": "The quick", "max_new_tokens": 48, "temperature": 0.8, "seed": i}
            async with gate:
                if kind == "headers":  # the response started, no token read yet
                    await read_stream(client, body, stop_after=0)
                elif kind == "mid":  # a few tokens in
                    await read_stream(client, body, stop_after=rng.randint(1, 20))
                elif kind == "prefill":  # a long prompt still being prefilled when the client goes
                    await read_stream(client, {**body, "prompt": LONG_PROMPT}, stop_after=0)
                elif kind == "early":  # gone before the response even started (possibly still queued)
                    task = asyncio.ensure_future(read_stream(client, {**body, "prompt": LONG_PROMPT}))
                    await asyncio.sleep(rng.uniform(0, 0.01))
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                elif kind == "json":  # a non-streaming request abandoned mid-generation
                    with contextlib.suppress(httpx.TimeoutException):
                        await client.post("/v1/generate", json=body, timeout=rng.uniform(0.01, 0.08))
                else:  # one in six runs to the end, during the storm: the server keeps serving
                    status, events = await read_stream(client, {**body, "prompt": "The quick",
                                                                "max_new_tokens": 24, "temperature": 0})
                    assert status == 200 and events[-1][0] == "done", events[-3:]
                    completed.append(events[-1][1]["text"])

        async def storm() -> None:
            gate = asyncio.Semaphore(20)
            limits = httpx.Limits(max_connections=40, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
                await asyncio.gather(*(one(i, client, gate) for i in range(ABORTS)))

        started = time.monotonic()
        asyncio.run(asyncio.wait_for(storm(), timeout=120))
        storm_s = time.monotonic() - started
        after = wait_idle(base)
        cancelled = after("pocketgpt_generations_finished_total", reason="cancelled") - \
            before("pocketgpt_generations_finished_total", reason="cancelled")
        print(f"\nabort storm: {ABORTS} requests ({kinds}) in {storm_s:.1f}s; {cancelled:.0f} cancelled in the "
              f"engine; {len(completed)} completed during the storm")
        assert completed and set(completed) == {reference["text"]}
        assert cancelled >= ABORTS // 3  # the drops reached the engine as cancellations, not as finished work
        # Nothing is left holding a slot, and the server answers the next request exactly as before.
        assert after("pocketgpt_kv_slots_in_use") == 0 and after("pocketgpt_requests_running") == 0
        again = greedy(base, "The quick", 24)
        assert again["text"] == reference["text"] and again["usage"] == reference["usage"]
        assert httpx.get(f"{base}/readyz").status_code == 200


# -- overload ----------------------------------------------------------------------------------------------------
def test_overload_sheds_the_excess_quickly_and_serves_the_rest(checkpoint: Path) -> None:
    slots, queue, clients = 2, 2, 40
    settings = Settings(checkpoint=checkpoint, max_running=slots, max_queue=queue, max_new_tokens=32,
                        retry_after=2, sse_ping=0)
    factory = functools.partial(load_engine, runner=slowed(0.02))  # ~0.5 s per admitted request
    with running_server(create_app(settings, engine_factory=factory)) as base:
        prompts = ["The quick", "To be", "床前明月光", "def add(a, b):"]
        reference = {p: greedy(base, p, 20)["text"] for p in prompts}

        async def one(i: int, client: httpx.AsyncClient) -> tuple[str, int, float, object]:
            prompt = prompts[i % len(prompts)]
            body = {"prompt": prompt, "max_new_tokens": 20, "temperature": 0}
            started = time.monotonic()
            if i % 2:
                status, events = await read_stream(client, body)
                return prompt, status, time.monotonic() - started, events
            r = await client.post("/v1/generate", json=body)
            return prompt, r.status_code, time.monotonic() - started, r

        async def flood() -> list:
            limits = httpx.Limits(max_connections=clients + 5)
            async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
                return await asyncio.gather(*(one(i, client) for i in range(clients)))

        started = time.monotonic()
        results = asyncio.run(asyncio.wait_for(flood(), timeout=90))  # nothing hangs
        total_s = time.monotonic() - started
        ok = [r for r in results if r[1] == 200]
        shed = [r for r in results if r[1] == 429]
        assert len(ok) + len(shed) == clients, [r[1] for r in results]
        assert len(ok) >= slots + queue and shed
        for _, _, _, answer in shed:
            body = answer.json() if isinstance(answer, httpx.Response) else answer[0][1]
            assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "overloaded_error"
            if isinstance(answer, httpx.Response):
                assert answer.headers["retry-after"] == "2"
        worst_429 = max(s for _, _, s, _ in shed)
        assert worst_429 < 2.0, f"a 429 took {worst_429:.2f}s"
        for prompt, _, _, answer in ok:
            if isinstance(answer, httpx.Response):
                assert answer.json()["text"] == reference[prompt]
            else:
                assert answer[-1][0] == "done" and answer[-1][1]["text"] == reference[prompt]
                assert "".join(d["text"] for e, d in answer if e == "token") == reference[prompt]
        print(f"\noverload: {clients} concurrent requests on {slots} slots + {queue} queue places: {len(ok)} served "
              f"(all exact), {len(shed)} refused with 429 in at most {worst_429 * 1000:.0f} ms; {total_s:.1f}s total")
        wait_idle(base)
        assert greedy(base, "The quick", 20)["text"] == reference["The quick"]
