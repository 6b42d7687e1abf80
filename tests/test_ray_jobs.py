"""Admin-API training jobs run as Ray jobs (POCKETGPT_RAY_JOBS_ADDRESS): the real trainer, a local Ray instance.

Marked `ray` (excluded by default): `pytest -m ray tests/test_ray_jobs.py`. The Ray instance runs with its
dashboard (Ray's job API lives there) in a child process; the admin server runs in-process as in
tests/test_admin_http.py, its checkpoint root on the local disk both sides see.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from pocketgpt.app.testing import running_server
from pocketgpt.model.checkpoint import load_checkpoint, load_train_state
from pocketgpt.training.metrics import read_metrics
from tests.admin_helpers import (
    ADMIN,
    TOKEN,
    corpus_bytes,
    follow_events,
    generate,
    make_app,
    make_settings,
    start_job,
    upload,
    wait_job,
)
from tests.conftest import make_tiny_checkpoint
from tests.serverproc import ROOT, base_env, free_port
from tests.test_training_data import write_corpus

# Imported in the fixtures: the default run (`-m "not ray"`) collects this module without Ray installed.
NEEDS_RAY = "needs the ray extra: pip install 'pocketgpt[ray]'"
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

_CLUSTER = textwrap.dedent("""
    import sys, ray
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=int(sys.argv[1]))
    print("ready", ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    ray.shutdown()
""")


def _ray_jobs(address: str, call: str) -> subprocess.CompletedProcess[str]:
    """`JobSubmissionClient(address).<call>` in a fresh process: Ray reads RAY_AUTH_MODE once per process, and
    this one may have imported ray before the fixture set it."""
    code = f"from ray.job_submission import JobSubmissionClient as C; print(C({address!r}).{call})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=base_env(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="token"))


@dataclass
class Cluster:
    jobs: str  # the job API (dashboard) URL
    gcs: str  # what `ray.init(address=...)` and `serve --ray ADDRESS` take


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    pytest.importorskip("ray.job_submission", reason=NEEDS_RAY)
    # Ray 2.60 starts local instances with token auth; its clients (this test, the admin server's stand-ins, which
    # inherit this environment) send the token from ~/.ray/auth_token once told to.
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "token")
    port = free_port()
    log = tmp_path_factory.mktemp("raycluster") / "cluster.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", _CLUSTER, str(port)], stdin=subprocess.PIPE, stdout=fh,
                                stderr=subprocess.STDOUT, env=base_env(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="token"),
                                cwd=ROOT)
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 150
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no Ray job API at {address}:\n{log.read_text(errors='replace')[-4000:]}")
        if "ready" in log.read_text() and _ray_jobs(address, "get_version()").returncode == 0:
            break
        time.sleep(0.5)
    try:
        yield Cluster(address, log.read_text().split("ready ", 1)[1].split()[0])
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        mp.undo()


def test_job_runs_on_ray_and_its_checkpoint_is_served(tmp_path: Path, cluster: Cluster) -> None:
    settings = make_settings(tmp_path, make_tiny_checkpoint(tmp_path / "ckpt" / "base"), ray_jobs_address=cluster.jobs)
    with running_server(make_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        ds = upload(client, corpus_bytes())
        job = start_job(client, data=ds["id"], max_steps=10, serve_when_done=True)
        events = follow_events(client, job["id"], timeout=300)
        assert [d["step"] for k, d in events if k == "train"] == list(range(1, 11))
        final = events[-1][1]
        assert final["status"] == "succeeded" and final["exit_code"] == 0, final
        served = wait_job(client, job["id"], lambda j: j["served_checkpoint"] or j["serve_error"], timeout=60)
        assert served["served_checkpoint"] == f"{job['id']}/best", served
        assert generate(client)["model"] == f"{job['id']}/best"
        log = client.get(f"/admin/jobs/{job['id']}/logs?tail=1000", headers=ADMIN).text
        assert "submitted Ray job" in log and "SUCCEEDED" in log
    listed = _ray_jobs(cluster.jobs, "list_jobs()")
    assert f"--out {tmp_path / 'ckpt' / job['id']}" in listed.stdout, listed.stdout + listed.stderr


def test_cancel_stops_the_ray_job_after_it_saves_and_resume_continues(tmp_path: Path, cluster: Cluster) -> None:
    settings = make_settings(tmp_path, make_tiny_checkpoint(tmp_path / "ckpt" / "base"), ray_jobs_address=cluster.jobs)
    with running_server(make_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        ds = upload(client, corpus_bytes())
        job = start_job(client, data=ds["id"], max_steps=300)
        wait_job(client, job["id"], lambda j: (j["step"] or 0) >= 2, timeout=300)
        assert client.post(f"/admin/jobs/{job['id']}/cancel", headers=ADMIN).status_code == 200
        cancelled = wait_job(client, job["id"], lambda j: j["status"] != "running", timeout=120)
        assert cancelled["status"] == "cancelled" and cancelled["exit_code"] == 143, cancelled
        assert cancelled["checkpoints"]["last"] == f"{job['id']}/last"  # the trainer saved on Ray's SIGTERM
        assert client.post(f"/admin/jobs/{job['id']}/resume", headers=ADMIN).status_code == 202
        running = wait_job(client, job["id"], lambda j: j["status"] == "running" and
                           (j["step"] or 0) > cancelled["step"], timeout=300)
        assert running["resumed_from_step"] == cancelled["step"]
        client.post(f"/admin/jobs/{job['id']}/cancel", headers=ADMIN)
        wait_job(client, job["id"], lambda j: j["status"] != "running", timeout=120)


def _wait_for(check, what: str, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}:\n{log.read_text(errors='replace')[-4000:]}"
        time.sleep(0.5)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_job_trained_on_ray_is_served_by_the_ray_serve_replicas(tmp_path: Path, cluster: Cluster) -> None:
    """The whole path: `serve --ray ADDRESS` joins the cluster; one admin server runs the job as a Ray job and,
    with serve_when_done, swaps the Serve replicas to its checkpoint."""
    ckpts = tmp_path / "ckpt"
    base = make_tiny_checkpoint(ckpts / "base")
    env = base_env(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="token")
    serve_port, admin_port = free_port(), free_port()
    serve_log, admin_log = tmp_path / "serve.log", tmp_path / "admin.log"
    with open(serve_log, "wb") as fh:
        replicas = subprocess.Popen(
            [sys.executable, "-m", "pocketgpt.app.cli", "serve", "--ray", cluster.gcs, "--replicas", "1",
             "--replica-cpus", "0.5", "--checkpoint", str(base), "--port", str(serve_port)],
            env=env, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    admin = None
    try:
        _wait_for(lambda: "through Ray Serve at" in serve_log.read_text(errors="replace"), "serve --ray", serve_log)
        with open(admin_log, "wb") as fh:
            admin = subprocess.Popen(
                [sys.executable, "-m", "pocketgpt.app.cli", "serve", "--port", str(admin_port), "--device", "cpu"],
                env={**env, "POCKETGPT_ADMIN_TOKEN": TOKEN, "POCKETGPT_CHECKPOINT_DIR": str(ckpts),
                     "POCKETGPT_DATA_DIR": str(tmp_path / "data"), "POCKETGPT_DB": str(tmp_path / "jobs.db"),
                     "POCKETGPT_RAY_JOBS_ADDRESS": cluster.jobs, "POCKETGPT_RAY_SERVE_ADDRESS": cluster.gcs},
                cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT)
        _wait_for(lambda: _answers(f"http://127.0.0.1:{admin_port}/healthz"), "admin server", admin_log)
        with httpx.Client(base_url=f"http://127.0.0.1:{admin_port}", timeout=30) as client:
            job = start_job(client, data=upload(client, corpus_bytes())["id"], max_steps=10, serve_when_done=True)
            assert follow_events(client, job["id"], timeout=300)[-1][1]["status"] == "succeeded"
            done = wait_job(client, job["id"], lambda j: j["served_checkpoint"] or j["serve_error"], timeout=300)
            assert done["served_checkpoint"] == f"{job['id']}/best", done
        info = httpx.get(f"http://127.0.0.1:{serve_port}/info", timeout=30)
        assert info.json()["checkpoint"] == str(ckpts / job["id"] / "best") and info.headers["x-pocketgpt-replica"]
    finally:
        if admin is not None:
            admin.terminate()
            admin.wait(60)
        replicas.send_signal(signal.SIGTERM)
        try:
            replicas.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(replicas.pid, signal.SIGKILL)


# -- DDP under Ray Train (POCKETGPT_RAY_TRAIN_WORKERS, training/ray_train.py); the cluster has 2 CPUs: a worker each

TINY = ["--preset", "tiny", "--block-size", "32", "--batch-size", "8", "--tokenizer-vocab", "300", "--device", "cpu"]


def test_ray_train_two_workers_match_one_process(tmp_path: Path, cluster: Cluster) -> None:
    """2 Ray Train workers (gloo) follow the 1-process run as torchrun's 2 processes do (tests/test_training_cli.py):
    losses and weights equal up to the all-reduce's summation order; only rank 0 wrote."""
    corpus = write_corpus(tmp_path / "corpus.txt", 3000)
    args = ["--data", str(corpus), *TINY, "--max-steps", "12", "--log-every", "1", "--eval-every", "6",
            "--warmup-steps", "2", "--data-dir", str(tmp_path / "prepared"), "--dist-timeout", "120"]
    env = base_env(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="token", OMP_NUM_THREADS="1")
    one_cmd = [sys.executable, "-m", "pocketgpt.training", "train", *args, "--out", str(tmp_path / "one")]
    single = subprocess.run(one_cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "pocketgpt.training.ray_train", "--workers", "2", "--",
                          *args, "--out", str(tmp_path / "two")], cwd=ROOT, env={**env, "RAY_ADDRESS": cluster.gcs},
                         capture_output=True, text=True, timeout=400)
    assert ddp.returncode == 0, ddp.stdout[-4000:] + ddp.stderr[-4000:]
    assert "Ray Train, 2 workers (CPU)" in ddp.stdout and "exit codes by rank {" in ddp.stdout

    one, two = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    assert [r["type"] for r in two] == [r["type"] for r in one] and [r["type"] for r in two].count("start") == 1
    losses = [(a["loss"], b["loss"]) for a, b in zip(one, two, strict=True) if a["type"] == "train"]
    assert len(losses) == 12 and max(abs(a - b) for a, b in losses) < 1e-4
    a, b = load_checkpoint(tmp_path / "one" / "last"), load_checkpoint(tmp_path / "two" / "last")
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-4), name
    assert load_train_state(tmp_path / "two" / "last")["world_size"] == 2


