"""What logprobs cost the engine: decode throughput with none, one or every stream asking, and scoring a prompt.

    python -m bench.logprobs [--rounds 10] [--streams 16] [--new-tokens 64] [--out docs/benchmarks/logprobs.json]

The headline model (6 layers, 384 wide, vocab 8192, random weights), in-process. Decode: `--streams` greedy
requests of `--new-tokens` tokens at once, three sides: no request asks for logprobs; one asks (top 5); every one
asks for the most, top 20. The figure is aggregate tokens per second over the whole batch, prefill included.
Scoring: a 512-token prompt with `max_new_tokens 0` and prompt logprobs (every position's logits, log_softmax,
top 1: what `echo` + `logprobs` + `max_tokens 0` does) against the same prompt plainly prefilled with one token
generated (last-position logits only). Sides alternate within each round, a different one first each round, so
load from other processes spreads over all of them; ratios are medians of each round's ratio. Left out: the
HTTP layer and JSON encoding, and GPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import cached_bench_tokenizer, headline_config, machine_info, make_checkpoint, summary, write_result
from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.types import DoneEvent, GenRequest
from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.model.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


async def _finish(engine: Engine, request: GenRequest) -> DoneEvent:
    ticket = engine.submit(request)
    while not isinstance(event := await ticket.queue.get(), DoneEvent):
        pass
    return event


def run(engine: Engine, requests: list[GenRequest]) -> float:
    """Seconds to finish all `requests`, submitted at once."""

    async def main() -> None:
        await asyncio.gather(*(_finish(engine, r) for r in requests))

    t0 = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - t0


def decode_sides(prompts: list[list[int]], new: int) -> dict[str, list[GenRequest]]:
    def batch(ks: list[int | None]) -> list[GenRequest]:
        return [GenRequest(p, new, GREEDY, logprobs=k) for p, k in zip(prompts, ks, strict=True)]

    n = len(prompts)
    return {"none": batch([None] * n), "one_top5": batch([5] + [None] * (n - 1)), "all_top20": batch([20] * n)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/benchmarks/logprobs.json")
    args = parser.parse_args(argv)
    command = " ".join(["python -m bench.logprobs", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    started, load_before = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()
    cfg = headline_config()
    with tempfile.TemporaryDirectory() as tmp:
        tok = cached_bench_tokenizer(Path("/tmp/pocketgpt-bench"))
        engine = Engine(load_checkpoint(make_checkpoint(Path(tmp) / "ck", cfg, tok)), max_running=args.streams,
                        prefix_cache_slots=0).start()
        text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. "
        ids = tok.encode(text * 200)
        prompts = [ids[i * 7 : i * 7 + 16] for i in range(args.streams)]
        long = ids[: args.prompt_tokens]
        sides = decode_sides(prompts, args.new_tokens)
        score = {"plain_prefill": [GenRequest(long, 1, GREEDY)],
                 "prompt_logprobs": [GenRequest(long, 0, GREEDY, prompt_logprobs=1)]}
        times: dict[str, list[float]] = {name: [] for name in (*sides, *score)}
        try:
            for reqs in (*sides.values(), *score.values()):
                run(engine, reqs)  # warm-up
            order = [*sides.items(), *score.items()]
            for r in range(args.rounds):
                for name, reqs in order[r % len(order) :] + order[: r % len(order)]:  # each side leads in turn
                    times[name].append(run(engine, reqs))
        finally:
            engine.stop()
    tokens = args.streams * args.new_tokens
    rounds = range(args.rounds)
    record = {
        "bench": "logprobs", "started": started, "command": command,
        "machine": machine_info(args.threads, "cpu"), "load_average_after": os.getloadavg(),
        "load_average_before": load_before, "rounds": args.rounds,
        "model": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size},
        "decode": {
            "streams": args.streams, "new_tokens": args.new_tokens,
            "tok_s": {name: summary([tokens / t for t in times[name]]) for name in sides},
            "over_none": {name: statistics.median(times["none"][r] / times[name][r] for r in rounds)
                          for name in ("one_top5", "all_top20")},
        },
        "scoring": {
            "prompt_tokens": len(long),
            "seconds": {name: summary(times[name]) for name in score},
            "logprobs_over_plain": statistics.median(times["prompt_logprobs"][r] / times["plain_prefill"][r]
                                                     for r in rounds),
        },
    }
    write_result(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
