"""The browser playground (GET /) in a real headless Chromium, driven by Playwright, against a real server.

One uvicorn server (tiny model, 20 ms per engine step so streaming is visible, API keys and the admin token
set) and one browser are shared by the module; each test gets a fresh browser context. The browser is Debian's
`chromium` package (`playwright install` downloads browsers and is not used): without it, or without the
`playwright` Python package, every test here is skipped with the reason, never passed.

Screenshots go to a temporary directory (printed at the end of the run), or to $POCKETGPT_SCREENSHOTS.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pocketgpt.app.testing import running_server
from pocketgpt.model.chat import ChatTemplate
from pocketgpt.model.checkpoint import load_checkpoint, save_checkpoint
from pocketgpt.model.vocab import add_token_rows
from tests.admin_helpers import ADMIN, API_KEY, TOKEN, USER, corpus_bytes, make_app, make_settings
from tests.conftest import make_tiny_checkpoint
from tests.prom import scrape

CHROMIUM = os.environ.get("POCKETGPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-quic", "--disable-sync"]
STEP_DELAY = 0.02  # seconds per engine step: a 60-token answer takes over a second, many frames

# Reads the output's length once per animation frame until `window.__stopSampling`: "the text grew over
# several frames" is then a fact about what the page painted, not about the network.
SAMPLE_FRAMES = """() => {
  window.__lengths = [];
  window.__stopSampling = false;
  const text = document.getElementById("gen-text");
  const tick = () => {
    window.__lengths.push(text.textContent.length);
    if (!window.__stopSampling) requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
}"""


# -- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.skip(f"playwright is not installed ({exc}); pip install -e '.[dev]'")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set POCKETGPT_CHROMIUM)")
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        except Exception as exc:
            pytest.skip(f"cannot launch Chromium at {CHROMIUM}: {str(exc).splitlines()[0]}")
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a server with API keys, the admin API (data and checkpoints in tmp) and a tiny model."""
    root = tmp_path_factory.mktemp("playground")
    base = make_tiny_checkpoint(root / "ckpt" / "starter" / "base")
    settings = make_settings(root, base, max_running=2, max_queue=2)
    with running_server(make_app(settings, step_delay=STEP_DELAY)) as url:
        yield url


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Like `server`, but its tiny model has the default chat template (markers added to the vocabulary)."""
    root = tmp_path_factory.mktemp("playground-chat")
    plain = load_checkpoint(make_tiny_checkpoint(root / "plain", block_size=128))
    template = ChatTemplate()
    tok = plain.tokenizer.with_special_tokens(template.special_tokens)
    model = add_token_rows(plain.model, plain.tokenizer.vocab_size, tok.vocab_size)
    chat = save_checkpoint(root / "ckpt" / "chat", model, tok, {"step": 0}, chat_template=template)
    with running_server(make_app(make_settings(root, chat), step_delay=STEP_DELAY)) as url:
        yield url


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where screenshots go (the path is reported at the end of the module)."""
    target = os.environ.get("POCKETGPT_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("playground-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    yield path
    print(f"\nplayground screenshots: {path}")


def new_page(browser: Any, url: str, *, api_key: bool = True, **context_options: Any):
    """A page on a fresh context (its own sessionStorage), optionally with the API key already stored."""
    context = browser.new_context(viewport=context_options.pop("viewport", {"width": 1280, "height": 900}),
                                  **context_options)
    if api_key:
        context.add_init_script(f"sessionStorage.setItem('pocketgpt.apiKey', '{API_KEY}')")
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))  # uncaught exceptions in the page's scripts
    page.goto(url)
    page.wait_for_selector("html[data-ready=true]")
    return context, page, errors


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    context, page, errors = new_page(browser, server)
    yield page
    context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


def metric(url: str, name: str) -> float:
    return scrape(url)(name)


def set_sampling(page: Any, **fields: Any) -> None:
    for field, value in fields.items():
        page.fill(f"#{field}", str(value))


