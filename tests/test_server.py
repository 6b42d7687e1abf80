"""The HTTP server on a real uvicorn: /v1/generate (JSON and SSE), errors, limits, health and metrics."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from pathlib import Path

import httpx
import pytest
import torch

from pocketgpt.app.engine.loader import load_engine
from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import running_server, slowed
from pocketgpt.model.checkpoint import load_checkpoint
from tests.conftest import make_tiny_checkpoint
from tests.prom import scrape
from tests.sse import iter_events, read_events


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("server") / "untied", tie_embeddings=False)


@pytest.fixture(scope="module")
def url(checkpoint: Path):
    settings = Settings(checkpoint=checkpoint, max_running=16, max_queue=16, max_body_bytes=20_000,
                        max_new_tokens=100, max_prompt_chars=2_000)
    with running_server(create_app(settings)) as base:
        yield base


@pytest.fixture(scope="module")
def slow_url(checkpoint: Path):
    """One slot, one waiting place, 20 ms per engine step: streams take long enough to watch."""
    settings = Settings(checkpoint=checkpoint, max_running=1, max_queue=1, request_timeout=5)
    factory = functools.partial(load_engine, runner=slowed(0.02))
    with running_server(create_app(settings, engine_factory=factory)) as base:
        yield base


@pytest.fixture(scope="module")
def reference(checkpoint: Path):
    return load_checkpoint(checkpoint)


def greedy_uncached(ck, text: str, n: int) -> list[int]:
    seq, out = ck.tokenizer.encode(text), []
    with torch.no_grad():
        for _ in range(n):
            tok = int(ck.model(torch.tensor([seq]))[0][0, -1].argmax())
            out.append(tok)
            if tok == ck.tokenizer.eot_id:
                break
            seq.append(tok)
    return out


def stream(base: str, body: dict, **kw) -> list[tuple[str, dict]]:
    with httpx.stream("POST", f"{base}/v1/generate", json={**body, "stream": True}, timeout=30, **kw) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-accel-buffering"] == "no"
        return [(event, json.loads(data)) for event, data in read_events(r)]


def metric(base: str, name: str, **labels: str) -> float:
    return scrape(base)(name, **labels)


def wait_for_metric(base: str, name: str, value: float, timeout: float = 3.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(base, name) == value:
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"{name} stayed at {metric(base, name)}, expected {value}")


# -- results ---------------------------------------------------------------------------------------
def test_greedy_equals_model_reference_and_stream_agrees(url: str, reference) -> None:
    prompt = "The quick brown fox"
    ref = greedy_uncached(reference, prompt, 30)
    body = {"prompt": prompt, "max_new_tokens": 30, "temperature": 0}
    r = httpx.post(f"{url}/v1/generate", json=body)
    assert r.status_code == 200
    data = r.json()
    assert data["text"] == reference.tokenizer.decode(ref)
    n_prompt = len(reference.tokenizer.encode(prompt))
    assert data["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": len(ref),
                             "total_tokens": len(ref) + n_prompt}
    assert data["finish_reason"] == ("eos" if ref[-1] == reference.tokenizer.eot_id else "length")
    assert set(data["timings"]) == {"ttft_ms", "total_ms", "tokens_per_s"} and data["timings"]["total_ms"] > 0
    events = stream(url, body)
    tokens = [d for e, d in events if e == "token"]
    assert [t["id"] for t in tokens] == ref
    assert [t["index"] for t in tokens] == list(range(len(ref)))
    assert events[-1][0] == "done"
    done = events[-1][1]
    assert "".join(t["text"] for t in tokens) == done["text"] == data["text"]
    assert {k: v for k, v in done.items() if k not in ("id", "timings", "seed")} == \
        {k: v for k, v in data.items() if k not in ("id", "timings", "seed")}


def test_seeded_sampling_is_reproducible_and_seed_is_echoed(url: str) -> None:
    body = {"prompt": "To be, or not to be", "max_new_tokens": 25, "temperature": 1.0, "top_k": 50,
            "top_p": 0.95, "repetition_penalty": 1.2, "frequency_penalty": 0.2}
    first = httpx.post(f"{url}/v1/generate", json=body).json()
    assert isinstance(first["seed"], int)  # picked at random, echoed
    again = httpx.post(f"{url}/v1/generate", json={**body, "seed": first["seed"]}).json()
    assert again["seed"] == first["seed"] and again["text"] == first["text"]
    events = stream(url, {**body, "seed": first["seed"]})
    assert events[-1][1]["text"] == first["text"]
    texts = {httpx.post(f"{url}/v1/generate", json={**body, "seed": s}).json()["text"] for s in range(4)}
    assert len(texts) > 1  # the seed matters


def test_16_concurrent_requests_equal_their_solo_outputs(url: str) -> None:
    prompts = ["The quick", "床前明月光", "def add(a, b):", "A journey", "All that glitters", "🚀 launch",
               "To be", "class Point:", "黄河入海流", "x", "return a + b", "The lazy dog " * 5, "Hello",
               "question", "gold. ", "白日依山尽"]
    bodies = [{"prompt": p, "max_new_tokens": 8 + 3 * i, "temperature": 0.0 if i % 3 == 0 else 0.9,
               "top_k": 40 * (i % 2), "seed": i, "repetition_penalty": 1.3 if i % 4 == 1 else 1.0}
              for i, p in enumerate(prompts)]
    solo = [httpx.post(f"{url}/v1/generate", json=b).json()["text"] for b in bodies]

    async def together() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            responses = await asyncio.gather(*(client.post("/v1/generate", json=b) for b in bodies))
        return [r.json()["text"] for r in responses]

    assert asyncio.run(together()) == solo
    assert len(set(solo)) == len(solo)


# -- streaming behaviour ---------------------------------------------------------------------------
def test_tokens_arrive_incrementally(slow_url: str) -> None:
    arrivals: list[float] = []
    start = time.monotonic()
    with httpx.stream("POST", f"{slow_url}/v1/generate", timeout=30,
                      json={"prompt": "Hi", "max_new_tokens": 40, "temperature": 0, "stream": True}) as r:
        for event in iter_events(r):
            if event.event == "token":
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) > 10
    # 40 tokens at >= 20 ms per step: the first must arrive long before the last is generated.
    assert arrivals[0] < arrivals[-1] - 0.5


def test_client_disconnect_frees_the_slot(slow_url: str) -> None:
    before = metric(slow_url, "pocketgpt_generations_finished_total", reason="cancelled")
    with httpx.stream("POST", f"{slow_url}/v1/generate", timeout=30,
                      json={"prompt": "Hi", "max_new_tokens": 120, "temperature": 0, "stream": True}) as r:
        seen = 0
        for event in iter_events(r):
            if event.event == "token":
                seen += 1
                if seen == 3:
                    # Checked before leaving the loop: leaving the `with` closes the connection.
                    assert metric(slow_url, "pocketgpt_requests_running") == 1
                    break
    closed = time.monotonic()
    freed = wait_for_metric(slow_url, "pocketgpt_kv_slots_in_use", 0)
    assert freed - closed < 1.0  # well before the 120 tokens x 20 ms the request would have taken
    assert metric(slow_url, "pocketgpt_requests_running") == 0
    assert metric(slow_url, "pocketgpt_generations_finished_total", reason="cancelled") == before + 1
    r = httpx.post(f"{slow_url}/v1/generate", json={"prompt": "Hi", "max_new_tokens": 3}, timeout=30)
    assert r.status_code == 200


def test_non_stream_client_disconnect_frees_the_slot(slow_url: str) -> None:
    with pytest.raises(httpx.ReadTimeout):
        # Greedy, so the run is the same every time: an unseeded sample could hit end-of-text within 0.5 s.
        body = {"prompt": "Hi", "max_new_tokens": 120, "temperature": 0}
        httpx.post(f"{slow_url}/v1/generate", json=body, timeout=0.5)
    closed = time.monotonic()
    freed = wait_for_metric(slow_url, "pocketgpt_kv_slots_in_use", 0)
    assert freed - closed < 1.0


def test_queue_full_gives_429_with_retry_after(slow_url: str) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=slow_url, timeout=30) as client:
            body = {"prompt": "Hi", "max_new_tokens": 60, "temperature": 0}
            busy = [asyncio.ensure_future(client.post("/v1/generate", json=body)) for _ in range(2)]
            deadline = time.monotonic() + 5
            while metric(slow_url, "pocketgpt_requests_running") + metric(slow_url, "pocketgpt_requests_waiting") < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            for stream_it in (False, True):
                r = await client.post("/v1/generate", json={**body, "stream": stream_it})
                assert r.status_code == 429
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "queue_full"
            assert [r.status_code for r in await asyncio.gather(*busy)] == [200, 200]

    asyncio.run(main())


def test_timeout_is_504_or_an_error_event(checkpoint: Path) -> None:
    settings = Settings(checkpoint=checkpoint, max_running=2, request_timeout=0.3)
    app = create_app(settings, engine_factory=functools.partial(load_engine, runner=slowed(0.02)))
    with running_server(app) as base:
        body = {"prompt": "Hi", "max_new_tokens": 100, "temperature": 0}
        r = httpx.post(f"{base}/v1/generate", json=body, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        events = stream(base, body)
        assert events[-1][0] == "error"
        assert events[-1][1]["error"]["type"] == "timeout_error"
        assert any(e == "token" for e, _ in events)


# -- errors and limits -----------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "hi", "colour": "red"}, "colour"),
    ({"prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_k": -1}, "top_k"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 101}, "max_new_tokens"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "seed": -1}, "seed"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"max_new_tokens": 5}, "prompt"),
    ({"prompt": 5}, "prompt"),
])
def test_bad_fields_give_422_naming_the_field(url: str, body: dict, param: str) -> None:
    r = httpx.post(f"{url}/v1/generate", json=body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"].split(".")[0] == param
    assert error["message"]


def test_invalid_json_is_422(url: str) -> None:
    r = httpx.post(f"{url}/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json"


def test_too_long_for_the_context_gives_422_with_the_numbers(url: str, reference) -> None:
    prompt = ("The quick brown fox jumps over the lazy dog. " * 3).rstrip()  # no healed tail: n is exact
    n = len(reference.tokenizer.encode(prompt))
    assert 28 < n < 128
    for stream_it in (False, True):
        r = httpx.post(f"{url}/v1/generate", json={"prompt": prompt, "max_new_tokens": 100, "stream": stream_it})
        assert r.status_code == 422
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "max_new_tokens"
        assert f"{n} tokens" in error["message"] and "100" in error["message"] and "128" in error["message"]


def test_huge_body_gives_413(url: str) -> None:
    big = {"prompt": "x" * 30_000}
    r = httpx.post(f"{url}/v1/generate", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert r.headers["x-request-id"]

    def chunks():  # no Content-Length: the middleware must count what arrives
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 4096):
            yield payload[i : i + 4096]

    r = httpx.post(f"{url}/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert httpx.post(f"{url}/v1/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


def test_unknown_route_and_method_use_the_envelope(url: str) -> None:
    r = httpx.get(f"{url}/nope")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{url}/v1/generate")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# -- stop strings and text -------------------------------------------------------------------------
def test_stop_strings_never_appear_even_across_tokens(url: str) -> None:
    body = {"prompt": "A journey of", "max_new_tokens": 40, "temperature": 0}
    events = stream(url, body)
    tokens = [d for e, d in events if e == "token"]
    full = "".join(t["text"] for t in tokens)
    # A stop string that starts inside one token and ends in a later one.
    starts = [len("".join(t["text"] for t in tokens[:i])) for i in range(len(tokens))]
    cut = next(s for s, t in zip(starts[4:], tokens[4:], strict=True) if len(t["text"]) >= 1) + 1
    stop = full[cut - 1 : cut + 2] if len(full) > cut + 2 else full[-3:]
    assert len(stop) >= 2
    expected = full[: full.find(stop)]
    for stream_it in (False, True):
        if stream_it:
            events = stream(url, {**body, "stop": [stop, "never-there"]})
            done = events[-1][1]
            pieces = [d["text"] for e, d in events if e == "token"]
            assert "".join(pieces) == done["text"]
            released = ""
            for piece in pieces:
                released += piece
                assert stop not in released
        else:
            done = httpx.post(f"{url}/v1/generate", json={**body, "stop": [stop, "never-there"]}).json()
        assert done["text"] == expected
        assert done["finish_reason"] == "stop_sequence" and done["stop_sequence"] == stop


# -- operations ------------------------------------------------------------------------------------
def test_health_ready_info_models(url: str, checkpoint: Path) -> None:
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").json()["status"] == "ready"
    info = httpx.get(f"{url}/info").json()
    assert info["checkpoint"] == str(checkpoint) and info["context_length"] == 128
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["config"]["n_layer"] == 2 and info["limits"]["max_running"] == 16
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "untied"


def test_metrics_exposes_the_pocketgpt_series(url: str) -> None:
    httpx.post(f"{url}/v1/generate", json={"prompt": "Hi", "max_new_tokens": 5})
    m = scrape(url)
    for name in ("pocketgpt_requests_running", "pocketgpt_requests_waiting", "pocketgpt_kv_slots_in_use",
                 "pocketgpt_time_to_first_token_seconds_bucket", "pocketgpt_inter_token_latency_seconds_bucket",
                 "pocketgpt_generated_tokens_total", "pocketgpt_prompt_tokens_total", "pocketgpt_batch_size_bucket",
                 "pocketgpt_request_duration_seconds_bucket"):
        assert name in m.names, name
    assert m("pocketgpt_requests_total", method="POST", route="/v1/generate", status="200") >= 1
    assert metric(url, "pocketgpt_generated_tokens_total") >= 5


def test_request_id_header_and_access_log(url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pocketgpt.access"):
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "Hi", "max_new_tokens": 4},
                       headers={"X-Request-ID": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        other = httpx.get(f"{url}/healthz").headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", other)
        deadline = time.monotonic() + 2
        while not any("abc-123" in m for m in caplog.messages) and time.monotonic() < deadline:
            time.sleep(0.01)
    line = next(m for m in caplog.messages if "rid=abc-123" in m)
    assert '"POST /v1/generate" 200' in line and "completion_tokens=" in line and "ttft_ms=" in line


def test_readyz_and_inference_answer_503_before_the_model_is_loaded(checkpoint: Path) -> None:
    app = create_app(Settings(checkpoint=checkpoint))  # lifespan not run: no model loaded

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/healthz")).status_code == 200
            r = await client.get("/readyz")
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
            r = await client.post("/v1/generate", json={"prompt": "hi", "stream": True})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"

    asyncio.run(main())


def test_body_limit_per_prefix() -> None:
    """Paths given `None` (dataset uploads) stream past the default limit; others get 413."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from pocketgpt.app.middleware import BodyLimitMiddleware

    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(len(await request.body())))

    inner = Starlette(routes=[Route("/admin/datasets", echo, methods=["POST"]), Route("/x", echo, methods=["POST"])])
    app = BodyLimitMiddleware(inner, max_body_bytes=10, prefix_limits={"/admin/datasets": None})

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.post("/admin/datasets", content=b"y" * 100)).text == "100"
            assert (await client.post("/x", content=b"y" * 10)).text == "10"
            assert (await client.post("/x", content=b"y" * 11)).status_code == 413

    asyncio.run(main())
