"""Structured output (llguidance): JSON-schema, regex and grammar constraints on random tiny models.

The models have random weights, so anything the output gets right is the constraint's doing. Schemas keep their
strings and arrays bounded so that outputs finish within the token budget; every finished output must parse and
validate. Also: unconstrained rows are unchanged by a constrained row in the batch, constrained rows never draft,
bad or oversized constraints are 4xx naming the field, and the openai SDK's `response_format` works over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.grammar import GrammarCache, GrammarSpec, allowed
from pocketgpt.app.engine.types import DoneEvent, GenRequest, TokenEvent
from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import running_server
from pocketgpt.model.chat import ChatTemplate
from pocketgpt.model.checkpoint import load_checkpoint, save_checkpoint
from pocketgpt.model.sampling import SamplingParams
from pocketgpt.model.tokenizer import Tokenizer, TokenizerSettings
from pocketgpt.model.vocab import add_token_rows
from tests.conftest import make_tiny_checkpoint
from tests.hf_models import chatml_tokenizer, sentencepiece_tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}
SCHEMAS = [
    PERSON,
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z]{1,5}$"}]},
    {  # a recursive tree through $defs, kept small by maxItems
        "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9},
                                                           "kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                                    "maxItems": 1}},
                           "required": ["v"], "additionalProperties": False}},
        "$ref": "#/$defs/node",
    },
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer",
     "minimum": 0, "maximum": 99}, "y": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("structured") / "tiny", block_size=256,
                                tie_embeddings=False)


@pytest.fixture(scope="module")
def engine(checkpoint: Path):
    eng = Engine(load_checkpoint(checkpoint), max_running=8, max_queue=64).start()
    yield eng
    eng.stop()


async def run(engine: Engine, request: GenRequest) -> tuple[list[int], str, DoneEvent]:
    ticket = engine.submit(request)
    ids, parts = [], []
    while True:
        event = await asyncio.wait_for(ticket.queue.get(), 60)
        if isinstance(event, TokenEvent):
            ids.append(event.id)
            parts.append(event.text)
        else:
            assert isinstance(event, DoneEvent), event
            return ids, "".join(parts), event


def constrained(engine: Engine, schema: dict[str, Any], seed: int, max_new: int = 200,
                temperature: float = 1.0) -> GenRequest:
    return GenRequest(engine.tokenizer.encode("Answer in JSON:"), max_new, SamplingParams(temperature=temperature),
                      seed=seed, constraint=engine.grammars.constraint(GrammarSpec.json_schema(schema)))


def test_json_schema_outputs_validate_alone_and_batched(engine: Engine) -> None:
    requests = [constrained(engine, schema, seed) for schema in SCHEMAS for seed in range(3)]
    outcomes = asyncio.run(_gather(engine, requests))
    finished = 0
    for (_, text, done), request in zip(outcomes, requests, strict=True):
        schema = SCHEMAS[requests.index(request) // 3]
        if done.finish_reason == "eos":  # the grammar completed: the output must be valid
            jsonschema.validate(json.loads(text), schema)
            finished += 1
    assert finished >= len(requests) * 3 // 4  # bounded schemas finish well within 200 tokens


async def _gather(engine: Engine, requests: list[GenRequest]) -> list[tuple[list[int], str, DoneEvent]]:
    return await asyncio.gather(*(run(engine, r) for r in requests))


def _leaf() -> st.SearchStrategy[dict[str, Any]]:
    ints = st.integers(-50, 50)
    return st.one_of(
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
        st.builds(lambda a, b: {"type": "integer", "minimum": min(a, b), "maximum": max(a, b)}, ints, ints),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.builds(lambda v: {"enum": v}, st.lists(st.one_of(ints, st.text("abc", max_size=3)), min_size=1,
                                                  max_size=3, unique=True)),
    )


def _extend(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    names = st.text("abcdefgh", min_size=1, max_size=4)
    array = st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, children, st.integers(0, 3))
    obj = st.dictionaries(names, children, min_size=1, max_size=3).flatmap(
        lambda props: st.builds(lambda req: {"type": "object", "properties": props, "required": sorted(req),
                                             "additionalProperties": False},
                                st.sets(st.sampled_from(sorted(props)))))
    return st.one_of(array, obj)


SCHEMA_STRATEGY = st.recursive(_leaf(), _extend, max_leaves=6)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(schema=SCHEMA_STRATEGY, seed=st.integers(0, 2**31 - 1))
def test_generated_schemas_always_give_valid_json(engine: Engine, schema: dict[str, Any], seed: int) -> None:
    _, text, done = asyncio.run(run(engine, constrained(engine, schema, seed)))
    assert done.finish_reason == "eos", (schema, text)  # every generated schema is bounded
    jsonschema.validate(json.loads(text), schema)


def test_max_tokens_cuts_with_length(engine: Engine) -> None:
    ids, text, done = asyncio.run(run(engine, constrained(engine, PERSON, 0, max_new=3)))
    assert done.finish_reason == "length" and len(ids) == 3
    assert text and '{"name": "'.startswith(text)  # forced by the grammar: the schema's first property


def test_an_unconstrained_row_is_unchanged_by_a_constrained_one_in_the_batch(engine: Engine) -> None:
    tok = engine.tokenizer
    free = [GenRequest(tok.encode(p), 30, SamplingParams(temperature=t), seed=5)
            for p, t in (("The quick brown fox", 0.0), ("To be, or not", 1.0))]

    async def main() -> tuple[list, list]:
        alone = [await run(engine, r) for r in free]
        mixed = await asyncio.gather(*(run(engine, r) for r in [free[0], constrained(engine, PERSON, 1), free[1]]))
        return alone, [mixed[0], mixed[2]]

    alone, mixed = asyncio.run(main())
    assert [ids for ids, _, _ in alone] == [ids for ids, _, _ in mixed]


def test_constrained_rows_never_draft_and_match_the_plain_engine(checkpoint: Path, engine: Engine) -> None:
    spec = Engine(load_checkpoint(checkpoint), max_running=4, spec_tokens=4).start()
    try:
        greedy = [constrained(e, PERSON, 0, temperature=0.0) for e in (spec, engine)]
        (a, _, _), (b, text, done) = (asyncio.run(run(e, r)) for e, r in zip((spec, engine), greedy, strict=True))
        assert a == b
        if done.finish_reason == "eos":
            jsonschema.validate(json.loads(text), PERSON)
        seqs = []
        original = spec.scheduler.add
        spec.scheduler.add = lambda seq: (seqs.append(seq), original(seq))[1]  # type: ignore[method-assign]
        asyncio.run(run(spec, constrained(spec, PERSON, 1, temperature=0.0)))
        assert seqs and seqs[0].drafter is None
    finally:
        spec.stop()


@pytest.mark.parametrize(("hf", "roles"), [
    (sentencepiece_tokenizer, TokenizerSettings(eos_token="</s>", bos_token="<s>", add_bos=True)),
    (chatml_tokenizer, TokenizerSettings(stop_tokens=("<|im_end|>",))),
], ids=["metaspace", "byte-level-chatml"])
def test_imported_tokenizer_families_give_valid_json(hf, roles: TokenizerSettings) -> None:
    """The byte table llguidance gets (Metaspace "▁" as a space, byte fallback, special tokens) is exact."""
    tok = Tokenizer(hf(), roles)
    constraint = GrammarCache(tok).constraint(GrammarSpec.json_schema(PERSON))
    bitmask = torch.zeros(1, (tok.vocab_size + 31) // 32, dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    out: list[int] = []
    while not constraint.done:
        constraint.fill(bitmask, 0)
        logits = torch.randn(tok.vocab_size, generator=gen).masked_fill(~allowed(bitmask, tok.vocab_size)[0],
                                                                         float("-inf"))
        token = int(logits.argmax())
        assert token not in tok.stop_ids and constraint.advance(token), constraint.error
        out.append(token)
        assert len(out) < 300
    jsonschema.validate(json.loads(tok.decode(out)), PERSON)


def test_compiled_grammars_are_cached_and_bad_ones_refused(engine: Engine) -> None:
    cache = GrammarCache(engine.tokenizer, size=2)
    specs = [GrammarSpec("regex", r"[0-9]{2}"), GrammarSpec("regex", "[a-z]+"), GrammarSpec("regex", "x|y")]
    cache.constraint(specs[0])
    cache.constraint(specs[0])
    assert (cache.hits, cache.misses) == (1, 1)
    for spec in specs[1:]:
        cache.constraint(spec)
    cache.constraint(specs[0])  # evicted by the bound of 2: compiled again
    assert cache.misses == 4


# -- over HTTP ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny model with the default chat template and room for JSON answers."""
    root = tmp_path_factory.mktemp("structured-chat")
    plain = load_checkpoint(make_tiny_checkpoint(root / "plain", block_size=256, tie_embeddings=False))
    template = ChatTemplate()
    tok = plain.tokenizer.with_special_tokens(template.special_tokens)
    model = add_token_rows(plain.model, plain.tokenizer.vocab_size, tok.vocab_size)
    return save_checkpoint(root / "chat", model, tok, {"step": 0}, chat_template=template)


