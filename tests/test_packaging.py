"""pocketgpt works from any folder and installs under names that cannot collide with a user's own modules."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from pocketgpt.app.jobs.manager import JobManager
from pocketgpt.app.jobs.store import SUCCEEDED, JobStore
from tests.test_training_data import write_corpus

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--tokenizer-vocab", "300", "--device", "cpu",
        "--max-steps", "3", "--eval-every", "3", "--eval-batches", "1", "--sample-tokens", "4"]


def hostile_folder(path: Path) -> Path:
    """A user's project folder whose generic module names raise on import (nanoGPT's model.py, an app/, ...)."""
    path.mkdir(parents=True, exist_ok=True)
    boom = "raise RuntimeError('the user module {} was imported')\n"
    for name in ("model", "app", "training", "generate"):
        (path / f"{name}.py").write_text(boom.format(name))
    (path / "app").mkdir(exist_ok=True)
    (path / "app" / "__init__.py").write_text(boom.format("app/"))
    return path


def pocketgpt_command() -> list[str]:
    script = Path(sys.executable).with_name("pocketgpt")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pocketgpt.app.cli"]


def test_train_from_a_folder_with_generic_module_names(tmp_path: Path) -> None:
    folder = hostile_folder(tmp_path / "project")
    write_corpus(folder / "x.txt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([*pocketgpt_command(), "train", "--data", "x.txt", "--out", "run", *TINY], cwd=folder,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "was imported" not in proc.stderr
    assert (folder / "run" / "last" / "model.safetensors").is_file()


def test_admin_job_runs_from_a_folder_with_generic_module_names(tmp_path: Path, monkeypatch) -> None:
    folder = hostile_folder(tmp_path / "project")
    write_corpus(folder / "x.txt")
    monkeypatch.chdir(folder)  # the server was started here: its jobs run here too
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    async def main():
        manager = JobManager(JobStore(tmp_path / "jobs.db"), tmp_path / "ckpt", poll_interval_s=0.1)
        await manager.start()
        job = manager.submit({"data": "x.txt"}, ["--data", str(folder / "x.txt"), *TINY])
        deadline = time.monotonic() + 240
        while not manager.get(job.id).terminal and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await manager.shutdown()
        return manager.get(job.id)

    job = asyncio.run(main())
    log = (tmp_path / "ckpt" / job.id / "train.log").read_text()
    assert job.status == SUCCEEDED, log[-3000:]
    assert "was imported" not in log


@pytest.mark.timeout(300)
def test_wheel_installs_only_the_pocketgpt_package(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("pocketgpt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"pocketgpt"}
    for module in ("pocketgpt/__init__.py", "pocketgpt/app/main.py", "pocketgpt/model/gpt.py",
                   "pocketgpt/training/trainer.py", "pocketgpt/app/static/index.html"):
        assert module in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pocketgpt = pocketgpt.app.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
