"""The prefix-cache section of `python -m bench.engine` (see its docstring for what is measured)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.common import CORPUS, SHAKESPEARE, pct, summary
from bench.engine import _engine, _stream, _ttft


def _text_ids(tokenizer, n: int) -> list[int]:
    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else "".join(CORPUS) * 400
    return tokenizer.encode(text[:n * 8])[:n]


async def _chat_round(engine, system: list[int], questions: list[list[int]], n: int) -> dict[str, float]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_stream(engine, system + q, n) for q in questions))
    wall = max(a[-1] for _, a in results) - t0
    ttft = [t for t, _ in results]
    return {"aggregate_tok_s": sum(len(a) for _, a in results) / wall,
            "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3}


def prefix_section(checkpoint: Path, tokenizer, rounds: int, streams: int = 16, new_tokens: int = 32) -> dict[str, Any]:
    ids = _text_ids(tokenizer, 1024 * (rounds + 2) + 4096)
    on = _engine(checkpoint, max_running=streams, prefix_cache_slots=4)
    off = _engine(checkpoint, max_running=streams, prefix_cache_slots=0)
    try:
        _ttft(on, ids[:64])
        _ttft(off, ids[:64])
        # 1. A 1,024-token prefix plus a 16-token suffix: first seen (miss), then again with another suffix (hit).
        miss, hit = [], []
        for r in range(rounds):
            prefix = ids[1024 * r : 1024 * (r + 1)]
            suffix_a, suffix_b = ids[-16 * (2 * r + 1) :][:16], ids[-16 * (2 * r + 2) :][:16]
            miss.append(_ttft(on, prefix + suffix_a))
            hit.append(_ttft(on, prefix + suffix_b))
        out: dict[str, Any] = {
            "shared_prefix": {"prefix_tokens": 1024, "suffix_tokens": 16, "ttft_miss_s": summary(miss),
                              "ttft_hit_s": summary(hit),
                              "miss_over_hit": summary([m / h for m, h in zip(miss, hit, strict=True)])}}
        # 2. Chat-like: `streams` requests at once sharing a 512-token system prompt, each its own question.
        system = ids[1024 * (rounds + 1) : 1024 * (rounds + 1) + 512]
        questions = [ids[-(16 * (i + 1)) - 2048 :][:16] for i in range(streams)]
        for engine in (on, off):
            _ttft(engine, system + ids[:8])  # the system prompt has been seen before (it is cached, with `on`)
        runs: dict[str, list] = {"on": [], "off": []}
        for _ in range(rounds):
            for name, engine in (("on", on), ("off", off)):
                runs[name].append(asyncio.run(_chat_round(engine, system, questions, new_tokens)))
        out["chat"] = {"streams": streams, "system_tokens": 512, "new_tokens": new_tokens, "raw": runs}
        for key in ("aggregate_tok_s", "ttft_p50_ms", "ttft_p99_ms"):
            out["chat"][key] = {name: summary([r[key] for r in runs[name]]) for name in runs}
        out["chat"]["throughput_on_over_off"] = summary([a["aggregate_tok_s"] / b["aggregate_tok_s"]
                                                         for a, b in zip(runs["on"], runs["off"], strict=True)])
        return out
    finally:
        on.stop()
        off.stop()
