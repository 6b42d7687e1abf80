"""Soak test: many concurrent streaming clients against a real server process for minutes, on loopback only.

    python bench/soak.py                       # 32 clients, 5 minutes, a random-init `small`-shaped model
    python bench/soak.py --duration 60 --clients 16 --note "shared machine"   # what docs/benchmarks/soak.json holds

Results go to docs/benchmarks/soak.json (or --json); README.md and docs/reliability.md quote them from there
(`python -m bench.figures` rewrites those quotes).

The server is `pocketgpt serve` in a child process on 127.0.0.1 (a free port), serving a freshly initialised
checkpoint of the `small` preset (random weights are fine: the point is the server, not the text). Each client
loops until the time is up: stream one /v1/generate request, read every event, check that the `done` event's
text is the concatenation of the token events and its usage counts them, then the next request.

Reported: requests completed and failed (by kind), time to first token and inter-token latency (p50/p90/p99,
measured by the clients), tokens per second, the server's resident memory (VmRSS) sampled every few seconds,
and the machine's load average (other work on the machine slows everything down; it is printed so the figures
can be read against it; --note records anything else about the run). Exit status 1 if any request failed or
the memory kept growing in the last third.
Nothing here talks to anything but 127.0.0.1, and everything stops when the duration is up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPTS = [
    "The quick brown fox", "Once upon a time", "def fibonacci(n):", "床前明月光，", "In the beginning",
    "import numpy as np\n", "To be, or not to be", "🚀 Launch day:", "The server kept working because",
    "SELECT * FROM users WHERE", "Dear diary,", "class Tree:\n    def __init__(self",
]


def make_checkpoint(out: Path, preset_name: str, vocab: int) -> Path:
    """A random-init checkpoint of `preset_name`, with a byte-level BPE trained on this project's sources."""
    import torch

    from pocketgpt.model.checkpoint import save_checkpoint
    from pocketgpt.model.config import preset
    from pocketgpt.model.gpt import GPT
    from pocketgpt.model.tokenizer import train_tokenizer

    texts = [p.read_text(errors="replace") for d in ("app", "model", "training") for p in (ROOT / d).rglob("*.py")]
    tokenizer = train_tokenizer(texts + PROMPTS, vocab_size=vocab)
    torch.manual_seed(0)
    model = GPT(preset(preset_name, vocab_size=tokenizer.vocab_size))
    return save_checkpoint(out, model, tokenizer, meta={"step": 0, "note": "random init, for the soak test"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


@dataclass
class Tally:
    completed: int = 0
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_samples) < 10:
            self.error_samples.append(f"{kind}: {detail[:300]}")


async def client_loop(base: str, deadline: float, tally: Tally, rng: random.Random, max_new: int) -> None:
    import httpx
    from httpx_sse import SSEError, aconnect_sse

    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(120, connect=10)) as client:
        while time.monotonic() < deadline:
            body = {"prompt": rng.choice(PROMPTS), "max_new_tokens": rng.randint(max_new // 4, max_new),
                    "temperature": 0.8, "top_k": 50, "seed": rng.randrange(2**31), "stream": True}
            started = time.perf_counter()
            last = None
            texts: list[str] = []
            done = None
            try:
                async with aconnect_sse(client, "POST", "/v1/generate", json=body) as source:
                    if source.response.status_code != 200:
                        tally.error(f"http_{source.response.status_code}",
                                    (await source.response.aread()).decode(errors="replace"))
                        continue
                    async for sse in source.aiter_sse():
                        kind, data = sse.event, sse.data
                        if kind == "token":
                            now = time.perf_counter()
                            if last is None:
                                tally.ttft.append(now - started)
                            else:
                                tally.itl.append(now - last)
                            last = now
                            texts.append(json.loads(data)["text"])
                        elif kind == "done":
                            done = json.loads(data)
                        elif kind == "error":
                            tally.error("error_event", data)
            except (httpx.HTTPError, SSEError, OSError) as exc:
                tally.error(type(exc).__name__, str(exc))
                continue
            if done is None:
                if not tally.errors.get("error_event"):
                    tally.error("no_done_event", json.dumps(body))
                continue
            if done["text"] != "".join(texts) or done["usage"]["completion_tokens"] != len(texts):
                tally.error("mismatch", f"done={done['text']!r} tokens={''.join(texts)!r}")
                continue
            tally.completed += 1
            tally.tokens += len(texts)


async def sample_memory(pid: int, deadline: float, every: float, samples: list[tuple[float, int, float]],
                        t0: float) -> None:
    while time.monotonic() < deadline:
        samples.append((time.monotonic() - t0, rss_bytes(pid), os.getloadavg()[0]))
        await asyncio.sleep(every)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="per request, drawn from [n/4, n] (default 64)")
    p.add_argument("--preset", default="small", help="model shape (default small)")
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary (default 2048)")
    p.add_argument("--checkpoint", type=Path, help="serve this checkpoint instead of a random-init one")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks" / "soak.json",
                   help="where to write the results (default docs/benchmarks/soak.json)")
    p.add_argument("--note", default="", help="recorded with the results, e.g. what else ran on the machine")
    args = p.parse_args(argv)

    from pocketgpt.launch import child_env

    work = Path(tempfile.mkdtemp(prefix="pocketgpt-soak-"))
    checkpoint = args.checkpoint or make_checkpoint(work / f"{args.preset}-random", args.preset, args.vocab)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETGPT_")}
    env.update(POCKETGPT_MAX_RUNNING=str(args.clients), POCKETGPT_MAX_QUEUE=str(args.clients),
               POCKETGPT_LOG_LEVEL="warning", POCKETGPT_SSE_PING="0", PYTHONUNBUFFERED="1")
    log_path = work / "server.log"
    env = child_env(env)  # the child imports this checkout's pocketgpt, whatever the working directory
    argv_server = [sys.executable, "-m", "pocketgpt.app.cli", "serve", "--checkpoint", str(checkpoint),
                   "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(argv_server, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx

        ready_by = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                print(log_path.read_text()[-3000:], file=sys.stderr)
                return 2
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > ready_by:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.2)
        info = httpx.get(f"{base}/info", timeout=10).json()
        rss_start = rss_bytes(server.pid)
        load_start = os.getloadavg()
        print(f"soak: {args.clients} clients x {args.duration:.0f}s against {info['model']} "
              f"({info['parameters']:,} parameters, {info['config']['n_layer']} layers x {info['config']['n_embd']}) "
              f"on {base}, server pid {server.pid}, RSS {rss_start / 2**20:.0f} MiB, load average "
              f"{load_start[0]:.2f}", flush=True)

        tally = Tally()
        samples: list[tuple[float, int, float]] = []

        async def run() -> None:
            t0 = time.monotonic()
            deadline = t0 + args.duration
            rngs = [random.Random(1000 + i) for i in range(args.clients)]
            await asyncio.gather(sample_memory(server.pid, deadline, args.sample_every, samples, t0),
                                 *(client_loop(base, deadline, tally, rngs[i], args.max_new_tokens)
                                   for i in range(args.clients)))

        started, wall_start = time.monotonic(), time.time()
        asyncio.run(run())
        elapsed = time.monotonic() - started
        rss_end = rss_bytes(server.pid)
        load_end = os.getloadavg()
        alive = server.poll() is None and httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()

    third = max(1, len(samples) // 3)
    middle = [rss for _, rss, _ in samples[third : 2 * third]] or [rss_start]
    last = [rss for _, rss, _ in samples[2 * third :]] or [rss_end]
    growth_last_third = max(last) - max(middle)
    growing = growth_last_third > max(64 * 2**20, 0.10 * max(middle))
    ms = 1000.0
    result = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall_start)),
        "command": shlex.join(["python", "bench/soak.py", *(argv if argv is not None else sys.argv[1:])]),
        "note": args.note, "clients": args.clients, "duration_s": round(elapsed, 1), "model": info["model"],
        "parameters": info["parameters"], "preset": args.preset, "max_new_tokens": args.max_new_tokens,
        "requests_completed": tally.completed, "errors": sum(tally.errors.values()), "errors_by_kind": tally.errors,
        "error_samples": tally.error_samples, "tokens": tally.tokens,
        "tokens_per_s": round(tally.tokens / elapsed, 1), "requests_per_s": round(tally.completed / elapsed, 2),
        "ttft_ms": {q: round(percentile(tally.ttft, v) * ms, 1) if tally.ttft else None
                    for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "itl_ms": {q: round(percentile(tally.itl, v) * ms, 1) if tally.itl else None
                   for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "ttft_mean_ms": round(statistics.fmean(tally.ttft) * ms, 1) if tally.ttft else None,
        "rss_mib": {"start": round(rss_start / 2**20, 1), "end": round(rss_end / 2**20, 1),
                    "max": round(max([rss_start, rss_end, *(r for _, r, _ in samples)]) / 2**20, 1),
                    "growth_last_third": round(growth_last_third / 2**20, 1)},
        "rss_samples_mib": [(round(t), round(r / 2**20, 1)) for t, r, _ in samples],
        "load_average": {"start": round(load_start[0], 2), "end": round(load_end[0], 2),
                         "max_sampled": round(max([load_start[0], load_end[0], *(load for _, _, load in samples)]), 2)},
        "cpu_count": os.cpu_count(), "server_alive_after": alive, "memory_bounded": not growing,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples_mib"}, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.json}")
    ok = result["errors"] == 0 and alive and not growing and tally.completed > 0
    print("soak:", "PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
