"""Bad input at the request edge, over a real server: strict types, bodies that are not JSON, typed conflicts,
Last-Event-ID, bounded metrics labels, bounded chat messages rendered once, and OpenAI compatibility (model ids,
GET /v1/models/{id}, refused tools, uncompilable response_format, stream_options, special-token text in prompts)."""

from __future__ import annotations

import logging
import os
import random
import shutil
import string
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pocketgpt.app.jobs.manager as manager_module
from pocketgpt.app.errors import APIError
from pocketgpt.app.main import create_app
from pocketgpt.app.schemas import ChatCompletionRequest
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import running_server
from pocketgpt.model.chat import ChatTemplate
from pocketgpt.model.checkpoint import load_checkpoint, save_checkpoint
from pocketgpt.model.tokenizer import EOT, Tokenizer
from pocketgpt.model.vocab import add_token_rows
from tests.admin_helpers import ADMIN, USER, make_app, make_settings, wait_job
from tests.conftest import make_tiny_checkpoint

FAKE = str(Path(__file__).with_name("fake_trainer.py"))
SERVED = "run/best"  # the served checkpoint's id: CHECKPOINT_DIR/run/best


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edge")


@pytest.fixture(scope="module")
def server(root: Path):
    plain = load_checkpoint(make_tiny_checkpoint(root / "plain"))
    template = ChatTemplate()
    tok = plain.tokenizer.with_special_tokens(template.special_tokens)
    model = add_token_rows(plain.model, plain.tokenizer.vocab_size, tok.vocab_size)
    ckpt = save_checkpoint(root / "ckpt" / "run" / "best", model, tok, {"step": 0}, chat_template=template)
    settings = make_settings(root, ckpt, max_body_bytes=1_000_000, max_new_tokens=8, sse_ping=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manager_module, "DEFAULT_TRAINER_CMD", [sys.executable, FAKE, "train"])
        mp.setenv("FAKE_STEP_S", "0.05")
        with running_server(make_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
            yield client, tok


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# -- item 10: strict types, NaN, Content-Type, typed 409 ----------------------------------------------------
@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/generate", {"prompt": "hi", "max_new_tokens": "5"}, "max_new_tokens"),
    ("/v1/generate", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/generate", {"prompt": "hi", "seed": 1.0}, "seed"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "10"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": "true"}},
     "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "3"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
])
def test_wrong_types_are_422_not_coerced(server, path: str, body: dict, param: str) -> None:
    client, _ = server
    error = _error(client.post(path, headers=USER, json=body), 422)
    assert error["param"] == param


def test_integers_are_still_valid_floats(server) -> None:
    client, _ = server
    r = client.post("/v1/generate", headers=USER, json={"prompt": "hi", "temperature": 1, "top_p": 1,
                                                        "max_new_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_say_so(server, number: str) -> None:
    client, _ = server
    r = client.post("/v1/generate", headers={**USER, "Content-Type": "application/json"},
                    content=f'{{"prompt": "hi", "temperature": {number}}}')
    error = _error(r, 422)
    assert error["param"] == "temperature" and "finite" in error["message"], error


@pytest.mark.parametrize("ctype", ["text/plain", None])
def test_a_body_that_is_not_json_names_the_content_type(server, ctype: str | None) -> None:
    client, _ = server
    headers = {**USER, **({"Content-Type": ctype} if ctype else {})}
    r = client.post("/v1/generate", headers=headers, content=b'{"prompt": "hi"}')
    error = _error(r, 422)
    assert "Content-Type" in error["message"] and "application/json" in error["message"], error


def test_conflicts_are_typed_as_client_errors(server) -> None:
    client, _ = server
    r = client.post("/admin/jobs", headers=ADMIN, json={"data": "stdlib", "preset": "tiny", "max_steps": 2})
    job = wait_job(client, r.json()["id"], lambda j: j["status"] == "succeeded")["id"]
    error = _error(client.post(f"/admin/jobs/{job}/cancel", headers=ADMIN), 409)
    assert error["type"] == "conflict_error" and error["code"] == "job_not_cancellable"
    # Any 4xx without its own type is the client's mistake, never `server_error`.
    assert APIError(418, "teapot").type == "invalid_request_error"
    assert APIError(507, "full").type == "server_error"


# -- item 4: Last-Event-ID ----------------------------------------------------------------------------------
def test_last_event_id_is_parsed_strictly(server) -> None:
    client, _ = server
    r = client.post("/admin/jobs", headers=ADMIN, json={"data": "stdlib", "preset": "tiny", "max_steps": 3})
    job = r.json()["id"]
    # "²" (sent as latin-1, as a raw HTTP header byte) is a digit to str.isdigit() but not to int(): it was a 500.
    for bad in ["²".encode("latin-1"), b"-1", b"1e3", b"\xd9\xa3", b"9" * 40]:
        error = _error(client.get(f"/admin/jobs/{job}/events", headers={**ADMIN, "Last-Event-ID": bad}), 422)
        assert error["param"] == "Last-Event-ID", error
    with client.stream("GET", f"/admin/jobs/{job}/events", headers={**ADMIN, "Last-Event-ID": "2"}) as r:
        assert r.status_code == 200
        ids = [int(line[3:]) for line in r.iter_lines() if line.startswith("id:")]
    assert ids and min(ids) > 2  # resumed after event 2


# -- item 5: bounded metric labels --------------------------------------------------------------------------
def _series(client: httpx.Client) -> set[tuple]:
    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))) for family in text_string_to_metric_families(text)
            for s in family.samples}