# -- tests -----------------------------------------------------------------------------------------------
def test_page_is_open_labelled_keyboard_usable_and_asks_for_the_api_key(browser, server, shots) -> None:
    # The page and its assets need no key even though the API does; unknown paths keep the JSON 404.
    index = httpx.get(f"{server}/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in index.headers["content-security-policy"]
    for asset in ("app.js", "api.js", "generate.js", "train.js", "chart.js", "app.css"):
        r = httpx.get(f"{server}/static/{asset}")
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff", asset
    assert httpx.get(f"{server}/info").status_code == 401
    missing = httpx.get(f"{server}/static/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"

    context, page, errors = new_page(browser, server, api_key=False)
    try:
        # /info answered 401: the model panel says where the key goes instead of failing silently.
        page.wait_for_selector("#model-msg:not([hidden])")
        assert "API key" in page.inner_text("#model-msg")
        page.click("#key-details summary")
        page.fill("#api-key", API_KEY)
        page.press("#api-key", "Tab")  # `change` fires on leaving the field
        page.wait_for_selector("#model-info:not([hidden])")
        assert page.inner_text("#model-context") == "128 tokens"
        assert page.inner_text("#model-name") == "starter/base"
        assert re.fullmatch(r"[\d.]+ k", page.inner_text("#model-params"))
        assert page.evaluate("sessionStorage.getItem('pocketgpt.apiKey')") == API_KEY

        # Every form control has a label; tabs are buttons with aria-selected and follow the arrow keys.
        unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
            .filter(e => e.labels.length === 0 && !e.getAttribute('aria-label')).map(e => e.id || e.name)""")
        assert unlabelled == []
        assert page.eval_on_selector_all('[role="tab"]', "ts => ts.every(t => t.tagName === 'BUTTON')")
        page.focus("#tab-generate")
        page.keyboard.press("ArrowRight")
        assert page.get_attribute("#tab-train", "aria-selected") == "true"
        assert page.evaluate("document.activeElement.id") == "tab-train"
        assert page.is_visible("#panel-train") and not page.is_visible("#panel-generate")
        page.keyboard.press("ArrowLeft")
        assert page.get_attribute("#tab-generate", "aria-selected") == "true" and page.is_visible("#prompt")
        page.screenshot(path=str(shots / "start-light.png"), full_page=True)
    finally:
        context.close()
    assert errors == []


# The page's SSE reader, fed one byte per chunk: a CRLF and a 3-byte UTF-8 character are split across chunks,
# a ping comment, a multi-line data field, an id, and a last event with no blank line after it.
SSE_AND_ERRORS = """async () => {
  const { readSSE, errorFrom, describe, fromEnvelope } = await import("/static/api.js");
  const text = 'event: token\\r\\ndata: {"a":1}\\r\\n\\r\\n: ping\\r\\n\\r\\n' +
    "data: line1\\ndata: line2\\n\\nid: 7\\nevent: x\\ndata: 明 tail";
  const bytes = new TextEncoder().encode(text);
  const body = new ReadableStream({ start(c) { for (const b of bytes) c.enqueue(new Uint8Array([b])); c.close(); } });
  const events = [];
  await readSSE(new Response(body), (e) => events.push(e));
  const envelope = { error: { message: "the queue is full", type: "overloaded_error", code: "queue_full" } };
  const busy = new Response(JSON.stringify(envelope), { status: 429, headers: { "Retry-After": "2" } });
  const proxy = new Response("<html>oops</html>", { status: 502, statusText: "Bad Gateway" });
  const midStream = fromEnvelope(0, { error: { message: "request timed out", type: "timeout_error" } });
  return { events, busy: describe(await errorFrom(busy)), proxy: describe(await errorFrom(proxy)),
           midStream: describe(midStream), offline: describe(new TypeError("Failed to fetch")) };
}"""


def test_sse_reader_and_error_messages(page) -> None:
    out = page.evaluate(SSE_AND_ERRORS)
    assert out["events"] == [
        {"event": "token", "data": '{"a":1}', "id": ""},
        {"event": "message", "data": "line1\nline2", "id": ""},
        {"event": "x", "data": "明 tail", "id": "7"},
    ]
    assert out["busy"] == "The server is busy: the queue is full. Try again in 2 s."
    assert out["proxy"] == "Error 502: Bad Gateway"
    assert out["midStream"] == "Failed mid-stream (timeout_error): request timed out"
    assert out["offline"] == "Cannot reach the server (Failed to fetch)."


def test_generate_streams_tokens_over_several_frames(page, server, shots) -> None:
    page.fill("#prompt", "The quick brown fox")
    set_sampling(page, **{"max-tokens": 60, "temperature": 1.0, "top-k": 0, "top-p": 1, "seed": 7})
    page.evaluate(SAMPLE_FRAMES)
    page.press("#prompt", "Control+Enter")  # the keyboard shortcut starts it
    page.wait_for_selector("#gen-output[data-state=streaming]")
    page.wait_for_selector("#gen-output[data-state=done]")
    lengths = page.evaluate("window.__stopSampling = true, window.__lengths")

    grown = sorted(set(lengths))
    assert len(grown) >= 5, f"the output did not grow over several frames: {grown}"
    assert lengths == sorted(lengths), "the output shrank while streaming"
    tokens = int(page.inner_text("#stat-tokens"))
    assert re.fullmatch(r"\d+ ms", page.inner_text("#stat-ttft"))
    assert float(page.inner_text("#stat-tps")) > 0
    assert page.inner_text("#stat-finish") in ("length", "eos")
    assert page.is_enabled("#gen-start") and page.is_disabled("#gen-stop")

    # What streamed is what the server generates for the same request (seeded, so reproducible).
    body = {"prompt": "The quick brown fox", "max_new_tokens": 60, "temperature": 1.0, "top_k": 0, "top_p": 1,
            "seed": 7}
    reference = httpx.post(f"{server}/v1/generate", headers=USER, json=body, timeout=30).json()
    assert page.inner_text("#gen-text") == reference["text"]
    assert tokens == reference["usage"]["completion_tokens"]
    page.screenshot(path=str(shots / "generate-light.png"), full_page=True)


def test_stop_aborts_the_stream_and_the_server_frees_the_slot(page, server) -> None:
    page.fill("#prompt", "To be, or not to be")
    set_sampling(page, **{"max-tokens": 100, "temperature": 1.0, "top-k": 0, "top-p": 1, "seed": 7})
    page.click("#gen-start")
    page.wait_for_function("() => Number(document.getElementById('stat-tokens').textContent) >= 5")
    assert metric(server, "pocketgpt_requests_running") == 1
    page.click("#gen-stop")
    page.wait_for_selector("#gen-output[data-state=stopped]")
    assert page.inner_text("#stat-finish") == "stopped"
    assert int(page.inner_text("#stat-tokens")) < 100
    assert page.evaluate("document.activeElement.id") == "gen-start"  # focus not stranded on a disabled button
    deadline = time.monotonic() + 5
    while metric(server, "pocketgpt_requests_running") != 0:
        assert time.monotonic() < deadline, "the server kept the slot after the browser stopped reading"
        time.sleep(0.05)
    assert metric(server, "pocketgpt_requests_waiting") == 0


def test_errors_are_shown_not_swallowed(browser, server) -> None:
    context, page, errors = new_page(browser, server)
    try:
        page.fill("#prompt", "Hello")
        page.fill("#temperature", "5")
        page.click("#gen-start")
        page.wait_for_selector("#gen-output[data-state=error]")
        message = page.inner_text("#gen-error")
        assert page.get_attribute("#gen-error", "role") == "alert"
        assert message.startswith("Invalid request (field: temperature)"), message
        assert "less than or equal to 2" in message
    finally:
        context.close()
    context, page, more = new_page(browser, server, api_key=False)
    try:
        page.fill("#prompt", "Hello")
        page.click("#gen-start")
        page.wait_for_selector("#gen-output[data-state=error]")
        assert "Not authorised: missing API key" in page.inner_text("#gen-error")
        assert page.evaluate("document.activeElement.id") == "api-key"  # the key field opened for the fix
    finally:
        context.close()
    assert errors == [] and more == []


def test_train_a_tiny_job_watch_the_chart_and_serve_it(browser, server, shots) -> None:
    context, page, errors = new_page(browser, server)
    try:
        page.click("#tab-train")
        page.fill("#admin-token", TOKEN)
        page.click("#admin-token-use")
        page.wait_for_selector("#train-auth-msg.ok")

        page.check("input[name=source][value=upload]")
        page.set_input_files("#data-file", files=[{"name": "corpus.txt", "mimeType": "text/plain",
                                                  "buffer": corpus_bytes()}])
        page.select_option("#job-preset", "tiny")
        page.fill("#job-steps", "150")  # long enough to still be running when recording starts on an idle machine
        page.click("#job-form details summary")
        page.fill("#job-eval-every", "25")
        page.fill("#job-batch", "4")
        page.fill("#job-block", "64")
        page.fill("#job-name", "playground")
        page.click("#job-start")
        page.wait_for_selector("#job-form-msg.ok")
        page.wait_for_selector("#job-detail:not([hidden])")
        job_id = page.get_attribute("#job-list li", "data-job-id")
        assert page.inner_text("#job-list .job-name") == "playground"

        # Record the chart's point count every frame until the job has succeeded.
        page.evaluate("""() => {
            window.__points = [];
            const chart = document.getElementById("loss-chart");
            const tick = () => {
              window.__points.push(Number(chart.dataset.trainPoints));
              if (document.getElementById("job-detail").dataset.status !== "succeeded") requestAnimationFrame(tick);
            };
            requestAnimationFrame(tick);
        }""")
        page.wait_for_selector("#job-detail[data-status=succeeded]", timeout=120_000)
        counts = sorted(set(page.evaluate("window.__points")) - {0})
        assert len(counts) >= 2, f"the chart did not gain points while the job ran: {counts}"
        train_points = int(page.get_attribute("#loss-chart", "data-train-points"))
        assert train_points >= 15  # log_every is scaled to the run: at most 10 steps per point
        assert int(page.get_attribute("#loss-chart", "data-val-points")) >= 2
        assert page.eval_on_selector("#loss-chart polyline.train", "p => p.points.length") == train_points
        assert page.inner_text("#job-progress-label") == "step 150 / 150 (100%)"
        assert page.inner_text("#job-eta") == "done"
        assert "succeeded" in page.inner_text("#job-list")
        page.locator("#job-detail").screenshot(path=str(shots / "train-job-light.png"))

        page.click("#job-serve-now")
        page.wait_for_selector("#job-msg.ok")
        assert page.inner_text("#job-msg") == f"Now serving {job_id}/best."
        page.wait_for_function(f"() => document.getElementById('model-name').textContent === '{job_id}/best'")
        assert page.inner_text("#model-context") == "64 tokens"
        assert page.inner_text("#model-size").endswith(("KB", "MB"))  # the admin token shows the size on disk
        info = httpx.get(f"{server}/info", headers=USER).json()
        assert info["checkpoint"].endswith(f"{job_id}/best")
        served = httpx.get(f"{server}/admin/model", headers=ADMIN).json()
        assert served["checkpoint"] == f"{job_id}/best"
        page.emulate_media(color_scheme="dark")
        page.screenshot(path=str(shots / "train-dark.png"), full_page=True)
    finally:
        context.close()
    assert errors == []


def test_phone_width_has_no_horizontal_overflow_light_and_dark(browser, server, shots) -> None:
    for scheme in ("light", "dark"):
        context, page, errors = new_page(browser, server, viewport={"width": 390, "height": 844},
                                         color_scheme=scheme, is_mobile=True, has_touch=True)
        try:
            # Long unbroken text is the usual culprit; it must wrap. (40 one-token characters: the model served
            # by now may be the job's, with a 64-token context.)
            page.fill("#prompt", "x" * 40)
            page.fill("#max-tokens", "8")
            page.click("#gen-start")
            page.wait_for_selector("#gen-output[data-state=done]")
            page.wait_for_selector("#model-info:not([hidden])")
            overflow = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            assert page.evaluate(overflow) <= 0, "the Generate tab is wider than the phone"
            page.screenshot(path=str(shots / f"phone-generate-{scheme}.png"), full_page=True)

            page.click("#tab-train")
            page.fill("#admin-token", TOKEN)
            page.click("#admin-token-use")
            page.wait_for_selector("#train-auth-msg.ok")
            if page.locator("#job-list li").count():  # the job trained above, when the whole module runs
                page.click("#job-list li button")
                page.wait_for_selector("#job-detail[data-status=succeeded]")
                page.wait_for_selector("#loss-chart polyline.train")
            assert page.evaluate(overflow) <= 0, "the Train tab is wider than the phone"
            bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
            assert (bg == "rgb(15, 18, 22)") == (scheme == "dark"), bg
            page.screenshot(path=str(shots / f"phone-train-{scheme}.png"), full_page=True)
        finally:
            context.close()
        assert errors == []


def test_json_schema_box_constrains_the_output(page, server) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    page.fill("#prompt", "A number:")
    set_sampling(page, **{"max-tokens": 30, "temperature": 1.0, "seed": 3})
    page.fill("#json-schema", "{not json")
    page.click("#gen-start")
    assert "not valid JSON" in page.inner_text("#gen-error")  # refused in the page, nothing sent
    page.fill("#json-schema", json.dumps(schema))
    page.click("#gen-start")
    page.wait_for_selector("#gen-output[data-state=done]")
    assert page.inner_text("#stat-finish") == "eos"  # the grammar completed the output
    out = json.loads(page.inner_text("#gen-text"))
    assert set(out) == {"n"} and 0 <= out["n"] <= 99


def test_chat_mode_streams_a_reply_and_keeps_the_conversation(browser, server, chat_server, shots) -> None:
    # A model without a chat template: no Chat tab (its /v1/chat/completions would answer 400).
    context, page, errors = new_page(browser, server)
    page.wait_for_selector("#model-info:not([hidden])")
    assert page.is_hidden("#tab-chat")
    context.close()

    context, page, errors = new_page(browser, chat_server)
    sent: list[Any] = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/v1/chat/completions") else None)
    page.click("#tab-chat:not([hidden])")
    assert page.is_visible("#panel-chat") and page.is_hidden("#panel-generate")
    page.click("#panel-chat summary")
    page.fill("#chat-system", "Be brief.")
    page.fill("#chat-max-tokens", "40")
    page.fill("#chat-temperature", "0")
    # Markup in the message must come back as text, never as elements.
    message = "Hello <b>there</b>"
    page.fill("#chat-input", message)
    page.evaluate(SAMPLE_FRAMES.replace('getElementById("gen-text")', 'getElementById("chat-log")'))
    page.press("#chat-input", "Control+Enter")
    page.wait_for_selector("#chat-log[data-state=streaming]")
    page.wait_for_selector("#chat-log[data-state=done]")
    lengths = page.evaluate("window.__stopSampling = true, window.__lengths")

    turns = page.eval_on_selector_all("#chat-log .turn", "els => els.map(e => [e.dataset.role, "
                                      "e.querySelector('.content').textContent])")
    assert [role for role, _ in turns] == ["user", "assistant"]
    assert turns[0][1] == message and page.locator("#chat-log b").count() == 0
    reply = turns[1][1]
    assert len(set(lengths)) >= 4, f"the reply did not arrive over several frames: {sorted(set(lengths))}"
    assert page.input_value("#chat-input") == "" and page.is_enabled("#chat-send")

    # The page sent a streamed chat completion with the system prompt first; the same request, not streamed
    # and greedy, gives the same reply.
    assert len(sent) == 1 and sent[0].method == "POST"
    body = json.loads(sent[0].post_data)
    assert body["stream"] is True
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": message}]
    reference = httpx.post(f"{chat_server}/v1/chat/completions", headers=USER, timeout=30,
                           json={**body, "stream": False}).json()
    assert reply == reference["choices"][0]["message"]["content"] and reply

    # The second turn carries the whole conversation, then Clear empties it.
    page.fill("#chat-input", "And again?")
    page.click("#chat-send")
    page.wait_for_function("() => document.querySelectorAll('#chat-log .turn').length === 4 && "
                           "document.getElementById('chat-log').dataset.state === 'done'")
    second = json.loads(sent[1].post_data)["messages"]
    assert second[1:] == [{"role": "user", "content": message}, {"role": "assistant", "content": reply},
                          {"role": "user", "content": "And again?"}]
    page.screenshot(path=str(shots / "chat.png"), full_page=True)
    page.click("#chat-clear")
    assert page.locator("#chat-log .turn").count() == 0 and page.is_visible("#chat-empty")
    context.close()
    assert errors == []
