"""Crash safety, through the admin API and its JobManager with the real trainer (tests/fault_trainer.py injects
the faults into its checkpoint writes):

- kill -9 of the trainer in the middle of writing a checkpoint: the job ends `failed` (not stuck `running`), the
  previous checkpoint still loads, and the half-written one cannot be hot-loaded;
- a full disk while saving (ENOSPC injected into the write, and for real on a tiny tmpfs when one can be mounted):
  the job fails with an error that says so, nothing half-written is left, the server stays healthy;
- corrupted checkpoints given to hot-load are refused (422) and the old model keeps serving, without one request
  of the traffic running meanwhile failing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import pocketgpt.app.jobs.manager as manager_module
from pocketgpt.app.testing import running_server
from pocketgpt.model.checkpoint import load_checkpoint
from tests.admin_helpers import (
    ADMIN,
    USER,
    corpus_bytes,
    generate,
    make_app,
    make_settings,
    start_job,
    upload,
    wait_job,
)
from tests.conftest import make_tiny_checkpoint

FAULT_TRAINER = [sys.executable, str(Path(__file__).with_name("fault_trainer.py")), "train"]
TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("crash")
    served = make_tiny_checkpoint(root / "ckpt" / "served")
    settings = make_settings(root, served, cancel_grace_s=5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manager_module, "DEFAULT_TRAINER_CMD", FAULT_TRAINER)
        with running_server(make_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
            client.dataset = upload(client, corpus_bytes())["id"]  # type: ignore[attr-defined]
            yield client, root


def _healthy(client: httpx.Client) -> None:
    assert client.get("/readyz").status_code == 200
    assert generate(client)["usage"]["completion_tokens"] >= 1


def test_kill_9_during_a_checkpoint_write(server, monkeypatch: pytest.MonkeyPatch) -> None:
    client, root = server
    monkeypatch.setenv("POCKETGPT_FAULT", "stall:last:2")  # the second save of `last/` (step 10) stalls half-way
    job = start_job(client, data=client.dataset, max_steps=15)
    run_dir = root / "ckpt" / job["id"]
    deadline = time.monotonic() + 120
    while not (run_dir / "fault-reached").exists():
        assert time.monotonic() < deadline, wait_job(client, job["id"], lambda j: True)
        assert client.get(f"/admin/jobs/{job['id']}", headers=ADMIN).json()["status"] in ("queued", "running")
        time.sleep(0.1)
    pid = client.get(f"/admin/jobs/{job['id']}", headers=ADMIN).json()["pid"]
    os.kill(pid, signal.SIGKILL)  # what the OOM killer or a power cut does: no handler runs

    final = wait_job(client, job["id"], lambda j: j["status"] in TERMINAL, timeout=30)
    assert final["status"] in ("failed", "interrupted") and final["pid"] is None
    assert "SIGKILL" in final["error"]
    # The previous `last/` is whole and loads; the staging dir holds the half-written weights.
    previous = load_checkpoint(run_dir / "last")
    assert previous.meta["step"] == 5 and final["checkpoints"]["last"] == f"{job['id']}/last"
    staging = [p for p in run_dir.iterdir() if p.name.startswith(".last.tmp-")]
    assert len(staging) == 1 and not (staging[0] / "config.json").exists()
    # The half-written one cannot be served; the job's own checkpoint can.
    r = client.post("/admin/model", headers=ADMIN, json={"checkpoint": f"{job['id']}/{staging[0].name}"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "checkpoint"
    r = client.post("/admin/model", headers=ADMIN, json={"checkpoint": f"{job['id']}/last"})
    assert r.status_code == 200, r.text
    assert generate(client)["model"] == f"{job['id']}/last"
    r = client.post("/admin/model", headers=ADMIN, json={"checkpoint": "served"})
    assert r.status_code == 200, r.text
    _healthy(client)
    # The failed job saved a checkpoint, so it can be resumed; the next save sweeps the dead staging dir.
    monkeypatch.delenv("POCKETGPT_FAULT")
    assert client.post(f"/admin/jobs/{job['id']}/resume", headers=ADMIN).status_code == 202
    done = wait_job(client, job["id"], lambda j: j["status"] in TERMINAL, timeout=120)
    assert done["status"] == "succeeded" and done["step"] == 15, done
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".last.tmp-")]


def test_full_disk_while_saving_fails_the_job_clearly(server, monkeypatch: pytest.MonkeyPatch) -> None:
    client, root = server
    monkeypatch.setenv("POCKETGPT_FAULT", "enospc:last:2")
    job = start_job(client, data=client.dataset, max_steps=15)
    final = wait_job(client, job["id"], lambda j: j["status"] in TERMINAL, timeout=120)
    assert final["status"] == "failed", final
    assert "No space left on device" in final["error"] and final["exit_code"] == 1
    run_dir = root / "ckpt" / job["id"]
    assert load_checkpoint(run_dir / "last").meta["step"] == 5  # the previous save is intact
    assert not [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]  # the failed save cleaned up after itself
    _healthy(client)


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 2 MiB tmpfs (needs root and mount rights; skipped where there are none)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_really_full_disk_fails_the_job_and_not_the_server(tmp_path: Path, tiny_disk: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint root on a 2 MiB tmpfs that a `small` model's first checkpoint (~20 MB) cannot fit."""
    monkeypatch.setattr(manager_module, "DEFAULT_TRAINER_CMD", FAULT_TRAINER)
    monkeypatch.delenv("POCKETGPT_FAULT", raising=False)
    served = make_tiny_checkpoint(tmp_path / "served")
    settings = make_settings(tmp_path, served, checkpoint_dir=tiny_disk)
    with running_server(make_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        ds = upload(client, corpus_bytes())
        job = start_job(client, data=ds["id"], max_steps=6, preset="small", model={"block_size": 64})
        final = wait_job(client, job["id"], lambda j: j["status"] in TERMINAL, timeout=120)
        assert final["status"] == "failed", final
        print("\nreal full disk:", final["error"])
        assert "No space left on device" in final["error"] or "disk" in final["error"], final["error"]
        assert not [p for p in (tiny_disk / job["id"]).glob(".*.tmp-*")]  # no half-written checkpoint left
        _healthy(client)
        assert client.get("/admin/checkpoints", headers=ADMIN).status_code == 200


def test_corrupted_checkpoints_are_refused_and_the_old_model_keeps_serving(server) -> None:
    client, root = server
    ckpt = root / "ckpt"
    good = ckpt / "served"
    damaged = {
        "truncated-weights": lambda d: (d / "model.safetensors").write_bytes(
            (good / "model.safetensors").read_bytes()[:1000]),
        "garbage-weights": lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)),
        "empty-weights": lambda d: (d / "model.safetensors").write_bytes(b""),
        "bad-config": lambda d: (d / "config.json").write_text('{"n_layer": "many"}'),
        "wrong-shape": lambda d: (d / "config.json").write_text(
            (good / "config.json").read_text().replace('"n_embd": 32', '"n_embd": 64')),
        "bad-meta": lambda d: (d / "meta.json").write_text("{not json"),
        "bad-tokenizer": lambda d: (d / "tokenizer.json").write_text("[]"),
        "no-weights": lambda d: (d / "model.safetensors").unlink(),
    }
    for name, damage in damaged.items():
        shutil.copytree(good, ckpt / "broken" / name)
        damage(ckpt / "broken" / name)

    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:  # requests keep flowing while the bad loads are tried
        with httpx.Client(base_url=str(client.base_url), timeout=30) as c:
            while not stop.is_set():
                r = c.post("/v1/generate", headers=USER, json={"prompt": "Hi", "max_new_tokens": 4})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")

    before = generate(client)
    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        for name in damaged:
            r = client.post("/admin/model", headers=ADMIN, json={"checkpoint": f"broken/{name}"})
            assert r.status_code == 422, (name, r.text)
            assert r.json()["error"]["code"] == "checkpoint_load_failed", (name, r.text)
            assert client.get("/admin/model", headers=ADMIN).json()["checkpoint"] == "served"
    finally:
        stop.set()
        thread.join(30)
    assert not failures, failures[:5]
    after = generate(client)
    assert after["model"] == "served" and after["text"] == before["text"]
