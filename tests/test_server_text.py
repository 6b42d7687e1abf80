"""Exact text through the whole server, driven by a scripted model: UTF-8 characters split over tokens
never show up as U+FFFD, and stop strings split over tokens never leak."""

from __future__ import annotations

import json

import httpx
import pytest

from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import byte_token_ids, running_server, scripted_factory
from pocketgpt.model.tokenizer import Tokenizer
from tests.conftest import CHINESE
from tests.sse import read_events

SCRIPT_TEXT = CHINESE + " The END is near. 🚀 done"


@pytest.fixture(scope="module")
def url(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    # One token per byte: every Chinese character (3 bytes) and the emoji (4 bytes) is split.
    script = byte_token_ids(tokenizer, SCRIPT_TEXT.encode())
    settings = Settings(checkpoint=tmp_path_factory.mktemp("scripted"), max_new_tokens=200)
    app = create_app(settings, engine_factory=scripted_factory(tokenizer, script, block_size=256))
    with running_server(app) as base:
        yield base


def token_events(base: str, body: dict) -> tuple[list[dict], dict]:
    with httpx.stream("POST", f"{base}/v1/generate", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        events = [(e, json.loads(d)) for e, d in read_events(r)]
    assert events[-1][0] == "done"
    return [d for e, d in events if e == "token"], events[-1][1]


def test_prompt_is_one_token(tokenizer: Tokenizer) -> None:
    assert len(tokenizer.encode("x")) == 1  # so the script starts at its first byte


def test_chinese_streams_whole_characters(url: str) -> None:
    n = len(SCRIPT_TEXT.encode())
    tokens, done = token_events(url, {"prompt": "x", "max_new_tokens": n, "temperature": 0.7, "seed": 1})
    assert len(tokens) == n
    assert all("\ufffd" not in t["text"] for t in tokens)
    assert sum(1 for t in tokens if t["text"] == "") >= 2 * len(CHINESE)  # held bytes
    assert "".join(t["text"] for t in tokens) == done["text"] == SCRIPT_TEXT
    assert done["finish_reason"] == "length"


@pytest.mark.parametrize("stop", ["END", "明月光", "🚀", " is n"])
def test_stop_split_over_tokens_never_leaks(url: str, stop: str) -> None:
    n = len(SCRIPT_TEXT.encode())
    expected = SCRIPT_TEXT[: SCRIPT_TEXT.find(stop)]
    tokens, done = token_events(url, {"prompt": "x", "max_new_tokens": n, "temperature": 0, "stop": [stop]})
    released = ""
    for t in tokens:
        released += t["text"]
        assert stop not in released and expected.startswith(released)
    assert released == done["text"] == expected
    assert done["finish_reason"] == "stop_sequence" and done["stop_sequence"] == stop
    # The request stopped as soon as the stop string was complete.
    assert len(tokens) == len((expected + stop).encode())
    plain = httpx.post(f"{url}/v1/generate", json={"prompt": "x", "max_new_tokens": n, "stop": stop}).json()
    assert plain["text"] == expected


def test_held_text_is_released_at_the_end(url: str) -> None:
    # The length limit ends the request right after " T", which could still be the start of the stop
    # string: held until then, it must be released at the end.
    n = len((CHINESE + " T").encode())
    tokens, done = token_events(url, {"prompt": "x", "max_new_tokens": n, "stop": [" The END!"]})
    assert done["text"] == CHINESE + " T" and done["finish_reason"] == "length"
    assert tokens[-1]["text"] == " T"  # held as a possible stop-string start until the end


def test_openai_stream_chinese(url: str) -> None:
    n = len(CHINESE.encode())
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                      json={"prompt": "x", "max_tokens": n, "stream": True}) as r:
        events = read_events(r)
    pieces = [json.loads(d)["choices"][0]["text"] for _, d in events[:-1] if json.loads(d)["choices"]]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == CHINESE
