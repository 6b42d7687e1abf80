"""Admin API security over real HTTP: the auth matrix on every route, path traversal and symlink escapes,
upload size limits, and the API being off (403) without an admin token."""

from __future__ import annotations

import hmac
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from pocketgpt.app.auth import require_api_key
from pocketgpt.app.openapi import api_routes
from pocketgpt.app.routes.admin import require_admin, router
from pocketgpt.app.testing import running_server
from tests.admin_helpers import ADMIN, API_KEY, TOKEN, USER, make_app, make_settings, upload
from tests.conftest import make_tiny_checkpoint

# Every admin route with a request that passes auth; the right token must get past 401/403 on each.
ROUTES = [
    ("GET", "/admin/jobs", None, 200),
    ("POST", "/admin/jobs", {"json": {"data": "nope.txt", "preset": "tiny"}}, 422),
    ("GET", "/admin/jobs/job-000000000000", None, 404),
    ("GET", "/admin/jobs/job-000000000000/events", None, 404),
    ("GET", "/admin/jobs/job-000000000000/logs", None, 404),
    ("POST", "/admin/jobs/job-000000000000/cancel", None, 404),
    ("POST", "/admin/jobs/job-000000000000/resume", None, 404),
    ("POST", "/admin/datasets", {"files": {"file": ("a.txt", b"some text\n")}}, 201),
    ("GET", "/admin/datasets", None, 200),
    ("GET", "/admin/datasets/ds-000000000000", None, 404),
    ("GET", "/admin/checkpoints", None, 200),
    ("GET", "/admin/model", None, 200),
    ("POST", "/admin/model", {"json": {"checkpoint": "nothing/here"}}, 404),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("admin-sec")
    outside = make_tiny_checkpoint(root / "outside" / "ckpt")
    settings = make_settings(root, outside)
    with running_server(make_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, root


def _paths(routes) -> set[tuple[str, str]]:
    out = set()
    for route in routes:
        for method in route.methods:
            out.add((method, route.path))
    return out


def test_matrix_covers_every_admin_route() -> None:
    templated = {(m, p.replace("job-000000000000", "{job_id}").replace("ds-000000000000", "{dataset_id}"))
                 for m, p, _, _ in ROUTES}
    assert _paths(router.routes) == templated


@pytest.mark.parametrize(("method", "path", "kwargs", "ok_status"), ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_auth_matrix(server, method: str, path: str, kwargs, ok_status: int) -> None:
    client, _ = server
    kwargs = kwargs or {}
    for headers, code in [
        ({}, "missing_admin_token"),
        ({"Authorization": "Bearer not-the-token"}, "invalid_admin_token"),
        (USER, "invalid_admin_token"),  # an inference API key is not an admin token
        ({"Authorization": f"Basic {TOKEN}"}, "missing_admin_token"),
    ]:
        r = client.request(method, path, headers=headers, **kwargs)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == code and r.headers["www-authenticate"].startswith("Bearer")
    r = client.request(method, path, headers=ADMIN, **kwargs)
    assert r.status_code == ok_status, r.text
    # The admin token is not an inference key either.
    assert client.get("/v1/models", headers=ADMIN).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_admin_api_is_off_without_a_token(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, make_tiny_checkpoint(tmp_path / "ck"), admin_token=None)
    with running_server(make_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        for method, path, kwargs, _ in ROUTES:
            r = client.request(method, path, headers=ADMIN, **(kwargs or {}))
            assert r.status_code == 403, r.text
            assert "POCKETGPT_ADMIN_TOKEN" in r.json()["error"]["message"]
        assert client.get("/v1/models", headers=USER).status_code == 200
    assert not (tmp_path / "jobs.db").exists()  # no job store without the admin API


def test_path_traversal_and_symlink_escapes_are_refused(server) -> None:
    client, root = server
    data, ckpt = root / "data", root / "ckpt"
    (data / "sub").mkdir(parents=True, exist_ok=True)
    secret = root / "secret.txt"
    secret.write_text("top secret\n" * 100)
    os.symlink(secret, data / "escape.txt")
    os.symlink(root, data / "escape-dir")
    os.symlink(root / "outside" / "ckpt", ckpt / "escape-ckpt")
    shutil.copytree(root / "outside" / "ckpt", ckpt / "inside")

    for source in ["../secret.txt", "sub/../../secret.txt", str(secret), "/etc/passwd", "escape.txt",
                   "escape-dir/secret.txt", "*.txt", ["stdlib", "../secret.txt"]]:
        r = client.post("/admin/jobs", headers=ADMIN, json={"data": source, "preset": "tiny"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "data", (source, r.text)
    for name in ["../outside/ckpt", str(root / "outside" / "ckpt"), "escape-ckpt", "inside/../../outside/ckpt"]:
        r = client.post("/admin/jobs", headers=ADMIN, json={"data": "stdlib", "init_from": name})
        assert r.status_code == 422 and r.json()["error"]["param"] == "init_from", (name, r.text)
        r = client.post("/admin/model", headers=ADMIN, json={"checkpoint": name})
        assert r.status_code == 422 and r.json()["error"]["param"] == "checkpoint", (name, r.text)
    r = client.get("/admin/jobs/..%2F..%2Fetc%2Fpasswd/logs", headers=ADMIN)
    assert r.status_code == 404
    assert [c["name"] for c in client.get("/admin/checkpoints", headers=ADMIN).json()["data"]] == ["inside"]
    # A checkpoint inside the root is fine.
    assert client.post("/admin/model", headers=ADMIN, json={"checkpoint": "inside"}).status_code == 200
    # Uploaded file names never choose the stored path.
    ds = upload(client, b"text\n", filename="../../../evil.sh")
    assert ds["path"] == f"datasets/{ds['id']}.sh" and (data / ds["path"]).is_file()
    assert not (root / "evil.sh").exists()


def test_upload_size_limits(server) -> None:
    client, root = server
    before = sorted(p.name for p in (root / "data" / "datasets").glob("*")) if (root / "data").exists() else []
    # Over POCKETGPT_MAX_UPLOAD_BYTES (200 KB here): 413, nothing kept.
    r = client.post("/admin/datasets", headers=ADMIN, files={"file": ("big.txt", b"x" * 300_000)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"

    def chunked():  # no Content-Length: refused while streaming, at the limit
        body = b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.txt\"\r\n\r\n"
        yield body
        for _ in range(30):
            yield b"y" * 10_000
        yield b"\r\n--B--\r\n"

    r = client.post("/admin/datasets", headers={**ADMIN, "Content-Type": "multipart/form-data; boundary=B"},
                    content=chunked())
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    after = sorted(p.name for p in (root / "data" / "datasets").glob("*"))
    assert after == before  # no partial file left behind
    # Between the global body limit (20 KB here) and the upload limit: accepted.
    assert upload(client, b"z" * 50_000)["bytes"] == 50_000
    # The global limit still guards every other route.
    r = client.post("/v1/generate", headers=USER, json={"prompt": "x" * 30_000})
    assert r.status_code == 413


# -- every route: who may call it ------------------------------------------------------------------------------
def _guards(route) -> set:
    calls, stack = set(), [route.dependant]
    while stack:
        dep = stack.pop()
        calls.add(dep.call)
        stack.extend(dep.dependencies)
    return calls & {require_admin, require_api_key}


def test_every_route_is_guarded_or_read_only() -> None:
    """/admin/* needs the admin token, /v1/* and /info an API key; whatever is open only reads (GET)."""
    app = make_app(make_settings(Path("/nonexistent"), None))
    seen = set()
    for path, methods, route in api_routes(app):
        seen.add(path)
        guards = _guards(route)
        if path.startswith("/admin"):
            assert guards == {require_admin}, path
        elif path.startswith("/v1/") or path == "/info":
            assert guards == {require_api_key}, path
        else:
            assert not guards and methods <= {"GET", "HEAD"}, (path, methods)
    assert {"/v1/generate", "/admin/jobs", "/healthz"} <= seen


# Every inference route with a request that passes auth (the tiny model has no chat template: 400 there).
INFERENCE = [
    ("POST", "/v1/generate", {"json": {"prompt": "Hi", "max_new_tokens": 2}}, 200),
    ("POST", "/v1/completions", {"json": {"prompt": "Hi", "max_tokens": 2}}, 200),
    ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "Hi"}]}}, 400),
    ("POST", "/v1/tokenize", {"json": {"prompt": "Hi"}}, 200),
    ("POST", "/v1/detokenize", {"json": {"tokens": [1, 2]}}, 200),
    ("GET", "/v1/models", None, 200),
    ("GET", "/v1/models/{model_id}", None, 404),  # the literal "{model_id}" is no model's id
    ("GET", "/info", None, 200),
]


def test_inference_matrix_covers_every_inference_route() -> None:
    app = make_app(make_settings(Path("/nonexistent"), None))
    guarded = {(m, p) for p, methods, r in api_routes(app) if _guards(r) == {require_api_key} for m in methods}
    assert guarded == {(m, p) for m, p, _, _ in INFERENCE}


@pytest.mark.parametrize(("method", "path", "kwargs", "ok_status"), INFERENCE,
                         ids=[f"{m} {p}" for m, p, _, _ in INFERENCE])
def test_inference_auth_matrix(server, method: str, path: str, kwargs, ok_status: int) -> None:
    client, _ = server
    kwargs = kwargs or {}
    for headers, code in [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer"}, "missing_api_key"),
        ({"Authorization": f"Basic {API_KEY}"}, "missing_api_key"),
        ({"Authorization": f"Bearer {API_KEY[:-1]}"}, "invalid_api_key"),  # a prefix is not the key
        ({"Authorization": f"Bearer {API_KEY}x"}, "invalid_api_key"),
        (ADMIN, "invalid_api_key"),  # the admin token is not an inference key
    ]:
        r = client.request(method, path, headers=headers, **kwargs)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == code and r.headers["www-authenticate"].startswith("Bearer")
    r = client.request(method, path, headers=USER, **kwargs)
    assert r.status_code == ok_status, r.text


def test_tokens_are_compared_in_constant_time(server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both credentials go through hmac.compare_digest, and its answer alone decides."""
    client, _ = server
    real, calls = hmac.compare_digest, []

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert client.get("/admin/jobs", headers=ADMIN).status_code == 200
    assert (TOKEN.encode(), TOKEN.encode()) in calls
    calls.clear()
    assert client.get("/v1/models", headers=USER).status_code == 200
    assert (API_KEY.encode(), API_KEY.encode()) in calls
    # When compare_digest says no, the right credentials are refused; when it says yes, wrong ones pass: no other
    # comparison (an early-exit ==) takes part.
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: False)
    assert client.get("/admin/jobs", headers=ADMIN).status_code == 401
    assert client.get("/v1/models", headers=USER).status_code == 401
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: True)
    wrong = {"Authorization": "Bearer wrong"}
    assert client.get("/admin/jobs", headers=wrong).status_code == 200
    assert client.get("/v1/models", headers=wrong).status_code == 200


def test_odd_names_are_client_errors_never_server_errors(server) -> None:
    """Names the filesystem cannot take (too long, NUL, deep) are 4xx with a code, like any other bad name."""
    client, _ = server
    names = ["a" * 300, "a/" * 500, "x\x00y", "..\\..\\etc", "~root/.ssh", "%2e%2e/%2e%2e", "\udcff", "a" * 1024]
    headers = {**ADMIN, "Content-Type": "application/json"}
    for name in names:
        for path, body, param in [
            ("/admin/model", {"checkpoint": name}, "checkpoint"),
            ("/admin/jobs", {"data": name, "preset": "tiny"}, "data"),
            ("/admin/jobs", {"data": "stdlib", "init_from": name, "preset": "tiny"}, "init_from"),
        ]:
            # json.dumps escapes a lone surrogate as \\udcff, which the server decodes back into one
            r = client.post(path, headers=headers, content=json.dumps(body))
            assert 400 <= r.status_code < 500 and r.json()["error"]["param"].split(".")[0] == param, (name, r.text)


def test_static_files_stay_in_their_folder(server) -> None:
    client, _ = server
    for path in ["/static/..%2f..%2fsettings.py", "/static/%2e%2e/%2e%2e/pyproject.toml", "/static/..%2fmain.py",
                 "/static/%2fetc%2fpasswd", "/static/....//....//pyproject.toml"]:
        r = client.get(path)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
        assert "pydantic" not in r.text and "root:" not in r.text and "[project]" not in r.text