def test_random_methods_and_paths_add_no_metric_series(tiny_checkpoint: Path) -> None:
    # h11, which passes any method token to the app (httptools refuses methods it does not know with a 400).
    app = create_app(Settings(checkpoint=tiny_checkpoint, log_level="warning"))
    with running_server(app, http="h11") as url, httpx.Client(base_url=url, timeout=30) as client:
        _check_bounded_labels(client)


def _check_bounded_labels(client: httpx.Client) -> None:
    # The first odd method, unknown path and scrape create the labels they fall under.
    client.request("PROPFIND", "/nowhere")
    client.request("PROPFIND", "/healthz")
    client.get("/healthz")
    _series(client)
    before = _series(client)
    rng = random.Random(0)
    for i in range(100):
        method = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12)))
        r = client.request(method, f"/{method.lower()}/{i}" if i % 2 else "/healthz")
        assert r.status_code in (404, 405)
    client.request("X" * 8000, "/healthz")
    after = _series(client)
    assert after == before, sorted(after - before)[:5]
    text = client.get("/metrics").text
    assert 'method="other"' in text and "PROPFIND" not in text and len(text) < 100_000


# -- item 6: bounded chat messages, rendered once ----------------------------------------------------------
def test_a_huge_messages_list_is_422_naming_the_field(server) -> None:
    client, _ = server
    body = {"messages": [{"role": "user", "content": ""}] * 25_000}
    error = _error(client.post("/v1/chat/completions", headers=USER, json=body), 422)
    assert error["param"] == "messages"
    body = {"messages": [{"role": "user", "content": "a"}] * 257}  # over POCKETGPT_MAX_MESSAGES (256)
    error = _error(client.post("/v1/chat/completions", headers=USER, json=body), 422)
    assert error["param"] == "messages" and "256" in error["message"], error
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}] * 1000}]}
    assert _error(client.post("/v1/chat/completions", headers=USER, json=parts), 422)["param"] == \
        "messages.0.content"


def test_messages_are_converted_and_rendered_once(server, monkeypatch: pytest.MonkeyPatch) -> None:
    client, _ = server
    calls = {"dicts": 0, "render": 0}
    dicts, render = ChatCompletionRequest.message_dicts, ChatTemplate.render

    def counted_dicts(self):
        calls["dicts"] += 1
        return dicts(self)

    def counted_render(self, *args, **kwargs):
        calls["render"] += 1
        return render(self, *args, **kwargs)

    monkeypatch.setattr(ChatCompletionRequest, "message_dicts", counted_dicts)
    monkeypatch.setattr(ChatTemplate, "render", counted_render)
    body = {"messages": [{"role": "user", "content": "Hi"}] * 20, "max_tokens": 2}
    assert client.post("/v1/chat/completions", headers=USER, json=body).status_code == 200
    assert calls == {"dicts": 1, "render": 1}


# -- item 11: OpenAI compatibility ------------------------------------------------------------------------
def _sdk(client: httpx.Client) -> openai.OpenAI:
    base = str(client.base_url).rstrip("/")
    return openai.OpenAI(base_url=f"{base}/v1", api_key=USER["Authorization"][7:], max_retries=0, timeout=30)


