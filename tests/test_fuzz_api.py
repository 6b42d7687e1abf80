"""Schema fuzzing: schemathesis generates requests for every operation of the app's own /openapi.json and sends
them to a real uvicorn server on 127.0.0.1 (tiny model, the fake trainer behind the admin API).

For every case: no 5xx; the status, content type and body match what the schema declares for that operation;
every 4xx/5xx is the one error envelope; SSE bodies parse and end properly. Protected operations are fuzzed with
the right token and without one (and with the wrong kind of token): without it the answer is 401, whatever the
body, so nothing is reachable unauthenticated.

Cases per operation: POCKETGPT_FUZZ_EXAMPLES (default 12) of schema-valid data and half that of schema-violating
data with the right token, a quarter of it per wrong-token variant, and up to POCKETGPT_FUZZ_COVERAGE (default 40)
of schemathesis's coverage cases (boundary values, missing fields, wrong types, unexpected methods). The default
run is derandomized, so CI sees the same ~830 cases each time; `-s` prints the tally. A bigger, random run:

    POCKETGPT_FUZZ_EXAMPLES=200 POCKETGPT_FUZZ_COVERAGE=1000 POCKETGPT_FUZZ_RANDOM=1 pytest tests/test_fuzz_api.py -s
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import pocketgpt.app.jobs.manager as manager_module  # noqa: E402
from pocketgpt.app.openapi import OPERATIONS, ErrorResponse, GenerateResponse, api_routes  # noqa: E402
from pocketgpt.app.testing import running_server  # noqa: E402
from pocketgpt.model.chat import ChatTemplate  # noqa: E402
from pocketgpt.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pocketgpt.model.vocab import add_token_rows  # noqa: E402
from tests.admin_helpers import ADMIN, USER, make_app, make_settings  # noqa: E402
from tests.conftest import make_tiny_checkpoint  # noqa: E402
from tests.sse import events_in_text  # noqa: E402

FAKE = str(Path(__file__).with_name("fake_trainer.py"))
EXAMPLES = int(os.environ.get("POCKETGPT_FUZZ_EXAMPLES", "12"))
COVERAGE_MAX = int(os.environ.get("POCKETGPT_FUZZ_COVERAGE", "40"))  # boundary-value cases per operation (0: off)
RANDOM = os.environ.get("POCKETGPT_FUZZ_RANDOM") == "1"  # default: derandomized, the same cases on every run
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]
WRONG = {"Authorization": "Bearer not-the-token"}
TALLY: Counter[str] = Counter()  # cases sent, by outcome; printed at the end of the module


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz")
    # A tiny model with the chat template, so chat requests get past `no_chat_template` too.
    plain = load_checkpoint(make_tiny_checkpoint(root / "plain"))
    template = ChatTemplate()
    tok = plain.tokenizer.with_special_tokens(template.special_tokens)
    model = add_token_rows(plain.model, plain.tokenizer.vocab_size, tok.vocab_size)
    ckpt = save_checkpoint(root / "ckpt" / "tiny", model, tok, {"step": 0}, chat_template=template)
    settings = make_settings(root, ckpt, max_new_tokens=8, max_running=4, max_queue=16, request_timeout=30,
                             cancel_grace_s=5, sse_ping=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manager_module, "DEFAULT_TRAINER_CMD", [sys.executable, FAKE, "train"])
        mp.setenv("FAKE_STEP_S", "0.01")
        with running_server(make_app(settings)) as url:
            schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
            yield url, schema
    total = sum(n for k, n in TALLY.items() if k.endswith("xx"))
    print(f"\nfuzzed cases: {total}; by status class and outcome: {dict(sorted(TALLY.items()))}")


def _operation(schema, method: str, path: str):
    return schema[path][method]


def _ctype(response) -> str:
    return (response.headers.get("content-type") or [""])[0]


def _text(response) -> str:
    return response.content.decode("utf-8", "replace")


def _check_envelope(response) -> None:
    assert _ctype(response).startswith("application/json"), _text(response)
    error = ErrorResponse.model_validate(json.loads(response.content)).error  # exactly {"error": {...}}
    if response.status_code < 500:
        assert error.code, f"a {response.status_code} without a machine-readable code: {error}"


def _check_stream(path: str, response) -> None:
    events = events_in_text(_text(response))
    assert events, "an event stream with no events"
    for event, data in events:
        assert event != "error", data
        if data == "[DONE]":
            continue
        body = json.loads(data)
        assert "error" not in body, body
        if path == "/v1/generate" and event == "done":
            GenerateResponse.model_validate(body)
    if path == "/v1/generate":
        assert events[-1][0] == "done"
    elif path.startswith("/v1/"):
        assert events[-1][1] == "[DONE]"


def _send(url: str, case, headers: dict[str, str] | None):
    sent = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    case.headers = sent
    return case.call(base_url=url, headers=headers or {}, timeout=60)


def _check(url: str, case, headers: dict[str, str] | None, unauthorized: bool = False) -> None:
    """Send one case and hold the answer to the schema and the envelope."""
    method, path = case.method.upper(), case.operation.path
    response = _send(url, case, headers)
    status = response.status_code
    TALLY[f"{status // 100}xx"] += 1
    code = json.loads(response.content)["error"]["code"] if status >= 400 else ""
    TALLY[f"{method} {path} {status} {code}"] += 1
    assert status < 500, f"{method} {path} -> {status}: {_text(response)[:500]}"
    if unauthorized:  # only the body limit (which runs before routing) may answer something else
        assert status in (401, 400, 413), f"{method} {path} without its token -> {status}: {_text(response)}"
    case.validate_response(response, checks=CHECKS)
    if status >= 400:
        _check_envelope(response)
    elif _ctype(response).startswith("text/event-stream"):
        _check_stream(path, response)


def _run(url: str, operation, mode: GenerationMode, headers: dict[str, str] | None, examples: int,
         unauthorized: bool = False) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=not RANDOM,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @given(case=operation.as_strategy(mode))
    def check(case) -> None:
        _check(url, case, headers, unauthorized)

    check()


def _coverage(url: str, schema, operation, headers: dict[str, str] | None) -> None:
    """Schemathesis's coverage phase: deterministic boundary values (lengths, limits, types, missing fields,
    unexpected methods), valid and invalid."""
    cases = schema.iter_coverage_cases(operation, generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                       generation_config=schema.config.generation_for(operation=operation))
    cases = list(cases)
    step = max(1, -(-len(cases) // COVERAGE_MAX))  # evenly spread over the scenarios, at most COVERAGE_MAX
    for case in cases[::step]:
        _check(url, case, headers)


def _auth_variants(path: str) -> list[tuple[dict[str, str] | None, bool]]:
    """(headers, is the right credential) for an operation of this server (admin token and API keys set)."""
    if path.startswith("/admin/"):
        return [(ADMIN, True), (None, False), (WRONG, False), (USER, False)]
    if path.startswith("/v1/") or path == "/info":
        return [(USER, True), (None, False), (ADMIN, False)]
    return [(None, True)]


def test_every_route_is_documented(api) -> None:
    """The table in app/openapi.py covers every route, and the served schema has every route."""
    url, schema = api
    served = {(op.method.upper(), op.path) for op in (r.ok() for r in schema.get_all_operations())}
    app_ops = set()
    app_instance = make_app(make_settings(Path("/nonexistent"), None))
    for path, methods, route in api_routes(app_instance):
        if route.include_in_schema:
            app_ops |= {(m, path) for m in methods}
    assert app_ops == served == set(OPERATIONS)
    doc = httpx.get(f"{url}/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(doc)  # FastAPI's {"detail": ...} is never sent
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    assert response["content"]["application/json"]["schema"] == \
                        {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)


@pytest.mark.parametrize(("method", "path"), sorted(OPERATIONS), ids=[f"{m} {p}" for m, p in sorted(OPERATIONS)])
def test_fuzz_operation(api, method: str, path: str) -> None:
    url, schema = api
    operation = _operation(schema, method, path)
    for headers, right in _auth_variants(path):
        if right:
            _run(url, operation, GenerationMode.POSITIVE, headers, EXAMPLES)
            with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # no input to negate
                _run(url, operation, GenerationMode.NEGATIVE, headers, max(1, EXAMPLES // 2))
        else:
            _run(url, operation, GenerationMode.POSITIVE, headers, max(1, EXAMPLES // 4), unauthorized=True)
    if COVERAGE_MAX:
        _coverage(url, schema, operation, next(h for h, right in _auth_variants(path) if right))
    # The server is still fine afterwards.
    assert httpx.get(f"{url}/readyz").status_code == 200
