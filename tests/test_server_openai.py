"""OpenAI compatibility (the official client against a real server) and API keys."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import running_server
from tests.conftest import make_tiny_checkpoint
from tests.sse import read_events


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("openai") / "untied", tie_embeddings=False)


@pytest.fixture(scope="module")
def url(checkpoint: Path):
    with running_server(create_app(Settings(checkpoint=checkpoint, max_new_tokens=100))) as base:
        yield base


@pytest.fixture(scope="module")
def keyed_url(checkpoint: Path):
    settings = Settings(checkpoint=checkpoint, api_keys="key-one, key-two")  # type: ignore[arg-type]
    assert settings.api_keys == ["key-one", "key-two"]
    with running_server(create_app(settings)) as base:
        yield base


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)


def test_openai_client_non_stream_matches_native_route(url: str) -> None:
    completion = client(url).completions.create(
        model="untied", prompt="The quick brown fox", max_tokens=20, temperature=0, user="someone")
    native = httpx.post(f"{url}/v1/generate",
                        json={"prompt": "The quick brown fox", "max_new_tokens": 20, "temperature": 0}).json()
    assert completion.object == "text_completion"
    assert completion.model == "untied"
    assert completion.id.startswith("cmpl-")
    choice = completion.choices[0]
    assert choice.text == native["text"] and choice.index == 0 and choice.logprobs is None
    assert choice.finish_reason == ("length" if native["finish_reason"] == "length" else "stop")
    assert completion.usage is not None
    assert completion.usage.completion_tokens == native["usage"]["completion_tokens"]
    assert completion.usage.total_tokens == native["usage"]["total_tokens"]


def test_openai_client_stream_with_usage(url: str) -> None:
    c = client(url)
    full = c.completions.create(model="untied", prompt=["To be, or not"], max_tokens=25, temperature=0.9, seed=7)
    chunks = list(c.completions.create(model="untied", prompt="To be, or not", max_tokens=25, temperature=0.9,
                                       seed=7, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len(chunks) > 3  # streamed in pieces


def test_openai_stream_ends_with_done(url: str) -> None:
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                      json={"model": "untied", "prompt": "Hi", "max_tokens": 5, "stream": True}) as r:
        events = read_events(r)
    assert events[-1] == ("message", "[DONE]")
    assert all(e == "message" for e, _ in events)


def test_openai_stop_and_lenient_fields(url: str) -> None:
    c = client(url)
    base = c.completions.create(model="untied", prompt="A journey of", max_tokens=30, temperature=0).choices[0].text
    stop = base[5:8]
    out = c.completions.create(model="untied", prompt="A journey of", max_tokens=30, temperature=0, stop=stop,
                               echo=False, logprobs=None, n=1, best_of=1, presence_penalty=0, frequency_penalty=0)
    assert out.choices[0].text == base[: base.find(stop)]
    assert out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("extra", "param", "status"), [
    ({"n": 9}, "n", 422),  # above POCKETGPT_MAX_N (8)
    ({"n": 0}, "n", 422),
    ({"n": 3, "best_of": 5}, "best_of", 400),  # ranking choices is not supported; best_of = n is
    ({"logprobs": 21}, "logprobs", 422),
    ({"logprobs": -1}, "logprobs", 422),
    ({"max_tokens": 0}, "max_tokens", 422),  # 0 only with echo
    ({"user": "u" * 257}, "user", 422),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", 400),
    ({"functions": [{"name": "f"}]}, "functions", 400),
    ({"tool_choice": "required"}, "tool_choice", 400),
    ({"prompt": ["a", "b"]}, "prompt", 400),
    ({"prompt": [1, 2, 3]}, "prompt", 400),
    ({"temperature": 3}, "temperature", 422),
    ({"max_tokens": 1000}, "max_tokens", 422),
])
def test_openai_refusals(url: str, extra: dict, param: str, status: int) -> None:
    r = httpx.post(f"{url}/v1/completions", json={"model": "untied", "prompt": "hi", **extra})
    assert r.status_code == status
    assert r.json()["error"]["param"] == param


def test_openai_client_raises_on_error_status(url: str) -> None:
    with pytest.raises(openai.BadRequestError):
        client(url).completions.create(model="untied", prompt="hi", n=2, best_of=4)


def test_models_route(url: str) -> None:
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["untied"]


# -- API keys --------------------------------------------------------------------------------------
OPEN = [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")]
GUARDED = [("POST", "/v1/generate"), ("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/info")]


def call(base: str, method: str, path: str, auth: str | None) -> httpx.Response:
    headers = {"Authorization": auth} if auth is not None else {}
    body = {"prompt": "Hi", ("max_tokens" if path.endswith("completions") else "max_new_tokens"): 2}
    return httpx.request(method, f"{base}{path}", headers=headers, json=body if method == "POST" else None)


@pytest.mark.parametrize(("auth", "ok"), [
    (None, False),
    ("Bearer key-one", True),
    ("Bearer key-two", True),
    ("bearer key-two", True),
    ("Bearer key-three", False),
    ("Bearer key-on", False),
    ("Bearer", False),
    ("Basic key-one", False),
    ("key-one", False),
])
def test_api_key_matrix(keyed_url: str, auth: str | None, ok: bool) -> None:
    for method, path in GUARDED:
        r = call(keyed_url, method, path, auth)
        if ok:
            assert r.status_code == 200, (path, r.text)
        else:
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
    for method, path in OPEN:
        assert call(keyed_url, method, path, auth).status_code == 200


def test_keys_are_checked_before_the_body(keyed_url: str) -> None:
    r = httpx.post(f"{keyed_url}/v1/generate", json={"prompt": 5})
    assert r.status_code == 401


def test_openai_client_with_keys(keyed_url: str) -> None:
    out = client(keyed_url, "key-two").completions.create(model="untied", prompt="Hi", max_tokens=3)
    assert out.choices[0].text is not None
    with pytest.raises(openai.AuthenticationError):
        client(keyed_url, "wrong").completions.create(model="untied", prompt="Hi", max_tokens=3)


def test_no_keys_means_open(url: str) -> None:
    assert call(url, "GET", "/info", None).status_code == 200
