"""Section 2: serving under load, over HTTP+SSE, against the bare loop at the same batch size.

For each concurrency c, c clients start streaming at once (greedy, n new tokens each, different short prompts).
Aggregate tokens/s is every token received over the wall time from the first request to the last token;
time to first token runs from sending a request to its first `token` event; inter-token latency is the gap
between consecutive token events of one stream. The reference is `BareDecoder` decoding c rows in lockstep
for n tokens, measured in the same round while the server idles.

Interference: 16 streams decode; once each has received a few tokens a 512-token prompt arrives. Its prefill
is chunked by the engine, so the streams' inter-token p99 should stay within a small factor of a round without
it (same streams, same round).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import torch

from bench.client import Server, StreamResult
from bench.common import CORPUS, SHAKESPEARE, cuda_sync, in_worker, pct, summary
from bench.peers import BareDecoder
from pocketgpt.model.checkpoint import load_checkpoint

PROMPTS = [
    "First Citizen:", "You are all resolved rather to die than to famish?", "ROMEO:", "What light through yonder",
    "Now is the winter of our discontent", "KING RICHARD III:", "O, pardon me, thou bleeding piece of earth",
    "To be, or not to be", "Friends, Romans, countrymen,", "MENENIUS:", "Good morrow, cousin.", "JULIET:",
    "A horse! a horse!", "All the world's a stage,", "Once more unto the breach,", "HAMLET:",
]


def body(i: int, n: int, prompt: str | None = None) -> dict:
    return {"prompt": prompt or PROMPTS[i % len(PROMPTS)], "max_new_tokens": n, "temperature": 0.0, "seed": i}


async def _level(server: Server, c: int, n: int) -> tuple[list[StreamResult], float]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(server.stream(body(i, n)) for i in range(c)))
    last = max((r.arrivals[-1] for r in results if r.arrivals), default=time.perf_counter())
    return list(results), last - t0


def level_figures(results: list[StreamResult], wall: float) -> dict[str, Any]:
    tokens = sum(len(r.arrivals) for r in results)
    ttft = [r.ttft for r in results if r.ttft is not None]
    gaps = [g for r in results for g in r.gaps()]
    qs = list(range(0, 101, 5))
    return {
        "itl_quantiles_ms": [pct(gaps, q) * 1e3 for q in qs], "ttft_quantiles_ms": [pct(ttft, q) * 1e3 for q in qs],
        "requests": len(results), "failed": sum(not r.ok for r in results),
        "errors": sorted({r.error for r in results if r.error})[:3], "tokens": tokens, "wall_s": wall,
        "aggregate_tok_s": tokens / wall, "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
        "itl_p50_ms": pct(gaps, 50) * 1e3, "itl_p99_ms": pct(gaps, 99) * 1e3,
    }


def bare_rate(bare: BareDecoder, prompt: torch.Tensor, n: int) -> float:
    """Decode tokens/s of c rows in lockstep: c * (n - 1) tokens over T(n) - T(1), prefill left out."""
    device = str(prompt.device)
    cuda_sync(device)
    t0 = time.perf_counter()
    bare.generate(prompt, 1)
    cuda_sync(device)
    t1 = time.perf_counter()
    bare.generate(prompt, n)
    cuda_sync(device)
    t2 = time.perf_counter()
    return prompt.size(0) * (n - 1) / ((t2 - t1) - (t1 - t0))


def long_prompt(tokenizer, n_tokens: int = 512) -> str:
    text = SHAKESPEARE.read_text(encoding="utf-8")[20_000:60_000] if SHAKESPEARE.is_file() else "".join(CORPUS) * 60
    ids = tokenizer.encode(text)[:n_tokens]
    return tokenizer.decode(ids)


async def _interference(server: Server, streams: int, n: int, prompt: str | None, after: int) -> dict[str, Any]:
    """`streams` greedy streams; with `prompt`, a long-prompt request is sent once each stream has `after` tokens."""
    live: dict[int, StreamResult] = {}
    long_task: list[asyncio.Task] = []
    t_long: list[float] = []

    def on_token(r: StreamResult) -> None:
        live[id(r)] = r
        if prompt is None or long_task or len(live) < streams:
            return
        if all(len(s.arrivals) >= after for s in live.values()):
            t_long.append(time.perf_counter())
            long_task.append(asyncio.ensure_future(
                server.stream({"prompt": prompt, "max_new_tokens": 4, "temperature": 0.0})))

    tasks = [asyncio.ensure_future(server.stream(body(i, n), on_token=on_token)) for i in range(streams)]
    results = await asyncio.gather(*tasks)
    out: dict[str, Any] = {"failed": sum(not r.ok for r in results)}
    gaps = [g for r in results for g in r.gaps()]
    out["itl_p50_ms"], out["itl_p99_ms"] = pct(gaps, 50) * 1e3, pct(gaps, 99) * 1e3
    out["itl_max_ms"] = max(gaps) * 1e3 if gaps else float("nan")
    if long_task:
        lr = await long_task[0]
        out["long_prompt_ok"] = lr.ok
        out["long_prompt_ttft_ms"] = (lr.ttft or float("nan")) * 1e3
        # Gaps of the running streams that overlap the long prompt's prefill (sent -> its first token).
        if lr.arrivals:
            t_a, t_b = t_long[0], lr.arrivals[0]
            during = [b - a for r in results for a, b in zip(r.arrivals, r.arrivals[1:], strict=False)
                      if b > t_a and a < t_b]
            out["itl_during_prefill_p50_ms"] = pct(during, 50) * 1e3
            out["itl_during_prefill_max_ms"] = max(during) * 1e3 if during else float("nan")
    return out


def run(checkpoint: Path, server: Server, levels: list[int], n: int, rounds: int,
        interference_streams: int = 16, device: str = "cpu") -> dict[str, Any]:
    ck = load_checkpoint(checkpoint, device=device, dtype=torch.bfloat16 if device.startswith("cuda") else None)
    model = ck.model
    prompt_len = 8
    bares = {c: BareDecoder(model, c, prompt_len + n) for c in levels}
    prompts = {c: torch.randint(0, ck.config.vocab_size, (c, prompt_len), generator=torch.Generator().manual_seed(c))
               .to(device) for c in levels}
    asyncio.run(_level(server, 2, 8))  # warm-up
    per_level: dict[int, dict[str, list]] = {c: {"http": [], "bare": []} for c in levels}
    for _ in range(rounds):
        for c in levels:
            results, wall = asyncio.run(_level(server, c, n))
            per_level[c]["http"].append(level_figures(results, wall))
            per_level[c]["bare"].append(in_worker(bare_rate, bares[c], prompts[c], n))
    del bares
    out: dict[str, Any] = {"n_new_tokens": n, "levels": []}
    for c in levels:
        http = per_level[c]["http"]
        out["levels"].append({
            "concurrency": c,
            "aggregate_tok_s": summary([h["aggregate_tok_s"] for h in http]),
            "bare_tok_s": summary(per_level[c]["bare"]),
            "ttft_p50_ms": summary([h["ttft_p50_ms"] for h in http]),
            "ttft_p99_ms": summary([h["ttft_p99_ms"] for h in http]),
            "itl_p50_ms": summary([h["itl_p50_ms"] for h in http]),
            "itl_p99_ms": summary([h["itl_p99_ms"] for h in http]),
            "ratio_to_bare": summary([h["aggregate_tok_s"] / b for h, b in zip(http, per_level[c]["bare"],
                                                                                strict=True)]),
            "itl_quantiles_ms": http[-1]["itl_quantiles_ms"], "ttft_quantiles_ms": http[-1]["ttft_quantiles_ms"],
            "failed": sum(h["failed"] for h in http), "requests": sum(h["requests"] for h in http),
            "errors": sorted({e for h in http for e in h["errors"]})[:3],
        })

    text = long_prompt(ck.tokenizer)
    runs: dict[str, list] = {"without": [], "with": []}
    for _ in range(rounds):
        runs["without"].append(asyncio.run(_interference(server, interference_streams, n, None, 8)))
        runs["with"].append(asyncio.run(_interference(server, interference_streams, n, text, 8)))
    out["interference"] = {
        "streams": interference_streams, "long_prompt_tokens": len(ck.tokenizer.encode(text)),
        "raw": runs,
        "itl_p99_ms_without": summary([r["itl_p99_ms"] for r in runs["without"]]),
        "itl_p99_ms_with": summary([r["itl_p99_ms"] for r in runs["with"]]),
        "p99_ratio": summary([w["itl_p99_ms"] / o["itl_p99_ms"] for w, o in zip(runs["with"], runs["without"],
                                                                                strict=True)]),
    }
    return out
