"""Time from `git clone` to the first streamed token, as a newcomer meets it (README, "Quick start").

    python -m bench.first_token [--source REPO] [--starter-max-time S] [--compare-dev] [--out FILE]

Clones REPO (default: this checkout's committed HEAD) into a temporary folder, runs `make serve` there (a new
.venv with the runtime dependencies, the starter model's training, the server), and streams one generation with
`curl -N` as soon as /readyz answers. Phases are read from what a user sees: the install stamp appearing, the
entrypoint's "starter model saved" line, /readyz, the first `event: token` line. With --compare-dev it then times
`scripts/install.sh dev` in the same venv: what `make serve` used to install before its first token (the dev
extra), measured in the same run. Uses pip as configured here, its cache as it is. Standard library only: it runs
before any venv exists. Writes docs/benchmarks/first-token.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPT = {"prompt": "def __init__(self", "max_new_tokens": 32, "temperature": 0.3, "stream": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _packages(venv: Path) -> int:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "freeze"],
                         capture_output=True, text=True, timeout=120)
    return len(out.stdout.split())


def _starter_cap(log: str) -> int | None:
    """The training cap the entrypoint applied, from its line `(N steps at most, Ts at most, on DEVICE)`."""
    match = re.search(r"steps at most, (\d+)s at most", log)
    return int(match.group(1)) if match else None


def _first_token(base: str) -> float:
    """Seconds from sending the request with curl -N to its first `event: token` line."""
    start = time.monotonic()
    curl = subprocess.Popen(["curl", "-sN", f"{base}/v1/generate", "-H", "Content-Type: application/json",
                             "-d", json.dumps(PROMPT)], stdout=subprocess.PIPE, text=True)
    try:
        assert curl.stdout is not None
        for line in curl.stdout:
            if line.startswith("event: token"):
                return time.monotonic() - start
        raise RuntimeError("the stream ended without a token")
    finally:
        curl.terminate()
        curl.wait(10)


def measure(source: str, starter_max_time: int | None, compare_dev: bool, timeout: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="pocketgpt-first-token-"))
    clone = work / "pocketgpt"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POCKETGPT_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env["POCKETGPT_PORT"] = str(port)
    if starter_max_time is not None:
        env["POCKETGPT_STARTER_MAX_TIME"] = str(starter_max_time)
    marks: dict[str, float] = {}
    load_before = os.getloadavg()
    t0 = time.monotonic()
    subprocess.run(["git", "clone", "--quiet", source, str(clone)], check=True, timeout=300)
    marks["clone"] = time.monotonic()
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    log_path = work / "make-serve.log"
    with open(log_path, "wb") as log:
        make = subprocess.Popen(["make", "serve"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while "ready" not in marks:
            if make.poll() is not None:
                raise RuntimeError(f"make serve exited {make.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"no server after {timeout}s:\n{log_path.read_text()[-3000:]}")
            now = time.monotonic()
            if "installed" not in marks and (clone / ".venv" / ".installed-runtime").exists():
                marks["installed"] = now
            if "trained" not in marks and "starter model saved" in log_path.read_text(errors="replace"):
                marks["trained"] = now
            if "trained" in marks and _ready(base):
                marks["ready"] = now
            time.sleep(0.2)
        request_s = _first_token(base)
        marks["first_token"] = time.monotonic()
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(60)
    load_after = os.getloadavg()
    venv = clone / ".venv"
    result: dict[str, Any] = {
        "command": "python -m bench.first_token" + (f" --starter-max-time {starter_max_time}"
                                                    if starter_max_time is not None else "")
                   + (" --compare-dev" if compare_dev else ""),
        "source_commit": commit.strip(),
        "python": platform.python_version(), "cores": os.cpu_count(), "platform": platform.platform(),
        "starter_max_time_s": _starter_cap(log_path.read_text(errors="replace")),
        "pip_cache": "as found on the machine (pip's own cache and configured indexes/find-links, not cleared)",
        "seconds": {
            "clone": marks["clone"] - t0,
            "install_runtime": marks["installed"] - marks["clone"],
            "train_starter": marks["trained"] - marks["installed"],
            "server_start": marks["ready"] - marks["trained"],
            "request_to_first_token": request_s,
            "clone_to_first_token": marks["first_token"] - t0,
        },
        "packages_runtime": _packages(venv),
        "load_average_before": load_before, "load_average_after": load_after,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if compare_dev:
        start = time.monotonic()
        subprocess.run(["bash", "scripts/install.sh", "dev"], cwd=clone, env=env, check=True, timeout=1800,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dev_s = time.monotonic() - start
        total = result["seconds"]["clone_to_first_token"]
        result["seconds"]["install_dev_extra"] = dev_s
        result["packages_with_dev"] = _packages(venv)
        result["comparison"] = {
            "what": "clone -> first token with `make serve` installing runtime deps only, vs the same plus the "
                    "dev extra (what it installed before this change), both from this run",
            "with_dev_extra_s": total + dev_s, "runtime_only_s": total,
            "ratio": (total + dev_s) / total,
            "leaves_out": "the dev extra installed second, into a venv that already has torch and the runtime deps "
                          "(pip's cache warm for those): the incremental cost, not a separate cold install",
        }
    shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(ROOT), help="repository to clone (default: this checkout)")
    parser.add_argument("--starter-max-time", type=int, help="POCKETGPT_STARTER_MAX_TIME (default: the entrypoint's)")
    parser.add_argument("--compare-dev", action="store_true", help="also time installing the dev extra")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "first-token.json")
    args = parser.parse_args(argv)
    result = measure(args.source, args.starter_max_time, args.compare_dev, args.timeout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["seconds"], indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
