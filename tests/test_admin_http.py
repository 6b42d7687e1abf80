"""The admin API end to end: a real uvicorn server, the real trainer (`python -m pocketgpt.training train`), tiny jobs.

One server is shared by the story, hot swap and failing-trainer tests; the cancel/restart test runs its own.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from pocketgpt.app.testing import running_server
from tests.admin_helpers import (
    ADMIN,
    USER,
    corpus_bytes,
    follow_events,
    generate,
    get_job,
    make_app,
    make_settings,
    start_job,
    upload,
    wait_job,
)
from tests.conftest import make_tiny_checkpoint
from tests.sse import iter_events


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """(client, root) of a running server with the admin API on and a tiny model loaded."""
    root = tmp_path_factory.mktemp("admin")
    base = make_tiny_checkpoint(root / "ckpt" / "starter" / "base")
    settings = make_settings(root, base)
    # A small per-token delay keeps generations alive long enough for the hot swap test to overlap them.
    with running_server(make_app(settings, step_delay=0.005)) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c, root


def test_story_upload_train_follow_list_serve_generate(server) -> None:
    client, _ = server
    ds = upload(client, corpus_bytes())  # bigger than max_body_bytes: uploads have their own limit
    assert ds["bytes"] == len(corpus_bytes()) and ds["lines"] >= 1 and len(ds["sha256"]) == 64
    job = start_job(client, data=ds["id"], max_steps=10, serve_when_done=True, name="story")
    assert job["status"] in ("queued", "running") and job["name"] == "story"

    events = follow_events(client, job["id"])
    kinds = [k for k, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "status"
    assert {"train", "eval", "checkpoint", "end"} <= set(kinds)
    train = [d for k, d in events if k == "train"]
    assert [d["step"] for d in train] == list(range(1, 11)) and train[-1]["total_steps"] == 10
    final = events[-1][1]
    assert final["status"] == "succeeded" and final["step"] == 10 and final["total_steps"] == 10
    assert final["train_loss"] > 0 and final["val_loss"] > 0 and final["tokens_per_s"] > 0
    assert final["checkpoints"] == {"last": f"{job['id']}/last", "best": f"{job['id']}/best"}

    listed = {c["name"]: c for c in client.get("/admin/checkpoints", headers=ADMIN).json()["data"]}
    best = listed[f"{job['id']}/best"]
    assert best["job"] == job["id"] and best["step"] == 10 and best["params"] > 0 and best["size_bytes"] > 0
    assert listed["starter/base"]["job"] is None

    # serve_when_done hot-loads the best checkpoint; /v1/models and /info then name it.
    wait_job(client, job["id"], lambda j: j["served_checkpoint"] or j["serve_error"], timeout=30)
    assert get_job(client, job["id"])["served_checkpoint"] == f"{job['id']}/best"
    assert client.get("/v1/models", headers=USER).json()["data"][0]["id"] == f"{job['id']}/best"
    r = client.post("/admin/model", headers=ADMIN, json={"checkpoint": f"{job['id']}/last"})
    assert r.status_code == 200, r.text
    assert client.get("/info", headers=USER).json()["checkpoint"].endswith(f"{job['id']}/last")
    assert client.get("/admin/model", headers=ADMIN).json()["checkpoint"] == f"{job['id']}/last"
    out = generate(client, "The quick brown")
    assert out["model"] == f"{job['id']}/last" and out["usage"]["completion_tokens"] >= 1

    log = client.get(f"/admin/jobs/{job['id']}/logs?tail=5", headers=ADMIN)
    assert log.status_code == 200 and log.headers["content-type"].startswith("text/plain")
    assert "succeeded" in log.text and len(log.text.splitlines()) <= 5
    ids = [j["id"] for j in client.get("/admin/jobs?status=succeeded", headers=ADMIN).json()["data"]]
    assert job["id"] in ids


def test_hot_swap_under_load_loses_no_request(server) -> None:
    client, root = server
    a, b = root / "ckpt" / "swap" / "a", root / "ckpt" / "swap" / "b"
    shutil.copytree(root / "ckpt" / "starter" / "base", a)
    make_tiny_checkpoint(b, seed=1)
    assert client.post("/admin/model", headers=ADMIN, json={"checkpoint": "swap/a"}).status_code == 200
    results: list[tuple[int, list[str], str | None]] = []
    started = threading.Barrier(9, timeout=60)
    stop = threading.Event()

    def load() -> None:
        """Streams back to back until the swaps are over, so every swap finds requests in flight."""
        body = {"prompt": "A journey", "max_new_tokens": 60, "temperature": 0.8, "stream": True}
        with httpx.Client(base_url=str(client.base_url), timeout=60) as c:
            first = True
            while first or not stop.is_set():
                kinds, model = [], None
                with c.stream("POST", "/v1/generate", headers=USER, json=body) as r:
                    for event in iter_events(r):
                        kinds.append(event.event)
                        if event.event == "done":
                            model = json.loads(event.data)["model"]
                        if first and len(kinds) == 1:
                            started.wait()
                    results.append((r.status_code, kinds, model))
                first = False

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait()  # every stream is mid-generation
    for name in ("swap/b", "swap/a", "swap/b"):
        served_before = len(results)
        r = client.post("/admin/model", headers=ADMIN, json={"checkpoint": name})
        assert r.status_code == 200, r.text
        # Let requests admitted by the new model finish before swapping again (the old one drains meanwhile).
        deadline = time.monotonic() + 30
        while not any(m == name for _, _, m in results[served_before:]) and time.monotonic() < deadline:
            time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(60)
    assert len(results) >= 16
    for status, kinds, _ in results:
        assert status == 200 and kinds[-1] == "done" and "error" not in kinds, kinds
    assert {"swap/a", "swap/b"} <= {model for _, _, model in results}
    assert client.get("/v1/models", headers=USER).json()["data"][0]["id"] == "swap/b"

    # A checkpoint that cannot load: 422 with the reason, and the old model keeps serving.
    broken = root / "ckpt" / "swap" / "broken"
    shutil.copytree(b, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    r = client.post("/admin/model", headers=ADMIN, json={"checkpoint": "swap/broken"})
    assert r.status_code == 422 and "safetensors" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "checkpoint_load_failed"
    assert generate(client)["model"] == "swap/b"


def test_failing_trainer_ends_failed_and_the_server_is_unaffected(server) -> None:
    client, _ = server
    ds = upload(client, b"hello world\n", filename="short.txt")  # far fewer tokens than one context window
    job = start_job(client, data=ds["id"], max_steps=5)
    final = follow_events(client, job["id"])[-1][1]
    assert final["status"] == "failed" and final["exit_code"] == 2
    assert "too few" in final["error"] and "train.log" in final["error"]
    assert client.get("/healthz").status_code == 200
    assert generate(client)["usage"]["completion_tokens"] >= 1
    assert client.post(f"/admin/jobs/{job['id']}/resume", headers=ADMIN).status_code == 409
    assert client.post(f"/admin/jobs/{job['id']}/cancel", headers=ADMIN).status_code == 409


@pytest.mark.slow  # three trainer processes in turn (~35 s); cancel and resume each have faster tests
def test_cancel_then_restart_then_resume_continues_the_count(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, make_tiny_checkpoint(tmp_path / "base"))
    with running_server(make_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        ds = upload(client, corpus_bytes())
        # Enough small steps that the job is still running when the server stops, even on an idle machine.
        job = start_job(client, data=ds["id"], max_steps=300, batch_size=4)
        wait_job(client, job["id"], lambda j: (j["step"] or 0) >= 2)
        r = client.post(f"/admin/jobs/{job['id']}/cancel", headers=ADMIN)
        assert r.status_code == 200 and r.json()["cancel_requested"] is True
        cancelled = wait_job(client, job["id"], lambda j: j["status"] != "running")
        assert cancelled["status"] == "cancelled" and cancelled["exit_code"] == 143, cancelled
        assert cancelled["checkpoints"]["last"] == f"{job['id']}/last"
        # Its last checkpoint loads and serves.
        r = client.post("/admin/model", headers=ADMIN, json={"checkpoint": cancelled["checkpoints"]["last"]})
        assert r.status_code == 200, r.text
        assert generate(client)["model"] == f"{job['id']}/last"

        r = client.post(f"/admin/jobs/{job['id']}/resume", headers=ADMIN)
        assert r.status_code == 202 and r.headers["location"] == f"/admin/jobs/{job['id']}"
        running = wait_job(client, job["id"], lambda j: j["status"] == "running" and
                           (j["step"] or 0) > cancelled["step"])
        assert running["resumed_from_step"] == cancelled["step"]
    # The server stopped gracefully while the job ran: the trainer saved `last/` and the job is interrupted.
    with running_server(make_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        interrupted = get_job(client, job["id"])
        assert interrupted["status"] == "interrupted" and interrupted["error"] is None
        assert interrupted["step"] > cancelled["step"] and interrupted["pid"] is None
        assert client.post(f"/admin/jobs/{job['id']}/resume", headers=ADMIN).status_code == 202
        final = follow_events(client, job["id"])[-1][1]
        assert final["status"] == "succeeded" and final["step"] == 300 and final["attempts"] == 3
        assert interrupted["step"] <= final["resumed_from_step"] < 300


def test_a_server_with_the_admin_api_may_start_empty_and_load_a_model_later(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, None)
    make_tiny_checkpoint(tmp_path / "ckpt" / "first")
    with running_server(make_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/admin/model", headers=ADMIN).json()["checkpoint"] is None
        r = client.post("/admin/model", headers=ADMIN, json={"checkpoint": "first"})
        assert r.status_code == 200 and r.json()["checkpoint"] == "first"
        assert client.get("/readyz").status_code == 200
        assert generate(client)["model"] == "first"
