"""`n` choices over real HTTP: the openai SDK on /v1/completions, /v1/generate's own shape, streams that
interleave choices, one prefill per request, the queue counting n, and a disconnect freeing every slot."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections import defaultdict
from pathlib import Path

import httpx
import openai
import pytest

from pocketgpt.app.engine.loader import load_engine
from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import running_server, slowed
from tests.conftest import make_tiny_checkpoint
from tests.prom import scrape
from tests.sse import iter_events


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("nchoices") / "untied", tie_embeddings=False)


@pytest.fixture(scope="module")
def url(checkpoint: Path):
    with running_server(create_app(Settings(checkpoint=checkpoint, max_new_tokens=100))) as base:
        yield base


@pytest.fixture(scope="module")
def slow_url(checkpoint: Path):
    """Three slots, one waiting place, 20 ms per engine step: streams take long enough to watch."""
    settings = Settings(checkpoint=checkpoint, max_running=3, max_queue=1, request_timeout=10)
    factory = functools.partial(load_engine, runner=slowed(0.02))
    with running_server(create_app(settings, engine_factory=factory)) as base:
        yield base


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def test_n3_gives_three_seeded_choices_from_one_prefill(url: str) -> None:
    c = client(url)
    prompt = "Three roads diverged in a yellow wood"
    before = scrape(url)("pocketgpt_prefill_tokens_total")
    out = c.completions.create(model="untied", prompt=prompt, max_tokens=20, temperature=1.0, seed=7, n=3)
    prefilled = scrape(url)("pocketgpt_prefill_tokens_total") - before
    usage = out.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    # One prefill: the prompt's tokens (less any the prefix cache served) went through the model once.
    assert prefilled == usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens > 0
    assert [ch.index for ch in out.choices] == [0, 1, 2]
    texts = [ch.text for ch in out.choices]
    assert len(set(texts)) == 3  # each choice samples with its own generator
    # Choice i is what n=1 gives with seed 7 + i (the documented derivation).
    alone = [c.completions.create(model="untied", prompt=prompt, max_tokens=20, temperature=1.0, seed=7 + i)
             for i in range(3)]
    assert texts == [a.choices[0].text for a in alone]
    assert [ch.finish_reason for ch in out.choices] == [a.choices[0].finish_reason for a in alone]
    # Usage counts the prompt once and the choices' tokens summed.
    assert usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_greedy_choices_are_all_equal_and_best_of_n_is_accepted(url: str) -> None:
    out = client(url).completions.create(model="untied", prompt="A journey of", max_tokens=15, temperature=0, n=3,
                                         best_of=3)
    assert len(out.choices) == 3 and len({ch.text for ch in out.choices}) == 1


def test_stream_interleaves_choices_each_ending_with_a_finish_reason(url: str) -> None:
    c = client(url)
    kwargs = {"model": "untied", "prompt": "To be, or not", "max_tokens": 25, "temperature": 0.9, "seed": 3, "n": 3}
    full = c.completions.create(**kwargs)
    chunks = list(c.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, list[str]] = defaultdict(list)
    order = []
    for chunk in chunks:
        for ch in chunk.choices:
            assert not finishes[ch.index]  # nothing after a choice's finish chunk
            texts[ch.index] += ch.text
            order.append(ch.index)
            if ch.finish_reason:
                finishes[ch.index].append(ch.finish_reason)
    assert sorted(texts) == [0, 1, 2]
    assert [texts[i] for i in range(3)] == [ch.text for ch in full.choices]
    assert [finishes[i] for i in range(3)] == [[ch.finish_reason] for ch in full.choices]
    assert order != sorted(order)  # interleaved as sampled, not one choice after another
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_generate_n_shape_and_stream(url: str) -> None:
    body = {"prompt": "All that glitters", "max_new_tokens": 12, "temperature": 1.0, "seed": 11, "n": 3}
    r = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [ch["index"] for ch in out["choices"]] == [0, 1, 2]
    assert [ch["seed"] for ch in out["choices"]] == [11, 12, 13]
    first = out["choices"][0]
    assert (out["text"], out["finish_reason"], out["seed"]) == (first["text"], first["finish_reason"], 11)
    assert out["usage"]["completion_tokens"] == sum(ch["completion_tokens"] for ch in out["choices"])
    single = httpx.post(f"{url}/v1/generate", json={**body, "n": 1, "seed": 12}, timeout=60).json()
    assert single["text"] == out["choices"][1]["text"] and "choices" not in single

    with httpx.stream("POST", f"{url}/v1/generate", json={**body, "stream": True}, timeout=60) as resp:
        events = [(e.event, json.loads(e.data)) for e in iter_events(resp)]
    tokens: dict[int, list[int]] = defaultdict(list)
    for name, data in events[:-1]:
        assert name == "token" and data["index"] == len(tokens[data["choice"]])  # per-choice token positions
        tokens[data["choice"]].append(data["id"])
    assert events[-1][0] == "done" and [ch["text"] for ch in events[-1][1]["choices"]] == \
        [ch["text"] for ch in out["choices"]]
    assert [len(tokens[i]) for i in range(3)] == [ch["completion_tokens"] for ch in out["choices"]]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/generate", {"prompt": "Hi", "n": 9}),  # above POCKETGPT_MAX_N (8)
    ("/v1/generate", {"prompt": "Hi", "n": 0}),
    ("/v1/completions", {"prompt": "Hi", "n": 129}),  # above the schema's cap
])
def test_n_out_of_bounds_is_422_naming_n(url: str, path: str, body: dict) -> None:
    r = httpx.post(f"{url}{path}", json=body, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["param"] == "n"


def test_n_beyond_the_slots_is_refused_and_documented(slow_url: str) -> None:
    r = httpx.post(f"{slow_url}/v1/completions", json={"prompt": "Hi", "n": 4}, timeout=30)  # 3 slots
    assert r.status_code == 422 and r.json()["error"]["param"] == "n"
    schema = httpx.get(f"{slow_url}/openapi.json", timeout=30).json()["components"]["schemas"]
    for model in ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest"):
        prop = schema[model]["properties"]["n"]
        assert 3 in [b.get("maximum") for b in [prop, *prop.get("anyOf", [])]]


def wait_for(base: str, name: str, value: float, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while scrape(base)(name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.01)


def test_choices_count_against_the_queue(slow_url: str) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=slow_url, timeout=60) as c:
            body = {"prompt": "Hi", "max_new_tokens": 60, "temperature": 0}
            busy = asyncio.ensure_future(c.post("/v1/generate", json={**body, "n": 3}))
            deadline = time.monotonic() + 5
            while scrape(slow_url)("pocketgpt_requests_running") < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            r = await c.post("/v1/completions", json={**body, "n": 2})  # 3 running + 2 > 3 slots + 1 place
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert r.headers["retry-after"] == "1"
            waiting = await c.post("/v1/generate", json={**body, "max_new_tokens": 2})  # one more fits
            assert waiting.status_code == 200
            assert (await busy).status_code == 200

    asyncio.run(main())


def test_disconnect_frees_every_choices_slot(slow_url: str) -> None:
    before = scrape(slow_url)("pocketgpt_generations_finished_total", reason="cancelled")
    body = {"prompt": "Hi", "max_new_tokens": 100, "temperature": 1.0, "n": 3, "stream": True}
    with httpx.stream("POST", f"{slow_url}/v1/generate", json=body, timeout=30) as r:
        for seen, _ in enumerate(iter_events(r)):
            if seen == 6:
                assert scrape(slow_url)("pocketgpt_kv_slots_in_use") == 3
                break
    wait_for(slow_url, "pocketgpt_kv_slots_in_use", 0)  # long before 100 tokens x 20 ms
    assert scrape(slow_url)("pocketgpt_generations_finished_total", reason="cancelled") == before + 3


def test_n_with_structured_output_is_refused_naming_n(url: str) -> None:
    """A constraint holds one output's parser state: n > 1 with it is a clear 400 until supported."""
    r = httpx.post(f"{url}/v1/generate", json={"prompt": "Hi", "n": 2, "regex": "[0-9]+"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