@pytest.fixture(scope="module")
def url(chat_checkpoint: Path):
    with running_server(create_app(Settings(checkpoint=chat_checkpoint, max_new_tokens=200,
                                            max_schema_bytes=2000))) as base:
        yield base


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_sdk_response_format_json_schema(url: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    client = sdk(url)
    for seed in range(3):
        chat = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Who?"}],
                                              response_format=fmt, seed=seed, max_tokens=150)
        assert chat.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(chat.choices[0].message.content), PERSON)
    done = client.completions.create(model="chat", prompt="Who?", max_tokens=150, seed=3,
                                     extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(done.choices[0].text), PERSON)
    chunks = list(client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Who?"}],
                                                 response_format=fmt, seed=4, max_tokens=150, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_starts_an_object(url: str) -> None:
    chat = sdk(url).chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}],
                                            response_format={"type": "json_object"}, seed=0, max_tokens=40)
    content = chat.choices[0].message.content
    assert content.startswith("{")
    if chat.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_regex_and_grammar_on_generate(url: str) -> None:
    for seed in range(3):
        r = httpx.post(f"{url}/v1/generate", timeout=60, json={
            "prompt": "Phone:", "regex": r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", "seed": seed, "max_new_tokens": 40})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["finish_reason"] == "eos"
        assert re.fullmatch(r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", body["text"]), body["text"]
    lark = 'start: "yes" | "no" | "maybe"'
    r = httpx.post(f"{url}/v1/generate", timeout=60, json={"prompt": "Say:", "grammar": lark, "max_new_tokens": 10})
    assert r.json()["text"] in ("yes", "no", "maybe")
    r = httpx.post(f"{url}/v1/generate", timeout=60, json={
        "prompt": "JSON:", "json_schema": PERSON, "max_new_tokens": 150, "seed": 1})
    jsonschema.validate(json.loads(r.json()["text"]), PERSON)


def _fmt(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize(("path", "extra", "status", "param"), [
    ("/v1/chat/completions", {"response_format": _fmt({"type": "strin"})}, 400, "response_format.json_schema"),
    ("/v1/completions", {"response_format": _fmt({"$ref": "#/missing"})}, 400, "response_format.json_schema"),
    ("/v1/completions", {"response_format": _fmt({"type": 5, "minimum": "x"})}, 400, "response_format.json_schema"),
    ("/v1/completions", {"response_format": _fmt({"type": "string", "format": "nope"})}, 400,
     "response_format.json_schema"),
    ("/v1/completions", {"response_format": _fmt({"enum": ["x" * 3000]})}, 422, "response_format.json_schema"),
    ("/v1/completions", {"response_format": {"type": "json_schema"}}, 422, "response_format.json_schema"),
    ("/v1/completions", {"response_format": {"type": "xml"}}, 422, "response_format.type"),
    ("/v1/generate", {"regex": "(ab"}, 400, "regex"),
    ("/v1/generate", {"grammar": "start: missing"}, 400, "grammar"),
    ("/v1/generate", {"json_schema": {"type": "object", "properties": 3}}, 400, "json_schema"),
    ("/v1/generate", {"regex": "a", "json_schema": {}}, 422, "json_schema"),
    ("/v1/generate", {"regex": "a" * 2001}, 422, "regex"),
])
def test_bad_constraints_are_refused_naming_the_field(url: str, path: str, extra: dict, status: int,
                                                      param: str) -> None:
    base = ({"messages": [{"role": "user", "content": "hi"}]} if path == "/v1/chat/completions"
            else {"prompt": "hi"})
    r = httpx.post(f"{url}{path}", json={**base, **extra}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param or param in error["message"], error
    assert httpx.post(f"{url}/v1/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


def test_the_grammar_library_is_imported_only_when_needed() -> None:
    code = ("import sys, pocketgpt.app.main, pocketgpt.app.engine.engine, pocketgpt.app.schemas; "
            "print('llguidance' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
