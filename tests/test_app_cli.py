"""`pocketgpt serve` / `pocketgpt generate` and settings from the environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocketgpt.app import serve_cli
from pocketgpt.app.settings import Settings
from pocketgpt.model.checkpoint import load_checkpoint
from tests.conftest import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_serve_missing_checkpoint_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    proc = run(["-m", "pocketgpt.app.cli", "serve", "--checkpoint", str(missing), "--port", str(free_port())])
    assert proc.returncode != 0
    assert f"cannot load checkpoint {missing}: checkpoint directory not found: {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_uvicorn_app_reads_env_and_reports_a_damaged_checkpoint(tmp_path: Path) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "ck")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    proc = run(["-m", "uvicorn", "pocketgpt.app.main:app", "--port", str(free_port())],
               env={"POCKETGPT_CHECKPOINT": str(ckpt)})
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if str(weights) in line]
    assert len(lines) == 1 and "not a valid safetensors file" in lines[0]
    assert "Traceback" not in proc.stderr


def test_generate_streams_the_greedy_text(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "ck", tie_embeddings=False)
    rc = serve_cli.main(["generate", "--checkpoint", str(ckpt), "The quick", "--max-new-tokens", "12",
                         "--temperature", "0", "--seed", "3"])
    out, err = capsys.readouterr()
    assert rc == 0
    ck = load_checkpoint(ckpt)
    seq, ref = ck.tokenizer.encode("The quick"), []
    with torch.no_grad():
        for _ in range(12):
            tok = int(ck.model(torch.tensor([seq]))[0][0, -1].argmax())
            if tok == ck.tokenizer.eot_id:
                break
            ref.append(tok)
            seq.append(tok)
    assert out == ck.tokenizer.decode(ref) + "\n"
    assert "seed 3" in err and "tokens" in err


def test_generate_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = serve_cli.main(["generate", "--checkpoint", str(tmp_path / "nope"), "hi"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == f"pocketgpt generate: cannot load checkpoint {tmp_path / 'nope'}: " \
                          f"checkpoint directory not found: {tmp_path / 'nope'}"


def test_settings_from_environment_with_cli_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"POCKETGPT_CHECKPOINT": "/ck", "POCKETGPT_API_KEYS": "a, b,,c", "POCKETGPT_MAX_RUNNING": "3",
           "POCKETGPT_PORT": "9000", "POCKETGPT_ADMIN_TOKEN": "secret", "POCKETGPT_REQUEST_TIMEOUT": "2.5",
           "POCKETGPT_DEVICE": "cpu", "POCKETGPT_DTYPE": "bf16", "POCKETGPT_DB": "/var/pg.db"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = serve_cli._settings({"port": 9100, "host": None}, "serve")
    assert s is not None
    assert (s.checkpoint, s.api_keys, s.max_running, s.port, s.request_timeout) == \
        (Path("/ck"), ["a", "b", "c"], 3, 9100, 2.5)
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "secret"
    assert "secret" not in repr(s)
    assert (s.device, s.dtype, s.db) == ("cpu", "bf16", Path("/var/pg.db"))
    monkeypatch.setenv("POCKETGPT_DEVICE", "tpu")
    assert serve_cli._settings({}, "serve") is None


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("POCKETGPT_")]:
        monkeypatch.delenv(name)
    s = Settings()
    assert s.api_keys == [] and s.device == "auto" and s.max_queue >= 0
