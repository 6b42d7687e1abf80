"""Logprobs, echo, tokenize/detokenize and `user` over real HTTP, with the official `openai` client where it
applies: response shapes stream and not, exactness against the model, and scoring a text as `pocketgpt eval`
does."""

from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import running_server
from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.training.cli import build_parser
from pocketgpt.training.evaluate import evaluate_checkpoint
from tests.sse import read_events
from tests.test_server_chat import chat_checkpoint  # noqa: F401  (a fixture: a tiny model with a chat template)
from tests.test_server_openai import checkpoint, client, url  # noqa: F401  (fixtures: the tiny model, its server)

TEXT = "To be, or not to be, that is the question. All that glitters is not gold."


@pytest.fixture(scope="module")
def chat_url(chat_checkpoint: Path):  # noqa: F811
    with running_server(create_app(Settings(checkpoint=chat_checkpoint, max_new_tokens=40))) as base:
        yield base


def reference(checkpoint_dir: Path, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of `ids` (one plain forward, no server)."""
    model = load_checkpoint(checkpoint_dir).model
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].float().log_softmax(-1)


def merge(parts: list[dict]) -> dict:
    """Completions' logprobs objects of a stream's chunks, joined."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {k: [v for p in parts for v in p[k]] for k in keys}


def test_generate_greedy_logprobs_equal_log_softmax_of_the_model(url: str, checkpoint: Path) -> None:  # noqa: F811
    body = {"prompt": "The quick brown fox", "max_new_tokens": 12, "temperature": 0, "logprobs": 4}
    out = httpx.post(f"{url}/v1/generate", json=body, timeout=30).json()
    prompt = load_checkpoint(checkpoint).tokenizer.encode("The quick brown fox")
    ids = [e["id"] for e in out["logprobs"]]
    assert len(ids) == out["usage"]["completion_tokens"] == 12
    ref = reference(checkpoint, prompt + ids)
    for j, entry in enumerate(out["logprobs"]):
        row = ref[len(prompt) - 1 + j]
        assert entry["id"] == int(row.argmax())
        assert abs(entry["logprob"] - float(row[entry["id"]])) < 1e-4
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(row.topk(4).values.tolist(), abs=1e-4)
    # The stream's token events carry the same, one per token.
    with httpx.stream("POST", f"{url}/v1/generate", json={**body, "stream": True}, timeout=30) as r:
        events = read_events(r)
    tokens = [json.loads(d) for e, d in events if e == "token"]
    assert [t["logprob"] for t in tokens] == json.loads(events[-1][1])["logprobs"] == out["logprobs"]
    plain = httpx.post(f"{url}/v1/generate", json={**body, "logprobs": None}, timeout=30).json()
    assert "logprobs" not in plain and plain["text"] == out["text"]


def test_completions_logprobs_shape_stream_and_not(url: str) -> None:  # noqa: F811
    c = client(url)
    kwargs = {"model": "untied", "prompt": "A journey of", "max_tokens": 15, "temperature": 0.8, "seed": 3}
    full = c.completions.create(**kwargs, logprobs=3)
    choice = full.choices[0]
    lp = choice.logprobs
    n = full.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(isinstance(t, str) for t in lp.tokens)
    assert all(x <= 0 for x in lp.token_logprobs)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4 and top[token] == logprob  # the top 3, and the sampled token
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert choice.text == c.completions.create(**kwargs).choices[0].text  # logprobs change nothing sampled
    chunks = list(c.completions.create(**kwargs, logprobs=3, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == choice.text
    streamed = merge([ch.choices[0].logprobs.model_dump() for ch in chunks if ch.choices[0].logprobs])
    assert streamed["tokens"] == lp.tokens and streamed["text_offset"] == lp.text_offset
    assert streamed["token_logprobs"] == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_echo_with_max_tokens_0_scores_a_text_as_pocketgpt_eval(url: str, checkpoint: Path,  # noqa: F811
                                                                tmp_path: Path) -> None:
    out = client(url).completions.create(model="untied", prompt=TEXT, max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text == TEXT and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == out.usage.prompt_tokens and "".join(lp.tokens) == TEXT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert [TEXT[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens, strict=True)] == [True] * len(lp.tokens)
    (tmp_path / "text.txt").write_text(TEXT)
    ns = build_parser().parse_args(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "text.txt"),
                                    "--device", "cpu", "--n-prompts", "0"])
    ev = evaluate_checkpoint(ns)
    assert ev["tokens"] == len(lp.tokens) - 1  # every token but the first is predicted
    assert math.isclose(sum(lp.token_logprobs[1:]), -ev["loss"] * ev["tokens"], abs_tol=1e-3)
    # Again, with the prompt's blocks now in the prefix cache: still computed, and the same numbers.
    again = client(url).completions.create(model="untied", prompt=TEXT, max_tokens=0, echo=True, logprobs=1)
    assert again.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert again.usage.prompt_tokens_details.cached_tokens == 0


def test_echo_with_logprobs_and_new_tokens_stream_and_not(url: str) -> None:  # noqa: F811
    c = client(url)
    kwargs = {"model": "untied", "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0, "echo": True,
              "logprobs": 2}
    full = c.completions.create(**kwargs)
    choice, n_prompt = full.choices[0], full.usage.prompt_tokens
    plain = c.completions.create(**{**kwargs, "echo": False})
    assert choice.text == "def add(a, b):" + plain.choices[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == n_prompt + full.usage.completion_tokens
    assert lp.tokens[n_prompt:] == plain.choices[0].logprobs.tokens
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    assert lp.text_offset[n_prompt] == len("def add(a, b):")
    chunks = list(c.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].text == "def add(a, b):"  # the echo comes first
    assert "".join(ch.choices[0].text for ch in chunks) == choice.text
    streamed = merge([ch.choices[0].logprobs.model_dump() for ch in chunks if ch.choices[0].logprobs])
    assert streamed["tokens"] == lp.tokens and streamed["text_offset"] == lp.text_offset
    echo_only = c.completions.create(**{**kwargs, "logprobs": None, "max_tokens": 0})
    assert echo_only.choices[0].text == "def add(a, b):" and echo_only.choices[0].logprobs is None


def test_chat_logprobs_shape_stream_and_not(chat_url: str) -> None:
    c = client(chat_url)
    kwargs = {"model": "chat", "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 12,
              "temperature": 0, "logprobs": True, "top_logprobs": 2}
    full = c.chat.completions.create(**kwargs)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2 and isinstance(entry.bytes, list)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely one
        if not entry.token.startswith(("bytes:", "<|")):
            assert bytes(entry.bytes).decode() == entry.token
    chunks = list(c.chat.completions.create(**kwargs, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content
    no = c.chat.completions.create(**{**kwargs, "logprobs": False, "top_logprobs": None})
    assert no.choices[0].logprobs is None and no.choices[0].message.content == full.choices[0].message.content


def test_tokenize_detokenize_round_trip(url: str, checkpoint: Path, chat_url: str) -> None:  # noqa: F811
    tok = load_checkpoint(checkpoint).tokenizer
    text = "床前明月光 🚀 <|endoftext|> def f(x):"
    r = httpx.post(f"{url}/v1/tokenize", json={"model": "untied", "prompt": text}).json()
    assert r["tokens"] == tok.encode(text, allow_special=False) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 128
    assert httpx.post(f"{url}/v1/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    # Messages count as the chat route counts them.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    counted = httpx.post(f"{chat_url}/v1/tokenize", json={"messages": messages}).json()["count"]
    chat = client(chat_url).chat.completions.create(model="chat", messages=messages, max_tokens=1)
    assert counted == chat.usage.prompt_tokens
    no_template = httpx.post(f"{url}/v1/tokenize", json={"messages": messages})
    assert no_template.status_code == 400 and no_template.json()["error"]["code"] == "no_chat_template"


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/detokenize", {"tokens": [1, 400_000]}, 422, "tokens.1"),
    ("/v1/detokenize", {"tokens": [-1]}, 422, "tokens.0"),
    ("/v1/detokenize", {"tokens": ["a"]}, 422, "tokens.0"),
    ("/v1/tokenize", {}, 422, "prompt"),
    ("/v1/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 422, "prompt"),
    ("/v1/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
    ("/v1/generate", {"prompt": "x", "logprobs": 21}, 422, "logprobs"),
    ("/v1/generate", {"prompt": "x", "logprobs": True}, 422, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 30}, 422, "logprobs"),
])
def test_bad_values_name_the_field(url: str, path: str, body: dict, status: int, param: str) -> None:  # noqa: F811
    r = httpx.post(f"{url}{path}", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_user_is_written_to_the_access_log_escaped(url: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    with caplog.at_level(logging.INFO, logger="pocketgpt.access"):
        client(url).completions.create(model="untied", prompt="Hi", max_tokens=1, user='eve "x"\nrid=forged')
        deadline = time.monotonic() + 2
        while not any("user=" in m for m in caplog.messages) and time.monotonic() < deadline:
            time.sleep(0.01)
    line = next(m for m in caplog.messages if "user=" in m)
    assert "\n" not in line and "user=eve%20%22x%22\\nrid=forged" in line, line


def test_a_request_with_logprobs_among_others_gets_the_tokens_it_gets_alone(url: str) -> None:  # noqa: F811
    c = client(url)
    prompts = ["The quick brown fox", "To be, or not", "床前明月光", "def add(a, b):"]

    def ask(i: int, logprobs: int | None) -> str:
        return c.completions.create(model="untied", prompt=prompts[i], max_tokens=12, temperature=0.9, seed=i,
                                    logprobs=logprobs, echo=logprobs is not None).choices[0].text

    alone = [ask(i, None) for i in range(len(prompts))]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda i: ask(i, 3 if i == 1 else None), range(len(prompts))))
    assert together[1] == prompts[1] + alone[1]  # the one with logprobs (and echo)
    assert together[:1] + together[2:] == alone[:1] + alone[2:]


def test_n2_with_logprobs_gives_each_choice_its_own(url: str) -> None:  # noqa: F811
    c = client(url)
    kwargs = {"model": "untied", "prompt": "A journey of", "max_tokens": 10, "temperature": 1.0, "seed": 11,
              "logprobs": 2}
    out = c.completions.create(**kwargs, n=2)
    assert [ch.index for ch in out.choices] == [0, 1]
    lengths = []
    for ch in out.choices:  # choice i is the n=1 answer for seed + i, logprobs included
        alone = c.completions.create(**{**kwargs, "seed": 11 + ch.index}).choices[0]
        lp = ch.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert lp.tokens == alone.logprobs.tokens and ch.text == alone.text
        assert lp.token_logprobs == pytest.approx(alone.logprobs.token_logprobs, abs=1e-4)
        lengths.append(len(lp.tokens))
    assert sum(lengths) == out.usage.completion_tokens
    assert out.choices[0].logprobs.tokens != out.choices[1].logprobs.tokens  # two seeds, two samples
    # Streamed, each index's chunks carry that choice's logprobs (text offsets running on per choice).
    parts: dict[int, list[dict]] = {0: [], 1: []}
    for chunk in c.completions.create(**kwargs, n=2, stream=True):
        for ch in chunk.choices:
            if ch.logprobs:
                parts[ch.index].append(ch.logprobs.model_dump())
    for ch in out.choices:
        streamed = merge(parts[ch.index])
        assert streamed["tokens"] == ch.logprobs.tokens and streamed["text_offset"] == ch.logprobs.text_offset
    # With echo, every choice carries the prompt and its logprobs (one prefill, the same numbers).
    echo = c.completions.create(**kwargs, n=2, echo=True)
    n_prompt = echo.usage.prompt_tokens
    first, second = (ch.logprobs for ch in echo.choices)
    assert first.tokens[:n_prompt] == second.tokens[:n_prompt] and first.token_logprobs[0] is None
    assert first.token_logprobs[:n_prompt] == second.token_logprobs[:n_prompt]
    for ch, plain in zip(echo.choices, out.choices, strict=True):
        assert ch.text == "A journey of" + plain.text and ch.logprobs.tokens[n_prompt:] == plain.logprobs.tokens
    scored = c.completions.create(**{**kwargs, "max_tokens": 0}, n=2, echo=True)
    assert [ch.logprobs.token_logprobs for ch in scored.choices] == [first.token_logprobs[:n_prompt]] * 2
