"""n choices from one prefill against n separate requests for the same prompt, in the engine.

    python -m bench.nchoices [--rounds 3] [--n 8] [--prompt-tokens 512] [--new-tokens 32] [--threads 2]

The headline model (6 layers, width 384, random weights, context 1024), one prompt of `--prompt-tokens`
tokens, `--n` sampled choices of `--new-tokens` tokens each (temperature 1, seed s). Two ways, alternating
within each round so load from other processes falls on both:

- `shared`: one request with n choices (the prompt prefilled once, its keys copied into n slots);
- `separate`: n requests submitted at once, request i with seed s + i (the prefix cache off, so each prefills).

Both give the same tokens (choice i is sampled with seed s + i: the bench checks it). Figures: the time until
every choice has its first token and until every choice is done, the prompt tokens run through the model, and
the separate/shared ratios of the times, per round (their median is the result).

Left out: HTTP (the routes add the same per-token cost either way), the prefix cache (with it on, separate
requests arriving later would hit it; arriving together they all miss, as here), and any GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, summary, write_result


async def _collect(tickets: list, t0: float) -> tuple[list[list[int]], float, float]:
    """(token ids per ticket, seconds until every ticket's first token, seconds until every ticket is done)."""
    from pocketgpt.app.engine.types import TokenEvent

    queues = {id(t.queue): t.queue for t in tickets}  # shared (n choices) or one per request
    ids: dict[tuple[int, int], list[int]] = {}
    firsts: dict[tuple[int, int], float] = {}
    left = len(tickets)
    while left:
        for key, q in queues.items():
            while not q.empty():
                event = q.get_nowait()
                k = (key, event.choice)
                if isinstance(event, TokenEvent):
                    ids.setdefault(k, []).append(event.id)
                    firsts.setdefault(k, time.perf_counter() - t0)
                else:
                    left -= 1
        await asyncio.sleep(0.001)
    done = time.perf_counter() - t0
    ordered = [ids[(id(t.queue), t.choice)] for t in tickets]
    return ordered, max(firsts.values()), done


def _run(engine, request, n: int, shared: bool) -> dict[str, Any]:
    from dataclasses import replace

    async def go() -> tuple[list[list[int]], float, float]:
        t0 = time.perf_counter()
        if shared:
            tickets = engine.submit_choices(request, n)
        else:
            tickets = [engine.submit(replace(request, seed=request.seed + i)) for i in range(n)]
        return await _collect(tickets, t0)

    before = engine.prefill_tokens
    ids, first, done = asyncio.run(go())
    return {"ids": ids, "all_first_token_s": first, "all_done_s": done,
            "prefill_tokens": engine.prefill_tokens - before}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nchoices", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "nchoices.json")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from bench.common import CORPUS, SHAKESPEARE, cached_bench_tokenizer, headline_config, machine_info, make_checkpoint
    from pocketgpt.app.engine.engine import Engine
    from pocketgpt.app.engine.types import GenRequest
    from pocketgpt.model.checkpoint import load_checkpoint
    from pocketgpt.model.sampling import SamplingParams

    tokenizer = cached_bench_tokenizer(args.work)
    cfg = headline_config(block_size=1024, vocab_size=max(8192, tokenizer.vocab_size))
    checkpoint = make_checkpoint(args.work / "engine-random-1024", cfg, tokenizer)
    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else "".join(CORPUS) * 400
    prompt = tokenizer.encode(text[: args.prompt_tokens * 8])[: args.prompt_tokens]
    request = GenRequest(prompt, args.new_tokens, SamplingParams(temperature=1.0), seed=1234)
    machine = machine_info(args.threads, "cpu")
    engine = Engine(load_checkpoint(checkpoint), max_running=args.n, max_queue=args.n, prefix_cache_slots=0).start()
    try:
        _run(engine, GenRequest(prompt[:16], 2), 1, shared=True)  # warm-up
        rounds = []
        for r in range(args.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            got = {("shared" if s else "separate"): _run(engine, request, args.n, s) for s in order}
            if got["shared"].pop("ids") != got["separate"].pop("ids"):
                print("shared and separate choices differ", file=sys.stderr)
                return 1
            rounds.append(got)
            print(got, flush=True)
    finally:
        engine.stop()
    record: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "python -m bench.nchoices " + " ".join(argv or []),
        "model": cfg.to_dict(), "machine": machine, "n": args.n, "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens, "rounds": rounds, "same_tokens": True,
    }
    for way in ("shared", "separate"):
        record[way] = {k: summary([r[way][k] for r in rounds])
                       for k in ("all_first_token_s", "all_done_s", "prefill_tokens")}
    record["separate_over_shared"] = {
        k: summary([r["separate"][k] / r["shared"][k] for r in rounds]) for k in ("all_first_token_s", "all_done_s")}
    record["load_average_after"] = os.getloadavg()
    write_result(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
