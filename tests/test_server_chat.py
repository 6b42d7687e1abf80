"""/v1/chat/completions edges: models without a template, refused parameters, roles and content parts, the
default answer length, and the template's end marker stopping generation (with a random tiny chat model)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest

from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import ScriptedModel, running_server
from pocketgpt.model.chat import ChatTemplate
from pocketgpt.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from pocketgpt.model.vocab import add_token_rows
from tests.conftest import make_tiny_checkpoint


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny model given the default chat template (markers added to tokenizer and embeddings)."""
    root = tmp_path_factory.mktemp("chat")
    plain = load_checkpoint(make_tiny_checkpoint(root / "plain", block_size=64))
    template = ChatTemplate()
    tok = plain.tokenizer.with_special_tokens(template.special_tokens)
    model = add_token_rows(plain.model, plain.tokenizer.vocab_size, tok.vocab_size)
    return save_checkpoint(root / "chat", model, tok, {"step": 0}, chat_template=template)


@pytest.fixture(scope="module")
def url(chat_checkpoint: Path):
    with running_server(create_app(Settings(checkpoint=chat_checkpoint, max_new_tokens=200))) as base:
        yield base


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def test_a_checkpoint_without_template_is_a_clear_400(tiny_checkpoint: Path) -> None:
    with running_server(create_app(Settings(checkpoint=tiny_checkpoint))) as base:
        assert httpx.get(f"{base}/info").json()["chat_template"] is False  # what the playground reads
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}])
        error = info.value.body
        assert error["code"] == "no_chat_template" and "/v1/completions" in error["message"]
        r = post(base, {"messages": [{"role": "user", "content": "Hi"}], "stream": True})
        assert r.status_code == 400  # refused before any stream starts
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_info_says_the_model_takes_chat(url: str) -> None:
    assert httpx.get(f"{url}/info").json()["chat_template"] is True


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"n": 9}, 422, "n"),  # above POCKETGPT_MAX_N (8)
    ({"n": 0}, 422, "n"),
    ({"top_logprobs": 3}, 422, "top_logprobs"),  # needs logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, 422, "top_logprobs"),
    ({"functions": [{"name": "f"}]}, 400, "functions"),
    ({"tool_choice": "auto"}, 400, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}}, 400,
     "response_format.json_schema"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content"),
    ({"messages": []}, 422, "messages"),
    ({"max_tokens": 5000}, 422, "max_tokens"),
    ({"max_completion_tokens": 60}, 422, "max_completion_tokens"),  # 60 + the prompt exceed the context of 64
])
def test_refused_requests(url: str, body: dict, status: int, param: str) -> None:
    r = post(url, {"messages": [{"role": "user", "content": "Hi"}], **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_unset_max_tokens_fills_the_context_and_roles_and_parts_render(url: str, chat_checkpoint: Path) -> None:
    ckpt = load_checkpoint(chat_checkpoint)
    messages = [{"role": "developer", "content": "Terse."}, {"role": "user", "content": [
        {"type": "text", "text": "The quick"}, {"type": "text", "text": " brown fox"}]}]
    r = post(url, {"messages": messages, "temperature": 0, "user": "u", "metadata": {"ignored": True}})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    expected = ckpt.chat_template.render(ckpt.tokenizer, [{"role": "system", "content": "Terse."},
                                                          {"role": "user", "content": "The quick brown fox"}],
                                         add_generation_prompt=True)
    assert usage["prompt_tokens"] == len(expected.ids)
    # This random model never says <|end|> greedily here, so the answer takes all the room the context leaves.
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert usage["total_tokens"] == ckpt.config.block_size
    short = post(url, {"messages": messages, "temperature": 0, "max_tokens": 3}).json()
    assert short["usage"]["completion_tokens"] <= 3 and short["usage"]["prompt_tokens"] == len(expected.ids)


def test_end_marker_stops_generation(chat_checkpoint: Path) -> None:
    """A scripted model answers "red fox", then the end marker, then more text: chat stops at the marker (not
    counted as text, counted as a token), while /v1/completions, which has no template, runs past it."""
    ckpt = load_checkpoint(chat_checkpoint)
    tok, template = ckpt.tokenizer, ckpt.chat_template
    question = [{"role": "user", "content": "Hi"}]
    n = len(template.render(tok, question, add_generation_prompt=True).ids)
    answer, end = tok.encode("red fox"), tok.token_id("<|end|>")
    # ScriptedModel predicts script[p] after position p: the answer starts right after the prompt's last token.
    script = [0] * (n - 1) + answer + [end] + tok.encode(" and more text") * 4
    config = replace(ckpt.config, block_size=len(script) + 8)

    def factory(path: Path, settings: Settings, metrics) -> Engine:
        checkpoint = Checkpoint(model=ScriptedModel(config, script), config=config, tokenizer=tok,
                                meta={"chat_template": template.to_dict()}, path=Path(path))
        return Engine(checkpoint, max_running=2, max_queue=2, metrics=metrics).start()

    with running_server(create_app(Settings(checkpoint=chat_checkpoint), engine_factory=factory)) as base:
        r = post(base, {"messages": question, "temperature": 0, "max_tokens": 20}).json()
        assert r["choices"][0]["message"]["content"] == "red fox"
        assert r["choices"][0]["finish_reason"] == "stop"
        assert r["usage"] == {"prompt_tokens": n, "completion_tokens": len(answer) + 1,
                              "total_tokens": n + len(answer) + 1, "prompt_tokens_details": {"cached_tokens": 0}}


def test_n_choices_in_the_chat_shape(url: str) -> None:
    """n=2 with the openai SDK: two seeded messages (choice 1 is seed + 1's), streamed as role deltas and
    content per index, each index ending with its finish_reason."""
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    kwargs = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12,
              "temperature": 1.0, "seed": 5}
    out = c.chat.completions.create(**kwargs, n=2)
    one = c.chat.completions.create(**{**kwargs, "seed": 6})
    assert [ch.index for ch in out.choices] == [0, 1]
    assert out.choices[1].message.content == one.choices[0].message.content
    assert out.usage.completion_tokens > one.usage.completion_tokens
    content, roles, finishes = ["", ""], [0, 0], [0, 0]
    for chunk in c.chat.completions.create(**kwargs, n=2, stream=True):
        for ch in chunk.choices:
            assert not finishes[ch.index]
            roles[ch.index] += ch.delta.role == "assistant"
            content[ch.index] += ch.delta.content or ""
            finishes[ch.index] += bool(ch.finish_reason)
    assert content == [ch.message.content for ch in out.choices]
    assert roles == [1, 1] and finishes == [1, 1]
