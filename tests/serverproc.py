"""Helpers for tests that run the server (or the container entrypoint) as a real child process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the interpreter running the tests has pocketgpt installed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**overrides: str) -> dict[str, str]:
    """The test's environment with no POCKETGPT_* leaking in, the venv first on PATH, and `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETGPT_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


class Proc:
    """A child process whose combined output goes to a file (no pipe to fill up)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> None:
        self.log_path = log
        self._fh = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._fh,
                                      stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._fh.close()
        return self.popen.returncode


def request(method: str, url: str, body: Any = None, token: str | None = None,
            timeout: float = 30.0) -> tuple[int, Any]:
    """One HTTP request with a JSON body; returns (status, parsed JSON or text)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def wait_ready(base: str, proc: Proc, timeout: float = 120.0) -> None:
    """Poll /readyz until 200; fail with the process log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"process exited with {proc.popen.returncode} before ready:\n{proc.log()[-4000:]}")
        try:
            status, _ = request("GET", f"{base}/readyz", timeout=2)
            if status == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready after {timeout}s:\n{proc.log()[-4000:]}")