def test_models_retrieve_and_unknown_models(server) -> None:
    client, _ = server
    sdk = _sdk(client)
    assert [m.id for m in sdk.models.list().data] == [SERVED]
    assert sdk.models.retrieve(SERVED).id == SERVED  # the id holds a "/": /v1/models/run/best
    assert sdk.models.retrieve("run").id == SERVED  # a run's best checkpoint also answers to the run's name
    with pytest.raises(openai.NotFoundError) as info:
        sdk.models.retrieve("gpt-4o")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as info:
        sdk.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="run/last", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert sdk.completions.create(model=SERVED, prompt="hi", max_tokens=2).model == SERVED
    assert sdk.chat.completions.create(model="run", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2).model == SERVED
    # Without `model` (the README's curl examples) the served model answers.
    assert client.post("/v1/completions", headers=USER, json={"prompt": "hi", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("extra", "status", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}}, 400,
     "response_format.json_schema"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"functions": [{"name": "f"}]}, 400, "functions"),
    ({"tool_choice": "auto"}, 400, "tool_choice"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"stream_options": {"include_usage": True}, "stream": False}, 400, "stream_options"),
])
def test_unsupported_openai_fields_are_refused(server, path: str, extra: dict, status: int, param: str) -> None:
    client, _ = server
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    error = _error(client.post(path, headers=USER, json={**base, "max_tokens": 2, **extra}), status)
    assert error["param"] == param


def test_text_response_format_and_no_tools_are_fine(server) -> None:
    client, _ = server
    body = {"prompt": "hi", "max_tokens": 2, "response_format": {"type": "text"}, "tool_choice": "none"}
    assert client.post("/v1/completions", headers=USER, json=body).status_code == 200


def test_special_token_text_in_a_prompt_is_plain_text(server) -> None:
    client, tok = server
    prompt = f"The end{EOT}The start"
    r = client.post("/v1/generate", headers=USER, json={"prompt": prompt, "max_new_tokens": 1, "temperature": 0})
    plain = tok.encode(prompt, allow_special=False)
    assert tok.eot_id not in plain
    assert r.json()["usage"]["prompt_tokens"] == len(plain) != len(tok.encode(prompt))


# -- item 3: temperatures and penalties that underflow float32 ------------------------------------------------
def test_a_tiny_temperature_answers_like_greedy(server) -> None:
    client, _ = server
    body = {"prompt": "The quick", "max_new_tokens": 8}
    greedy = client.post("/v1/generate", headers=USER, json={**body, "temperature": 0}).json()["text"]
    for temperature in (1e-39, 1e-45):
        r = client.post("/v1/generate", headers=USER, json={**body, "temperature": temperature, "seed": 1})
        assert r.json()["text"] == greedy, temperature
    error = _error(client.post("/v1/generate", headers=USER, json={**body, "repetition_penalty": 1e-46}), 422)
    assert error["param"] == "repetition_penalty"


# -- item 9: uploads that are not a complete text file ------------------------------------------------------
def test_cut_off_multipart_and_binary_uploads_are_refused_by_name(server) -> None:
    client, _ = server
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\nsome text\n'
    headers = {**ADMIN, "Content-Type": "multipart/form-data; boundary=B"}
    error = _error(client.post("/admin/datasets", headers=headers, content=head), 400)
    assert error["code"] == "incomplete_multipart" and "incomplete" in error["message"]
    error = _error(client.post("/admin/datasets", headers=ADMIN, files={"file": ("x.bin", b"\x7fELF\x02\x01\x00")}),
                   422)
    assert error["code"] == "not_text" and error["param"] == "file" and "not UTF-8 text" in error["message"]
    assert client.post("/admin/datasets", headers=headers, content=head + b"\r\n--B--\r\n").status_code == 201


# -- item 7: symlinks inside the allowed roots that lead outside ------------------------------------------------
def test_a_data_folder_holding_a_link_outside_is_refused(server, root: Path) -> None:
    client, _ = server
    (root / "secret.txt").write_text("top secret\n" * 100)
    folder = root / "data" / "corpus"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("plain text\n" * 100)
    (root / "data" / "other.txt").write_text("more text\n" * 100)
    os.symlink(root / "data" / "other.txt", folder / "inside.txt")  # a link that stays in the root is fine
    r = client.post("/admin/jobs", headers=ADMIN, json={"data": "corpus", "preset": "tiny", "max_steps": 1})
    assert r.status_code == 202, r.text
    (folder / "deep").mkdir()
    os.symlink(root / "secret.txt", folder / "deep" / "leak.txt")
    error = _error(client.post("/admin/jobs", headers=ADMIN, json={"data": ["corpus"], "preset": "tiny"}), 422)
    assert error["param"] == "data" and "deep/leak.txt" in error["message"], error
    os.symlink(root / "nowhere", folder / "dangling.txt")
    os.unlink(folder / "deep" / "leak.txt")
    assert _error(client.post("/admin/jobs", headers=ADMIN, json={"data": "corpus"}), 422)["param"] == "data"
    os.unlink(folder / "dangling.txt")


