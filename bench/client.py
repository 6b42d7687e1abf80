"""The load generator: the pocketgpt server as a subprocess, and a lean asyncio HTTP/1.1 SSE client.

The client shares the machine's cores with the server, so it is kept cheap: raw asyncio streams, chunked
transfer decoding and SSE event splitting by hand, nothing parsed but the event names. That is measured, not
assumed: `python -m bench.client_cost` compares its CPU per token with httpx + httpx-sse on the same streams
(docs/benchmarks/client_cost.json; the library client costs several times more per token). A token's arrival
time is when the chunk holding its event was read, i.e. what a client sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ROOT, thread_env


@dataclass
class StreamResult:
    start: float
    arrivals: list[float] = field(default_factory=list)
    ok: bool = False
    error: str | None = None
    done: dict | None = None  # the `done` event's data (usage, finish reason): parsed once per stream

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.start if self.arrivals else None

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]


async def sse_generate(host: str, port: int, body: dict, started: asyncio.Event | None = None,
                       on_token=None) -> StreamResult:
    """POST /v1/generate with stream=true and record when each `token` event arrives."""
    payload = json.dumps({**body, "stream": True}).encode()
    result = StreamResult(start=time.perf_counter())
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/generate HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                     b"Accept: text/event-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (host.encode(), port, len(payload), payload))
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            rest = await reader.read(4096)
            result.error = (status + rest).decode(errors="replace")[:300]
            return result
        chunked = False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                chunked = True
        buf = b""
        while True:
            if chunked:
                size_line = await reader.readline()
                if not size_line:
                    break
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                data = await reader.readexactly(size + 2)
                data = data[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
            now = time.perf_counter()
            buf += data
            # Events end with a blank line (sse-starlette writes CRLF line ends).
            buf = buf.replace(b"\r\n", b"\n")
            *events, buf = buf.split(b"\n\n")
            for event in events:
                if event.startswith(b"event: token"):
                    result.arrivals.append(now)
                    if on_token is not None:
                        on_token(result)
                elif event.startswith(b"event: done"):
                    result.ok = True
                    data = [ln[5:].strip() for ln in event.split(b"\n") if ln.startswith(b"data:")]
                    result.done = json.loads(b"\n".join(data)) if data else None
                elif event.startswith(b"event: error"):
                    result.error = event.decode(errors="replace")[:300]
        if not result.ok and result.error is None:
            result.error = "stream ended without a done event"
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
    return result


class Server:
    """`python -m pocketgpt.app.cli serve` on a free port, with the given thread count; a context manager."""

    def __init__(self, checkpoint: Path, threads: int, max_running: int = 64, device: str = "cpu",
                 extra_env: dict[str, str] | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.host = "127.0.0.1"
        env = {**os.environ, **thread_env(threads), "PYTHONPATH": str(ROOT), "POCKETGPT_LOG_LEVEL": "warning",
               "POCKETGPT_SSE_PING": "0", "POCKETGPT_MAX_NEW_TOKENS": "1024", **(extra_env or {})}
        env.pop("POCKETGPT_API_KEYS", None)
        cmd = [sys.executable, "-m", "pocketgpt.app.cli", "serve", "--checkpoint", str(checkpoint),
               "--port", str(self.port),
               "--max-running", str(max_running), "--max-queue", "1024", "--log-level", "warning",
               "--device", device]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 180) -> Server:
        deadline = time.monotonic() + timeout
        url = f"http://{self.host}:{self.port}/readyz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError("server did not become ready")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> Server:
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.close()

    def stream(self, body: dict, **kw):
        return sse_generate(self.host, self.port, body, **kw)
