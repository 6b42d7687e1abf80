"""Does the bench's hand-rolled SSE client matter? Its CPU cost per token against httpx + httpx-sse, in one run.

    python -m bench.client_cost            # writes docs/benchmarks/client_cost.json

The serving benchmark's client runs in the bench process and shares the machine's cores with the server, so
whatever it spends per token is taken from the server. Both clients here read the same streams from one server
(a tiny random model, so tokens come fast and the client's share shows) with the same bookkeeping (the arrival
time of each `token` event); they alternate round by round. Measured: the bench process's CPU time per token
received (`time.process_time`, the client and its event loop) and the aggregate tokens/s. What it leaves out:
larger models (fewer tokens per second, so a smaller client share) and the client's effect on latency tails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.client import Server, StreamResult  # noqa: E402
from bench.common import bench_tokenizer, machine_info, make_checkpoint, summary  # noqa: E402
from pocketgpt.model.config import ModelConfig  # noqa: E402


async def httpx_sse_generate(client: Any, body: dict) -> StreamResult:
    """The same bookkeeping as bench.client.sse_generate, through httpx and httpx-sse."""
    from httpx_sse import aconnect_sse

    result = StreamResult(start=time.perf_counter())
    async with aconnect_sse(client, "POST", "/v1/generate", json={**body, "stream": True}) as source:
        if source.response.status_code != 200:
            result.error = (await source.response.aread()).decode(errors="replace")[:300]
            return result
        async for sse in source.aiter_sse():
            if sse.event == "token":
                result.arrivals.append(time.perf_counter())
            elif sse.event == "done":
                result.ok = True
            elif sse.event == "error":
                result.error = sse.data[:300]
    return result


async def one_round(server: Server, kind: str, streams: int, tokens: int) -> dict[str, float]:
    import httpx

    bodies = [{"prompt": f"Stream {i}:", "max_new_tokens": tokens, "temperature": 0.0} for i in range(streams)]
    limits = httpx.Limits(max_connections=streams)
    async with httpx.AsyncClient(base_url=f"http://{server.host}:{server.port}", timeout=120, limits=limits) as hc:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if kind == "hand-rolled":
            results = await asyncio.gather(*(server.stream(b) for b in bodies))
        else:
            results = await asyncio.gather(*(httpx_sse_generate(hc, b) for b in bodies))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    received = sum(len(r.arrivals) for r in results)
    failed = sum(not r.ok for r in results)
    return {"cpu_us_per_token": cpu / max(received, 1) * 1e6, "tok_s": received / wall, "tokens": received,
            "failed": failed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.client_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128, help="new tokens per stream")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks" / "client_cost.json")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="pocketgpt-client-cost-"))
    tokenizer = bench_tokenizer(512)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=64, block_size=512)
    checkpoint = make_checkpoint(work / "tiny", cfg, tokenizer)
    env = {"POCKETGPT_DB": str(work / "server.db"), "POCKETGPT_DATA_DIR": str(work / "data"),
           "POCKETGPT_CHECKPOINT_DIR": str(work / "checkpoints")}
    load_start = os.getloadavg()
    raw: dict[str, list[dict[str, float]]] = {"hand-rolled": [], "httpx-sse": []}
    with Server(checkpoint, args.threads, max_running=args.streams, extra_env=env) as server:
        asyncio.run(one_round(server, "httpx-sse", 2, 8))  # warm-up: first requests, imports
        asyncio.run(one_round(server, "hand-rolled", 2, 8))
        for r in range(args.rounds):
            order = ["hand-rolled", "httpx-sse"] if r % 2 == 0 else ["httpx-sse", "hand-rolled"]
            for kind in order:
                raw[kind].append(asyncio.run(one_round(server, kind, args.streams, args.tokens)))
                print(kind, raw[kind][-1], flush=True)
    out = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
        "command": "python -m bench.client_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine_info(args.threads, "cpu"), "load_average_start": load_start,
                    "load_average_end": os.getloadavg()},
        "model": cfg.to_dict(), "streams": args.streams, "tokens_per_stream": args.tokens, "rounds": args.rounds,
        "clients": {kind: {"cpu_us_per_token": summary([x["cpu_us_per_token"] for x in xs]),
                           "tok_s": summary([x["tok_s"] for x in xs]),
                           "failed": sum(x["failed"] for x in xs)} for kind, xs in raw.items()},
        "httpx_sse_over_hand_rolled_cpu": summary([b["cpu_us_per_token"] / a["cpu_us_per_token"]
                                                   for a, b in zip(raw["hand-rolled"], raw["httpx-sse"],
                                                                   strict=True)]),
        "raw": raw,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["clients"], indent=2), "\nCPU ratio (httpx-sse / hand-rolled):",
          f"{out['httpx_sse_over_hand_rolled_cpu']['median']:.2f}", f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