def test_a_link_planted_while_a_job_waits_stops_it_at_start(server, root: Path) -> None:
    client, _ = server
    folder = root / "data" / "queued"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("plain text\n" * 100)
    busy = client.post("/admin/jobs", headers=ADMIN, json={"data": "stdlib", "max_steps": 400}).json()["id"]
    waiting = client.post("/admin/jobs", headers=ADMIN, json={"data": "queued", "max_steps": 1}).json()["id"]
    assert wait_job(client, waiting, lambda j: True)["status"] == "queued"  # MAX_CONCURRENT_JOBS is 1
    (root / "secret2.txt").write_text("top secret\n")
    os.symlink(root / "secret2.txt", folder / "leak.txt")
    client.post(f"/admin/jobs/{busy}/cancel", headers=ADMIN)
    job = wait_job(client, waiting, lambda j: j["status"] not in ("queued", "running"))
    assert job["status"] == "failed" and "leak.txt" in job["error"] and "refused to start" in job["error"]
    assert not (Path(job["run_dir"]) / "metrics.jsonl").exists()  # the trainer never ran


def test_a_checkpoint_whose_files_link_outside_is_not_loaded(server, root: Path) -> None:
    client, _ = server
    outside = make_tiny_checkpoint(root / "elsewhere" / "ckpt")
    linked = root / "ckpt" / "linked"
    shutil.copytree(root / "ckpt" / "run" / "best", linked)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "meta.json"):
        target = linked / name
        saved = target.read_bytes()
        target.unlink()
        os.symlink(outside / name, target)
        for body in ({"checkpoint": "linked"},):
            error = _error(client.post("/admin/model", headers=ADMIN, json=body), 422)
            assert error["param"] == "checkpoint" and name in error["message"], error
        error = _error(client.post("/admin/jobs", headers=ADMIN, json={"data": "stdlib", "init_from": "linked"}),
                       422)
        assert error["param"] == "init_from" and name in error["message"]
        target.unlink()
        target.write_bytes(saved)
    assert client.get("/admin/model", headers=ADMIN).json()["checkpoint"] == SERVED  # still the same model
    r = client.post("/admin/model", headers=ADMIN, json={"checkpoint": "linked"})  # whole again: loads
    assert r.status_code == 200, r.text
    assert client.post("/admin/model", headers=ADMIN, json={"checkpoint": SERVED}).status_code == 200


def test_access_log_lines_cannot_be_forged(server, caplog: pytest.LogCaptureFixture) -> None:
    """A path with an encoded newline and quote stays on its one escaped log line."""
    client, _ = server
    with caplog.at_level(logging.INFO, logger="pocketgpt.access"):
        client.get('/x%0Arid=forged "GET /admin" 200%22', headers={"X-Request-ID": "forge-test"})
        deadline = time.monotonic() + 2
        while not any("forge-test" in m for m in caplog.messages) and time.monotonic() < deadline:
            time.sleep(0.01)
    line = next(m for m in caplog.messages if "rid=forge-test" in m)
    assert "\n" not in line and line.count('"') == 2 and "\\n" in line and "forged%20%22GET" in line, line


def test_prompts_and_conversations_are_tokenized_off_the_event_loop(server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's event loop runs in the "uvicorn" thread (app/testing.py); tokenizing happens in another."""
    client, _ = server
    threads: list[str] = []
    encode, render = Tokenizer.encode, ChatTemplate.render

    def recorded_encode(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return encode(self, *args, **kwargs)

    def recorded_render(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return render(self, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode", recorded_encode)
    monkeypatch.setattr(ChatTemplate, "render", recorded_render)
    assert client.post("/v1/generate", headers=USER, json={"prompt": "The quick brown fox", "max_new_tokens": 1}
                       ).status_code == 200
    assert client.post("/v1/completions", headers=USER, json={"prompt": "hi", "max_tokens": 1}).status_code == 200
    body = {"messages": [{"role": "user", "content": "Hi"}] * 3, "max_tokens": 1}
    assert client.post("/v1/chat/completions", headers=USER, json=body).status_code == 200
    assert threads and "uvicorn" not in threads, threads
