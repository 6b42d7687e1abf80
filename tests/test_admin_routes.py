"""The admin router in-process, on a bare FastAPI app with the fake trainer and a fake engine holder."""

from __future__ import annotations

import json
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pocketgpt.app.errors import install_error_handlers
from pocketgpt.app.jobs.manager import JobManager
from pocketgpt.app.jobs.store import JobStore
from pocketgpt.app.routes.admin import router
from pocketgpt.app.shutdown import Drain
from tests.sse import read_events

FAKE = str(Path(__file__).with_name("fake_trainer.py"))
TOKEN = "admin-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeHolder:
    def __init__(self) -> None:
        self.current = None

    async def swap(self, path: Path) -> None:
        if not (path / "meta.json").is_file():
            raise ValueError(f"missing {path / 'meta.json'}")
        self.current = SimpleNamespace(path=path)


def build_app(tmp_path: Path, token: str | None = TOKEN, limit: int = 10_000) -> FastAPI:
    settings = SimpleNamespace(admin_token=token, data_dir=tmp_path / "data", checkpoint_dir=tmp_path / "ckpt",
                               max_upload_bytes=limit, sse_ping=15)
    holder = FakeHolder()
    manager = JobManager(JobStore(tmp_path / "jobs.db"), settings.checkpoint_dir,
                         trainer_cmd=[sys.executable, FAKE, "train"], poll_interval_s=0.05, cancel_grace_s=5,
                         on_serve=holder.swap)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await manager.start()
        yield
        await manager.shutdown()

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)
    app.state.settings, app.state.job_manager, app.state.holder = settings, manager, holder
    app.state.drain = Drain(grace=0)
    app.include_router(router)
    return app


def events(client: TestClient, job_id: str, last_id: int | None = None) -> list[tuple[str, dict]]:
    headers = AUTH if last_id is None else {**AUTH, "Last-Event-ID": str(last_id)}
    with client.stream("GET", f"/admin/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200
        return [(event, json.loads(data)) for event, data in read_events(r)]


def test_story_upload_train_follow_list_serve(tmp_path: Path) -> None:
    with TestClient(build_app(tmp_path)) as c:
        r = c.post("/admin/datasets", headers=AUTH, files={"file": ("poems.txt", b"a poem\nanother\n")})
        assert r.status_code == 201, r.text
        ds = r.json()
        assert (ds["bytes"], ds["lines"], ds["filename"]) == (15, 2, "poems.txt")
        assert [d["id"] for d in c.get("/admin/datasets", headers=AUTH).json()["data"]] == [ds["id"]]
        assert c.get(f"/admin/datasets/{ds['id']}", headers=AUTH).json()["sha256"] == ds["sha256"]

        body = {"data": ds["id"], "preset": "tiny", "max_steps": 6, "eval_every": 3, "serve_when_done": True}
        r = c.post("/admin/jobs", headers=AUTH, json=body)
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/admin/jobs/{job['id']}" == job["url"]
        seen = events(c, job["id"])
        kinds = [k for k, _ in seen]
        assert kinds[0] == "start" and kinds[-1] == "status" and "eval" in kinds and "checkpoint" in kinds
        final = seen[-1][1]
        assert final["status"] == "succeeded" and final["step"] == 6
        # A late subscriber gets the same history.
        assert [k for k, _ in events(c, job["id"])] == kinds
        # A reconnecting client skips what it already has (ids are record line numbers).
        assert [k for k, _ in events(c, job["id"], last_id=3)] == kinds[3:]

        names = [ck["name"] for ck in c.get("/admin/checkpoints", headers=AUTH).json()["data"]]
        assert f"{job['id']}/best" in names and f"{job['id']}/last" in names
        assert "fake trainer" in c.get(f"/admin/jobs/{job['id']}/logs?tail=5", headers=AUTH).text
        r = c.post("/admin/model", headers=AUTH, json={"checkpoint": f"{job['id']}/last"})
        assert r.status_code == 200 and r.json()["checkpoint"] == f"{job['id']}/last"
        listed = {ck["name"]: ck["serving"] for ck in c.get("/admin/checkpoints", headers=AUTH).json()["data"]}
        assert listed[f"{job['id']}/last"] is True and listed[f"{job['id']}/best"] is False
        assert c.post("/admin/model", headers=AUTH, json={"checkpoint": job["id"]}).json()["checkpoint"] == \
            f"{job['id']}/best"
        assert c.get(f"/admin/jobs/{job['id']}", headers=AUTH).json()["served_checkpoint"] == f"{job['id']}/best"


def test_validation_and_conflicts(tmp_path: Path) -> None:
    with TestClient(build_app(tmp_path)) as c:
        def post(body):
            return c.post("/admin/jobs", headers=AUTH, json=body)

        cases = [
            ({"data": "stdlib", "preset": "huge"}, "preset"),
            ({"data": "stdlib", "max_steps": 0}, "max_steps"),
            ({"data": "stdlib", "bogus": 1}, "bogus"),
            ({"data": "stdlib", "model": {"n_embd": 100, "n_head": 3}}, "model"),
            ({"data": "stdlib", "lr": 0.001, "min_lr": 0.01}, "min_lr"),
            ({"data": "../etc/passwd"}, "data"),
            ({"data": "/etc/passwd"}, "data"),
            ({"data": []}, "data"),
            ({"data": "stdlib", "init_from": "../x"}, "init_from"),
            ({"data": "stdlib", "init_from": "nope"}, "init_from"),
        ]
        for body, param in cases:
            r = post(body)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["error"]["param"] == param, (body, r.json())
        job = post({"data": "stdlib", "max_steps": 100000}).json()
        assert c.post(f"/admin/jobs/{job['id']}/resume", headers=AUTH).status_code == 409
        assert c.post(f"/admin/jobs/{job['id']}/cancel", headers=AUTH).status_code == 200
        assert c.get("/admin/jobs/job-nope", headers=AUTH).status_code == 404
        assert c.post("/admin/model", headers=AUTH, json={"checkpoint": "../../etc"}).status_code == 422
        assert c.post("/admin/model", headers=AUTH, json={"checkpoint": "nothing/here"}).status_code == 404


@pytest.mark.parametrize("token", [None, ""])
def test_admin_disabled_without_token(tmp_path: Path, token) -> None:
    with TestClient(build_app(tmp_path, token=token)) as c:
        r = c.get("/admin/jobs", headers=AUTH)
        assert r.status_code == 403 and "POCKETGPT_ADMIN_TOKEN" in r.json()["error"]["message"]


def test_auth_missing_and_wrong(tmp_path: Path) -> None:
    with TestClient(build_app(tmp_path)) as c:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}]:
            r = c.post("/admin/jobs", headers=headers, json={"bad": "body"})
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["error"]["type"] == "authentication_error"


def test_upload_limits(tmp_path: Path) -> None:
    with TestClient(build_app(tmp_path, limit=1000)) as c:
        r = c.post("/admin/datasets", headers=AUTH, files={"file": ("big.txt", b"x" * 5000)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
        r = c.post("/admin/datasets", headers=AUTH, files={"other": ("a.txt", b"abc")})
        assert r.status_code == 422 and r.json()["error"]["param"] == "file"
        r = c.post("/admin/datasets", headers=AUTH, json={"file": "abc"})
        assert r.status_code == 400
        assert c.get("/admin/datasets", headers=AUTH).json()["data"] == []