def test_admin_job_under_ray_train_finishes_is_served_and_cancels_with_a_save(tmp_path: Path, cluster: Cluster) -> None:
    """With ray_train_workers=2 the admin job runs as 2 DDP workers: events, serve_when_done and a loadable
    checkpoint as before; a second job cancelled mid-run reaches every worker, rank 0 saves last/, exit 143."""
    ckpts = tmp_path / "ckpt"
    settings = make_settings(tmp_path, make_tiny_checkpoint(ckpts / "base"), ray_jobs_address=cluster.jobs,
                             ray_train_workers=2)
    with running_server(make_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        ds = upload(client, corpus_bytes())
        job = start_job(client, data=ds["id"], max_steps=10, serve_when_done=True)
        events = follow_events(client, job["id"], timeout=400)
        assert [d["step"] for k, d in events if k == "train"] == list(range(1, 11))
        assert events[-1][1]["status"] == "succeeded" and events[-1][1]["exit_code"] == 0, events[-1]
        served = wait_job(client, job["id"], lambda j: j["served_checkpoint"] or j["serve_error"], timeout=60)
        assert served["served_checkpoint"] == f"{job['id']}/best", served
        log = client.get(f"/admin/jobs/{job['id']}/logs?tail=2000", headers=ADMIN).text
        assert "Ray Train, 2 workers" in log and "SUCCEEDED" in log

        second = start_job(client, data=ds["id"], max_steps=500)
        wait_job(client, second["id"], lambda j: (j["step"] or 0) >= 2, timeout=400)
        assert client.post(f"/admin/jobs/{second['id']}/cancel", headers=ADMIN).status_code == 200
        cancelled = wait_job(client, second["id"], lambda j: j["status"] != "running", timeout=120)
        assert cancelled["status"] == "cancelled" and cancelled["exit_code"] == 143, cancelled
        assert cancelled["checkpoints"]["last"] == f"{second['id']}/last"
    assert load_checkpoint(ckpts / job["id"] / "best").model is not None
    assert load_train_state(ckpts / job["id"] / "last")["world_size"] == 2
    assert load_train_state(ckpts / second["id"] / "last")["world_size"] == 2
