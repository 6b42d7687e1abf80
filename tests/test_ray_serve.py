"""`pocketgpt serve --ray --replicas 2` on a local Ray instance, over real HTTP through Ray Serve's proxy.

Marked `ray` (excluded by default: it needs the [ray] extra and starts Ray): `pytest -m ray tests/test_ray_serve.py`.
One deployment serves the whole module, so the tests run in file order: streams, swap, then a replica killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_tiny_checkpoint
from tests.serverproc import ROOT, base_env, free_port

# Imported in the fixtures: the default run (`-m "not ray"`) collects this module without Ray installed.
NEEDS_RAY = "needs the ray extra: pip install 'pocketgpt[ray]'"
# Generous: on a loaded 2-core machine Ray takes minutes to start; every wait below is on a real condition.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

ADMIN = "ray-test-admin"
STREAM = {"prompt": "hi", "max_new_tokens": 400, "stream": True}


@dataclass
class Cluster:
    base: str
    ckpts: Path
    proc: subprocess.Popen
    log: Path

    def replicas_seen(self, want: int = 2, tries: int = 60) -> dict[str, dict]:
        """GET /info until `want` different replicas answered: replica id -> its /info."""
        seen: dict[str, dict] = {}
        for _ in range(tries):
            r = httpx.get(f"{self.base}/info", timeout=120)
            assert r.status_code == 200, r.text
            assert r.headers["x-pocketgpt-replica"] == r.json()["replica"]["id"]
            seen[r.json()["replica"]["id"]] = r.json()
            if len(seen) >= want:
                break
        return seen


@dataclass
class StreamResult:
    replica: str | None = None
    events: list[str] = field(default_factory=list)
    data: list[dict] = field(default_factory=list)  # each event's JSON data, in order
    error: str | None = None


def _stream(base: str, out: StreamResult, body: dict = STREAM) -> None:
    try:
        with httpx.stream("POST", f"{base}/v1/generate", json=body, timeout=120) as r:
            out.replica = r.headers.get("x-pocketgpt-replica")
            for line in r.iter_lines():
                if line.startswith("event:"):
                    out.events.append(line.removeprefix("event:").strip())
                elif line.startswith("data:"):
                    out.data.append(json.loads(line.removeprefix("data:")))
    except httpx.HTTPError as exc:
        out.error = repr(exc)


def _start_streams(base: str, n: int, body: dict = STREAM) -> tuple[list[StreamResult], list[threading.Thread]]:
    results = [StreamResult() for _ in range(n)]
    threads = [threading.Thread(target=_stream, args=(base, res, body), daemon=True) for res in results]
    for t in threads:
        t.start()
    return results, threads


def _wait_first_events(results: list[StreamResult], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not all(r.events or r.error for r in results):
        assert time.monotonic() < deadline, "streams did not start"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    pytest.importorskip("ray.serve", reason=NEEDS_RAY)
    root = tmp_path_factory.mktemp("ray")
    ckpts = root / "checkpoints"
    # A long context so streams last long enough to be cut mid-way; two seeds so a swap is visible.
    make_tiny_checkpoint(ckpts / "first", block_size=1024, seed=0)
    make_tiny_checkpoint(ckpts / "second", block_size=1024, seed=1)
    port = free_port()
    log = root / "serve.log"
    env = base_env(PYTHONPATH=str(ROOT), POCKETGPT_ADMIN_TOKEN=ADMIN, POCKETGPT_CHECKPOINT_DIR=str(ckpts),
                   POCKETGPT_DB=str(root / "jobs.db"), POCKETGPT_DATA_DIR=str(root / "data"))
    with open(log, "wb") as fh:
        # Its own session: the test stops it with one signal, and clears up the whole group if it must.
        proc = subprocess.Popen(
            [sys.executable, "-m", "pocketgpt.app.cli", "serve", "--ray", "--replicas", "2", "--replica-cpus", "0.5",
             "--checkpoint", str(ckpts / "first"), "--port", str(port), "--max-running", "8", "--max-queue", "64"],
            env=env, cwd=root, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 960  # serve --ray itself gives up after 900 s, saying why
    while "through Ray Serve at" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve --ray did not start:\n{log.read_text(errors='replace')[-6000:]}")
        time.sleep(0.5)
    try:
        yield Cluster(f"http://127.0.0.1:{port}", ckpts, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_two_replicas_share_32_concurrent_streams(cluster: Cluster) -> None:
    results, threads = _start_streams(cluster.base, 32, {**STREAM, "max_new_tokens": 40})
    for t in threads:
        t.join(300)
    assert all(r.error is None and r.events[-1] == "done" for r in results), [r.error for r in results]
    assert all("token" in r.events for r in results)
    served_by = {r.replica for r in results}
    assert len(served_by) == 2, served_by  # Serve's proxy balanced them over both replicas
    assert set(cluster.replicas_seen()) == served_by  # /info names the same replicas as the header


def test_swap_reaches_every_replica_and_in_flight_streams_finish(cluster: Cluster) -> None:
    before = cluster.replicas_seen()
    assert {info["checkpoint"] for info in before.values()} == {str(cluster.ckpts / "first")}
    results, threads = _start_streams(cluster.base, 6)
    _wait_first_events(results)  # in flight when the swap comes
    r = httpx.post(f"{cluster.base}/admin/model", json={"checkpoint": "second"},
                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
    assert r.status_code == 200, r.text
    # Answered only once every replica serves it: no retrying here.
    after = cluster.replicas_seen()
    assert set(after) == set(before)  # reconfigured in place, not replaced
    assert {info["checkpoint"] for info in after.values()} == {str(cluster.ckpts / "second")}
    for t in threads:
        t.join(300)
    assert all(res.error is None and res.events[-1] == "done" for res in results), [res.error for res in results]
    assert all("token" in res.events for res in results)


def test_bad_checkpoint_swap_is_refused_and_changes_nothing(cluster: Cluster) -> None:
    (cluster.ckpts / "broken").mkdir(exist_ok=True)
    (cluster.ckpts / "broken" / "config.json").write_text("{not json")
    r = httpx.post(f"{cluster.base}/admin/model", json={"checkpoint": "broken"},
                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "checkpoint_load_failed"
    infos = cluster.replicas_seen()
    assert {info["checkpoint"] for info in infos.values()} == {str(cluster.ckpts / "second")}


def test_job_submission_on_a_replica_answers_501(cluster: Cluster) -> None:
    r = httpx.post(f"{cluster.base}/admin/jobs", json={"data": ["x"]}, headers={"Authorization": f"Bearer {ADMIN}"},
                   timeout=120)
    assert r.status_code == 501 and r.json()["error"]["code"] == "jobs_not_available"
    assert r.headers["x-pocketgpt-replica"]


def test_an_admin_server_outside_ray_swaps_every_replica(cluster: Cluster, tmp_path: Path) -> None:
    """The control plane: a single-process admin server (where training jobs run) with POCKETGPT_RAY_SERVE_ADDRESS
    sends its model swaps (and serve_when_done) to the deployment's replicas."""
    make_tiny_checkpoint(cluster.ckpts / "third", block_size=1024, seed=2)
    gcs = re.search(r"Ray cluster (\S+?)\)", cluster.log.read_text()).group(1)
    port = free_port()
    env = base_env(PYTHONPATH=str(ROOT), POCKETGPT_ADMIN_TOKEN=ADMIN, POCKETGPT_CHECKPOINT_DIR=str(cluster.ckpts),
                   POCKETGPT_DB=str(tmp_path / "jobs.db"), POCKETGPT_DATA_DIR=str(tmp_path / "data"),
                   POCKETGPT_RAY_SERVE_ADDRESS=gcs, RAY_AUTH_MODE="token")
    with open(tmp_path / "admin.log", "wb") as fh:
        admin = subprocess.Popen([sys.executable, "-m", "pocketgpt.app.cli", "serve", "--port", str(port)], env=env,
                                 cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert admin.poll() is None and time.monotonic() < deadline, (tmp_path / "admin.log").read_text()
            time.sleep(0.3)
        auth = {"Authorization": f"Bearer {ADMIN}"}
        bad = httpx.post(f"{base}/admin/model", json={"checkpoint": "broken"}, headers=auth, timeout=300)
        assert bad.status_code == 422, bad.text  # checked here: never sent to the replicas
        r = httpx.post(f"{base}/admin/model", json={"checkpoint": "third"}, headers=auth, timeout=300)
        assert r.status_code == 200, r.text + (tmp_path / "admin.log").read_text()[-3000:]
    finally:
        admin.terminate()
        admin.wait(60)
    infos = cluster.replicas_seen()
    assert {info["checkpoint"] for info in infos.values()} == {str(cluster.ckpts / "third")}


def test_killed_replica_ends_only_its_streams_and_its_successor_serves_the_current_model(cluster: Cluster) -> None:
    replicas = cluster.replicas_seen()
    (current,) = {info["checkpoint"] for info in replicas.values()}
    assert current != str(cluster.ckpts / "first")  # swapped since start-up, so a restart must not go back
    victim_id = sorted(replicas)[0]
    results, threads = _start_streams(cluster.base, 16, {**STREAM, "max_new_tokens": 1000})
    _wait_first_events(results)  # every stream has its first token: each is in flight on a known replica
    assert {r.replica for r in results} == set(replicas), "both replicas should hold some streams"
    os.kill(replicas[victim_id]["replica"]["pid"], signal.SIGKILL)
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a stream hung after its replica died"
    assert all(r.error is None for r in results), [r.error for r in results]  # no connection was cut
    on_victim = [r for r in results if r.replica == victim_id]
    # A stream the replica had finished before it died may still be on its way (the router relays what the
    # replica sent); every other one ends with an `error` event in the /v1/generate shape, and no `done`.
    assert all(r.events[-1] in ("done", "error") for r in on_victim), [r.events[-3:] for r in on_victim]
    cut = [r for r in on_victim if r.events[-1] == "error"]
    assert cut, "no stream was in flight on the killed replica"
    for r in cut:
        assert "done" not in r.events and r.data[-1]["error"]["code"] == "replica_unavailable", r.data[-1]
    for r in results:
        if r.replica != victim_id:
            assert r.events[-1] == "done", r.events[-3:]
    # Requests routed afterwards succeed (the survivor takes them while Ray restarts the dead one).
    for _ in range(4):
        ok = httpx.post(f"{cluster.base}/v1/generate", json={"prompt": "hi", "max_new_tokens": 4}, timeout=120)
        assert ok.status_code == 200, ok.text
    # Ray Serve replaces the replica; the new one loads the current model (the swapped-to one), not the first.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        seen = cluster.replicas_seen(tries=10)
        if len(seen) == 2 and victim_id not in seen:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the killed replica was not replaced: {sorted(seen)}")
    assert {info["checkpoint"] for info in seen.values()} == {current}


def test_kuberay_manifest_holds_a_valid_serve_config_for_this_app() -> None:
    import yaml

    schema = pytest.importorskip("ray.serve.schema", reason=NEEDS_RAY)
    ServeDeploySchema = schema.ServeDeploySchema

    manifest = yaml.safe_load((ROOT / "docker" / "kuberay-rayservice.yaml").read_text())
    config = ServeDeploySchema(**yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "pocketgpt.app.ray_serve:app"
    deployment, router = app.deployments
    assert deployment.name == "PocketGPT" and deployment.user_config["checkpoint"]
    assert router.name == "PocketGPTRouter"  # the ingress that ends a dead replica's streams cleanly
