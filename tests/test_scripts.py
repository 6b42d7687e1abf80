"""The curl scripts in scripts/, run against a real server (uvicorn in a child process, tiny checkpoint).

The server has an API key and an admin token set, so every script is also checked to send them; `train.sh`
runs a real (tiny, few-step) training job through the admin API.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_tiny_checkpoint
from tests.serverproc import ROOT, Proc, base_env, free_port, request, wait_ready

SCRIPTS = ROOT / "scripts"
ALL = ("generate.sh", "stream.sh", "openai.sh", "train.sh", "jobs.sh", "load-model.sh")
API_KEY = "test-api-key"
ADMIN = "test-admin-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("scripts")
    ckpts = root / "checkpoints"
    make_tiny_checkpoint(ckpts / "tiny")
    make_tiny_checkpoint(ckpts / "other", seed=1)
    port = free_port()
    env = base_env(
        POCKETGPT_CHECKPOINT=str(ckpts / "tiny"),
        POCKETGPT_CHECKPOINT_DIR=str(ckpts),
        POCKETGPT_DATA_DIR=str(root / "data"),
        POCKETGPT_DB=str(root / "pocketgpt.db"),
        POCKETGPT_DEVICE="cpu",
        POCKETGPT_API_KEYS=API_KEY,
        POCKETGPT_ADMIN_TOKEN=ADMIN,
    )
    argv = ["python", "-m", "uvicorn", "--factory", "pocketgpt.app.main:create_app", "--host", "127.0.0.1",
            "--port", str(port)]
    proc = Proc(argv, env=env, log=root / "server.log", cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, timeout=90)
        yield {"url": base, "root": str(root), "log": str(proc.log_path)}
    finally:
        proc.stop()


def run(script: str, *args: str, server: dict[str, str] | None = None, api_key: str | None = API_KEY,
        admin: str | None = ADMIN, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    environ = base_env(**env)
    if server is not None:
        environ["POCKETGPT_URL"] = server["url"]
    if api_key is not None:
        environ["POCKETGPT_API_KEY"] = api_key
    if admin is not None:
        environ["POCKETGPT_ADMIN_TOKEN"] = admin
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=environ, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


@pytest.mark.parametrize("script", ALL)
def test_every_script_has_a_usage_line(script: str) -> None:
    out = ok(run(script, "-h"))
    assert out.startswith("usage: ") and "POCKETGPT_URL" in out
    bad = run(script, "--no-such-option")
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def test_generate_prints_the_text_and_json(server) -> None:
    text = ok(run("generate.sh", "-n", "6", "-t", "0", "def ", server=server))
    body = json.loads(ok(run("generate.sh", "-n", "6", "-t", "0", "--json", "def ", server=server)))
    assert body["usage"]["completion_tokens"] == 6 and body["finish_reason"] == "length"
    assert text == body["text"] + "\n"


def test_generate_builds_json_safely_from_any_prompt(server) -> None:
    prompt = 'quote " backslash \\ newline \n tab \t unicode 床前 $HOME `id` \'single\''
    body = json.loads(ok(run("generate.sh", "-n", "2", "-t", "0", "-j", prompt, server=server)))
    assert body["usage"]["prompt_tokens"] > 10
    piped = subprocess.run(["bash", str(SCRIPTS / "generate.sh"), "-n", "2", "-t", "0", "-j", "-"],
                           input=prompt, capture_output=True, text=True, timeout=60,
                           env=base_env(POCKETGPT_URL=server["url"], POCKETGPT_API_KEY=API_KEY))
    assert json.loads(ok(piped))["usage"]["prompt_tokens"] == body["usage"]["prompt_tokens"]


def test_http_errors_exit_nonzero_with_the_body_on_stderr(server) -> None:
    no_key = run("generate.sh", "def ", server=server, api_key=None)
    assert no_key.returncode == 1 and "HTTP 401" in no_key.stderr and "missing_api_key" in no_key.stderr
    too_many = run("generate.sh", "-n", "100000", "def ", server=server)
    assert too_many.returncode == 1 and "HTTP 422" in too_many.stderr and too_many.stdout == ""
    bad_number = run("generate.sh", "-n", "lots", "def ", server=server)
    assert bad_number.returncode != 0 and "max_new_tokens" in bad_number.stderr


def test_unreachable_server_exits_nonzero() -> None:
    result = run("generate.sh", "def ", POCKETGPT_URL=f"http://127.0.0.1:{free_port()}")
    assert result.returncode not in (0, 1) and "failed" in result.stderr


def test_stream_prints_the_same_text_as_generate(server) -> None:
    expected = ok(run("generate.sh", "-n", "8", "-t", "0", "def ", server=server))
    result = run("stream.sh", "-n", "8", "-t", "0", "def ", server=server)
    assert ok(result) == expected
    assert "[8 tokens, length" in result.stderr
    raw = ok(run("stream.sh", "-n", "3", "-t", "0", "--raw", "def ", server=server))
    assert raw.count("event: token") == 3 and "event: done" in raw


def test_stream_http_error_exits_nonzero(server) -> None:
    result = run("stream.sh", "-n", "3", "def ", server=server, api_key="wrong-key")
    assert result.returncode != 0 and "invalid_api_key" in result.stderr


def test_openai_completions_json_and_stream(server) -> None:
    expected = ok(run("generate.sh", "-n", "8", "-t", "0", "def ", server=server))
    assert ok(run("openai.sh", "-n", "8", "-t", "0", "def ", server=server)) == expected
    assert ok(run("openai.sh", "-n", "8", "-t", "0", "--stream", "def ", server=server)) == expected
    body = json.loads(ok(run("openai.sh", "-n", "2", "-j", "def ", server=server)))
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 2
    models = json.loads(ok(run("openai.sh", "--models", server=server)))
    assert models["data"][0]["id"]
    refused = run("openai.sh", "-m", "x", "-n", "0", "def ", server=server)
    assert refused.returncode == 1 and "HTTP 422" in refused.stderr


def test_admin_scripts_need_the_admin_token(server) -> None:
    for script in ("train.sh", "jobs.sh", "load-model.sh"):
        missing = run(script, server=server, admin=None)
        assert missing.returncode == 2 and "POCKETGPT_ADMIN_TOKEN" in missing.stderr
    wrong = run("jobs.sh", server=server, admin="not-the-token")
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr


def test_train_uploads_runs_and_follows_a_job_then_jobs_shows_it(server, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 200 + "class Point:\n    pass\n" * 100)
    result = run(
        "train.sh", "-f", str(corpus), "--preset", "tiny", "--steps", "4", "--name", "script test",
        "--set", "eval_every=2", "--set", "eval_batches=1", "--set", "batch_size=2", "--set", "tokenizer_vocab=300",
        "--set", "sample_tokens=4", "--set", "model.n_layer=1", "--set", "model.block_size=32",
        server=server, timeout=180,
    )
    out = ok(result)
    assert "uploaded" in result.stderr and "queued" in result.stderr
    assert "step 2: val loss" in out and "step 4: val loss" in out, out
    assert "succeeded" in out and "best checkpoint" in out, out
    job_id = result.stderr.split("job ", 1)[1].split()[0]
    assert job_id.startswith("job-")

    listing = ok(run("jobs.sh", server=server))
    assert job_id in listing and "succeeded" in listing and "script test" in listing
    as_json = json.loads(ok(run("jobs.sh", "--json", "--status", "succeeded", server=server)))
    assert job_id in [j["id"] for j in as_json["data"]]
    job = json.loads(ok(run("jobs.sh", job_id, server=server)))
    assert job["status"] == "succeeded" and job["step"] == 4
    assert "step 4" in ok(run("jobs.sh", job_id, "logs", "50", server=server))
    events = ok(run("jobs.sh", job_id, "events", server=server))
    assert "event: end" in events and "event: status" in events
    not_running = run("jobs.sh", job_id, "cancel", server=server)
    assert not_running.returncode == 1 and "HTTP 409" in not_running.stderr
    missing = run("jobs.sh", "job-000000000000", server=server)
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr

    # the job's checkpoint is listed, and can be served
    listing = ok(run("load-model.sh", server=server))
    assert f"{job_id}/best" in listing


def test_train_no_follow_and_bad_request(server) -> None:
    bad = run("train.sh", "--steps", "0", server=server)
    assert bad.returncode == 1 and "HTTP 422" in bad.stderr and "max_steps" in bad.stderr
    bad_data = run("train.sh", "../../etc/passwd", server=server)
    assert bad_data.returncode == 1 and "HTTP 422" in bad_data.stderr


def test_load_model_lists_and_hot_swaps(server) -> None:
    listing = ok(run("load-model.sh", server=server))
    assert "* tiny" in listing and "other" in listing, listing
    assert json.loads(ok(run("load-model.sh", "-j", server=server)))["data"]
    try:
        ok(run("load-model.sh", "other", server=server))
        status, ready = request("GET", f"{server['url']}/readyz")
        assert status == 200 and ready["model"] == "other", ready
        assert "* other" in ok(run("load-model.sh", server=server))
        missing = run("load-model.sh", "does-not-exist", server=server)
        assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    finally:
        ok(run("load-model.sh", "tiny", server=server))
