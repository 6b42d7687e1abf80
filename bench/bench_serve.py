"""Serving benchmark: decode speed in-process and over HTTP+SSE, then throughput and latency under load.

    python bench/bench_serve.py                          # random-init `small`-shaped model (vocab 8192)
    python bench/bench_serve.py --checkpoint runs/small  # a trained checkpoint
    python bench/bench_serve.py --concurrency 1 4 16 32 --max-new-tokens 128 --json out.json

The server runs as a subprocess (`python -m pocketgpt.app.cli serve`), so the client does not share its GIL.
TTFT is measured from sending the request to receiving the first `token` event; inter-token latency is the
gap between consecutive `token` events of one stream, as the client sees them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pocketgpt.app.engine.engine import Engine  # noqa: E402
from pocketgpt.app.engine.types import GenRequest, TokenEvent  # noqa: E402
from pocketgpt.app.testing import SSEParser  # noqa: E402
from pocketgpt.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pocketgpt.model.config import preset  # noqa: E402
from pocketgpt.model.generate import generate as model_generate  # noqa: E402
from pocketgpt.model.gpt import GPT  # noqa: E402
from pocketgpt.model.sampling import SamplingParams  # noqa: E402
from pocketgpt.model.tokenizer import train_tokenizer  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. ",
    "To be, or not to be, that is the question. All that glitters is not gold. ",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
]
PROMPTS = ["The quick brown fox", "To be, or not to be", "def add(a, b):", "A journey of a thousand miles",
           "床前明月光", "All that glitters is", "class Point:", "The lazy dog"]


def random_small_checkpoint(path: Path) -> Path:
    """`small` preset shape (4 layers, 256 wide, 256 context) with vocab 8192, random weights."""
    tokenizer = train_tokenizer(CORPUS * 50, vocab_size=1024)
    torch.manual_seed(0)
    return save_checkpoint(path, GPT(preset("small", vocab_size=8192)), tokenizer, meta={"step": 0})


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


# -- in-process ------------------------------------------------------------------------------------
def bench_in_process(path: Path, n: int) -> dict[str, float]:
    ck = load_checkpoint(path)
    prompt = ck.tokenizer.encode(PROMPTS[0])
    params = SamplingParams(temperature=1.0)

    def reference_rate() -> float:
        model_generate(ck.model, prompt, 8, params=params, seed=0)  # warm-up
        t0 = time.perf_counter()
        out = model_generate(ck.model, prompt, n, params=params, seed=0)
        return len(out) / (time.perf_counter() - t0)

    # In a worker thread, like the engine: on small CPUs torch's main-thread intra-op pool can be several
    # times slower for these tiny matmuls, which would make the comparison meaningless.
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(reference_rate).result()

    engine = Engine(ck, max_running=32, max_queue=64).start()

    async def one() -> float:
        ticket = engine.submit(GenRequest(prompt, n, params, seed=0))
        times = []
        while True:
            event = await ticket.queue.get()
            if not isinstance(event, TokenEvent):
                break
            times.append(event.t)
        return (len(times) - 1) / (times[-1] - times[0])

    try:
        asyncio.run(one())  # warm-up
        rate = asyncio.run(one())
    finally:
        engine.stop()
    return {"model_generate_tok_s": reference, "engine_tok_s": rate}


# -- over HTTP -------------------------------------------------------------------------------------
async def one_stream(client: httpx.AsyncClient, body: dict) -> dict[str, object]:
    start = time.perf_counter()
    arrivals: list[float] = []
    parser = SSEParser()
    async with client.stream("POST", "/v1/generate", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            event = parser.feed(line)
            if event and event[0] == "token":
                arrivals.append(time.perf_counter())
    return {"start": start, "arrivals": arrivals}


async def load_level(base: str, concurrency: int, n: int) -> dict[str, float]:
    bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": n, "temperature": 1.0, "seed": i,
               "stream": True} for i in range(concurrency)]
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, b) for b in bodies))
        wall = time.perf_counter() - t0
    tokens = sum(len(r["arrivals"]) for r in results)
    ttft = [r["arrivals"][0] - r["start"] for r in results if r["arrivals"]]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
    single = [(len(r["arrivals"]) - 1) / (r["arrivals"][-1] - r["arrivals"][0]) for r in results
              if len(r["arrivals"]) > 1]
    return {
        "concurrency": concurrency, "tokens": tokens, "wall_s": wall, "aggregate_tok_s": tokens / wall,
        "per_stream_tok_s": statistics.mean(single), "ttft_p50_ms": pct(ttft, 50) * 1e3,
        "ttft_p99_ms": pct(ttft, 99) * 1e3, "itl_p50_ms": pct(itl, 50) * 1e3, "itl_p99_ms": pct(itl, 99) * 1e3,
    }


def start_server(path: Path, max_running: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "POCKETGPT_LOG_LEVEL": "warning"}
    cmd = [sys.executable, "-m", "pocketgpt.app.cli", "serve", "--checkpoint", str(path), "--port", str(port),
           "--max-running", str(max_running), "--max-queue", "256", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit("server failed to start")
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="default: a random-init small-shaped model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or random_small_checkpoint(Path(tmp) / "small-random")
        cfg = load_checkpoint(path).config
        print(f"model: {path} ({cfg.n_layer} layers, {cfg.n_embd} wide, vocab {cfg.vocab_size}, "
              f"context {cfg.block_size}); torch threads {torch.get_num_threads()}")
        n = min(args.max_new_tokens, cfg.block_size - 16)
        figures: dict[str, object] = {"in_process": bench_in_process(path, n)}
        ip = figures["in_process"]
        print(f"single stream, in-process: engine {ip['engine_tok_s']:.0f} tok/s "
              f"(model.generate reference loop {ip['model_generate_tok_s']:.0f} tok/s)")
        proc, base = start_server(path, max(args.concurrency))
        try:
            asyncio.run(load_level(base, 1, 16))  # warm-up
            levels = [asyncio.run(load_level(base, c, n)) for c in args.concurrency]
        finally:
            proc.terminate()
            proc.wait(30)
        figures["http_sse"] = levels
        print(f"single stream, HTTP+SSE: {levels[0]['per_stream_tok_s']:.0f} tok/s\n")
        print("| streams | aggregate tok/s | per-stream tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
        print("|--:|--:|--:|--:|--:|")
        for r in levels:
            print(f"| {r['concurrency']} | {r['aggregate_tok_s']:.0f} | {r['per_stream_tok_s']:.0f} | "
                  f"{r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} |")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
