"""Engine v2 benchmarks, in-process (no HTTP): long-prompt prefill and the prefix cache.

    python -m bench.engine                          # both sections -> docs/benchmarks/engine.json
    python -m bench.engine --only long --rounds 3

`long`: time to first token of a ~1,000-token prompt with nothing else running, against one plain forward of
the same model over the same tokens (`GPT.forward`, no cache, the training layout: the engine's inference
layout runs faster), measured alternately in the same rounds; the
engine as it is (a lone prompt in one chunk), with 256-token chunks, and with 16-token chunks (the old CPU
rule). Then the interference bound: 16 greedy streams decode; once each has 8 tokens a 512-token prompt
arrives; the streams' inter-token p99 with it over the same streams' p99 without it (same round).

`spec`: batch-1 decode with n-gram speculative decoding on and off (greedy code and prose, drafts that always
miss, sampled code), interleaved, in tokens per process CPU second on one thread (see `bench/engine_spec.py`).

`prefix`: a 1,024-token shared prefix plus a 16-token suffix, time to first token on a prefix-cache hit
against a miss (same engine, alternating); and 16 chat-like streams sharing a 512-token system prompt,
aggregate tokens/s and TTFT p50/p99 with the cache on and off.

What this leaves out: HTTP and SSE (see `python -m bench --only serve` for the served path), other hardware,
trained weights (random 6x384 GPT-2-layout weights; speed does not depend on them, but how often n-gram
drafts land does: `--checkpoint RUN/best --only spec --json J --markdown M` measures speculation on a trained
model, with its own tokenizer cutting the prompts). The machine is shared:
every figure is a ratio of two things measured in the same run, and the load average is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TRAINED_SPEC = ROOT / "docs" / "benchmarks" / "engine-spec-trained.json"  # --checkpoint ... --only spec


def _engine(checkpoint: Path, **kwargs: Any):
    from pocketgpt.app.engine.engine import Engine
    from pocketgpt.model.checkpoint import load_checkpoint

    return Engine(load_checkpoint(checkpoint), **kwargs).start()


async def _stream(engine, prompt: list[int], n: int, on_token=None) -> tuple[float, list[float]]:
    """(time to first token, token arrival times) of one greedy request."""
    from pocketgpt.app.engine.types import GenRequest, TokenEvent
    from pocketgpt.model.sampling import SamplingParams

    t0 = time.perf_counter()
    ticket = engine.submit(GenRequest(prompt, n, SamplingParams(temperature=0.0)))
    arrivals: list[float] = []
    while isinstance(await ticket.queue.get(), TokenEvent):
        arrivals.append(time.perf_counter())
        if on_token is not None:
            on_token(arrivals)
    return arrivals[0] - t0, arrivals


def _ttft(engine, prompt: list[int]) -> float:
    return asyncio.run(_stream(engine, prompt, 1))[0]


def _forward_s(model, prompt: list[int]) -> float:
    import torch

    idx = torch.tensor([prompt])
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(idx)
        return time.perf_counter() - t0


def _gaps(arrivals: list[float], lo: float = 0.0, hi: float = float("inf")) -> list[float]:
    return [b - a for a, b in itertools.pairwise(arrivals) if b > lo and a < hi]


async def _interference(engine, prompts: list[list[int]], n: int, long: list[int] | None) -> dict[str, Any]:
    from bench.common import pct

    started: dict[int, list[float]] = {}
    window: list[float] = []
    long_task: list[asyncio.Task] = []

    def watcher(i: int):
        def on_token(arrivals: list[float]) -> None:
            started[i] = arrivals
            if long is None or long_task or len(started) < len(prompts):
                return
            if all(len(a) >= 8 for a in started.values()):
                window.append(time.perf_counter())
                long_task.append(asyncio.ensure_future(_stream(engine, long, 4)))
        return on_token

    results = await asyncio.gather(*(_stream(engine, p, n, watcher(i)) for i, p in enumerate(prompts)))
    gaps = [g for _, a in results for g in _gaps(a)]
    out = {"itl_p50_ms": pct(gaps, 50) * 1e3, "itl_p99_ms": pct(gaps, 99) * 1e3}
    if long_task:
        ttft, arrivals = await long_task[0]
        during = [g for _, a in results for g in _gaps(a, window[0], arrivals[0])]
        out.update(long_ttft_ms=ttft * 1e3, itl_during_prefill_max_ms=max(during) * 1e3 if during else None,
                   itl_during_prefill_p99_ms=pct(during, 99) * 1e3)
    return out


def long_section(checkpoint: Path, tokenizer, rounds: int, n_prompt: int, new_tokens: int) -> dict[str, Any]:
    from bench.common import summary
    from bench.serve import long_prompt
    from pocketgpt.model.checkpoint import load_checkpoint

    prompt = tokenizer.encode(long_prompt(tokenizer, n_prompt))[:n_prompt]
    model = load_checkpoint(checkpoint).model.eval()
    variants = {"engine": None, "chunks_256": 256, "chunks_16": 16}
    engines = {k: _engine(checkpoint, max_running=16, lone_prefill_chunk=v) for k, v in variants.items()}
    times: dict[str, list[float]] = {"forward": [], **{k: [] for k in variants}}
    try:
        for e in engines.values():
            _ttft(e, prompt[:64])  # warm-up
        _forward_s(model, prompt[:64])
        for _ in range(rounds):
            times["forward"].append(_forward_s(model, prompt))
            for k, e in engines.items():
                times[k].append(_ttft(e, prompt))
        out: dict[str, Any] = {"prompt_tokens": len(prompt), "ttft_s": {k: summary(v) for k, v in times.items()}}
        out["ttft_over_forward"] = {k: summary([t / f for t, f in zip(times[k], times["forward"], strict=True)])
                                    for k in variants}
        # The interference bound, with the engine as it is.
        eng = engines["engine"]
        shorts = [tokenizer.encode(p) for p in _SHORT]
        runs: dict[str, list] = {"without": [], "with": []}
        for _ in range(rounds):
            runs["without"].append(asyncio.run(_interference(eng, shorts, new_tokens, None)))
            runs["with"].append(asyncio.run(_interference(eng, shorts, new_tokens, prompt[:512])))
        out["interference"] = {
            "streams": len(shorts), "long_prompt_tokens": 512, "raw": runs,
            "p99_ratio": summary([w["itl_p99_ms"] / o["itl_p99_ms"]
                                  for w, o in zip(runs["with"], runs["without"], strict=True)]),
        }
        return out
    finally:
        for e in engines.values():
            e.stop()


_SHORT = [
    "First Citizen:", "You are all resolved rather to die than to famish?", "ROMEO:", "What light through yonder",
    "Now is the winter of our discontent", "KING RICHARD III:", "O, pardon me, thou bleeding piece of earth",
    "To be, or not to be", "Friends, Romans, countrymen,", "MENENIUS:", "Good morrow, cousin.", "JULIET:",
    "A horse! a horse!", "All the world's a stage,", "Once more unto the breach,", "HAMLET:",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=("long", "prefix", "spec"), default=["long", "prefix", "spec"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=96, help="tokens per stream in the interference runs")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks" / "engine.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks" / "engine.md")
    p.add_argument("--checkpoint", type=Path, help="measure this checkpoint (a trained model, with its own "
                   "tokenizer) instead of the random 6x384 one; give --json and --markdown of its own")
    p.add_argument("--note", default="", help="how the --checkpoint was made, for the report")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from bench.common import cached_bench_tokenizer, headline_config, machine_info, make_checkpoint

    args.work.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is not None:
        from pocketgpt.model.checkpoint import load_checkpoint

        checkpoint = args.checkpoint
        loaded = load_checkpoint(checkpoint)  # for its tokenizer and config; each engine loads its own copy
        tokenizer, cfg = loaded.tokenizer, loaded.config
    else:
        tokenizer = cached_bench_tokenizer(args.work)
        cfg = headline_config(block_size=2048, vocab_size=max(8192, tokenizer.vocab_size))
        checkpoint = make_checkpoint(args.work / "engine-random-2048", cfg, tokenizer)
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "model": cfg.to_dict(),
                               "weights": (args.note or str(args.checkpoint)) if args.checkpoint else "random weights",
                               "machine": machine_info(args.threads, "cpu"), "rounds": args.rounds, "sections": {}}
    previous = json.loads(args.json.read_text()) if args.json.is_file() else None
    if previous is not None:  # keep the other sections' last results (and the run facts that describe them)
        results["sections"] = previous.get("sections", {})
    if "long" in args.only:
        print("== long prompt", flush=True)
        results["sections"]["long"] = long_section(checkpoint, tokenizer, args.rounds, 1000, args.new_tokens)
        print(json.dumps({k: v["median"] for k, v in results["sections"]["long"]["ttft_over_forward"].items()}))
        print(json.dumps(results["sections"]["long"]["interference"]["p99_ratio"]["median"]))
    if "prefix" in args.only:
        from bench.engine_prefix import prefix_section

        print("== prefix cache", flush=True)
        results["sections"]["prefix"] = prefix_section(checkpoint, tokenizer, args.rounds)
    if "spec" in args.only:
        from bench.engine_spec import spec_section

        print("== speculative decoding", flush=True)
        results["sections"]["spec"] = spec_section(checkpoint, tokenizer, args.rounds)
    results["load_average_after"] = os.getloadavg()
    if previous is not None and set(args.only) == {"spec"}:
        # The spec section records its own run (time, threads, rounds, load); the top level stays the others'.
        results.update({k: previous[k] for k in ("started", "machine", "rounds", "load_average_after")
                        if k in previous})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    args.markdown.write_text(report(results, args.json))
    print(f"results: {args.json}, {args.markdown}")
    return 0


def spec_rows(sp: dict[str, Any]) -> list[str]:
    """The speculative-decoding rows of the markdown table (the section carries its own run conditions)."""
    from bench.common import fmt

    if "code_sampled" not in sp:  # a result from before the interleaved CPU-time measurement
        return []
    lines = [f"| *speculative decoding, batch 1, k <= {sp['k_max']}, {sp['new_tokens']} new tokens: tokens per "
             f"process CPU second (wall-time ratio after it), {sp['torch_threads']} torch thread, {sp['rounds']} "
             f"interleaved rounds; load average {sp['load_average_before'][0]:.1f} before, "
             f"{sp['load_average_after'][0]:.1f} after* | |"]
    for case, what in (("code", "greedy, code"), ("prose", "greedy, prose"), ("code_sampled", "temperature "
                                                                                         "0.7, code")):
        c = sp[case]
        lines.append(f"| {what}: with n-gram speculation / without (same tokens: {c['identical_tokens']}; "
                     f"accepted / drafted {c['spec_accepted_over_drafted']:.2f}) | {fmt(c['spec_over_plain'], 2)} "
                     f"(wall {fmt(c['spec_over_plain_wall'], 2)}) |")
        if "miss_over_plain" in c:
            lines.append(f"| {what}: drafts that always miss / without | {fmt(c['miss_over_plain'], 2)} "
                         f"(wall {fmt(c['miss_over_plain_wall'], 2)}) |")
    cost = sp["verify_cost"]["over_width_1"]
    lines.append("| CPU time of one verify forward over 1 + k positions / a one-position decode step, k = 1, 2, 4 | "
                 + " / ".join(f"{cost[w]:.2f}" for w in ("2", "3", "5")) + " |")
    return lines


def report(results: dict[str, Any], source: Path) -> str:
    """The results as a short markdown page (every figure: median (min-max) over rounds)."""
    from bench.common import fmt

    m = results["machine"]
    src = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    lines = [
        "# Engine benchmarks", "",
        f"Generated by `python -m bench.engine` from `{src}`"
        f" ({results['started']}); {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}; load average"
        f" {m['load_average'][0]:.1f} before, {results['load_average_after'][0]:.1f} after (a shared machine:"
        f" compare the ratios, each within one round). Model: {_model(results)}, in-process engine."
        f" Median (min-max) over {results['rounds']} rounds.", "",
        "| what | figure |", "| --- | --: |",
    ]
    sec = results["sections"]
    if "long" in sec:
        long = sec["long"]
        n = long["prompt_tokens"]
        lines += [
            f"| TTFT of a {n}-token prompt, nothing else running / one plain forward of it | "
            f"{fmt(long['ttft_over_forward']['engine'], 2)} |",
            f"| the same, prompt cut in 256-token chunks (`lone_prefill_chunk=256`) | "
            f"{fmt(long['ttft_over_forward']['chunks_256'], 2)} |",
            f"| the same, 16-token chunks (the engine before) | {fmt(long['ttft_over_forward']['chunks_16'], 2)} |",
            f"| one plain forward of the prompt, seconds | {fmt(long['ttft_s']['forward'], 2)} |",
            f"| 16 streams' inter-token p99 with / without a 512-token prompt arriving | "
            f"{fmt(long['interference']['p99_ratio'], 2)} |",
        ]
    if "prefix" in sec:
        sp, chat = sec["prefix"]["shared_prefix"], sec["prefix"]["chat"]
        lines += [
            f"| 1,024-token shared prefix + 16-token suffix: TTFT miss / hit | {fmt(sp['miss_over_hit'], 1)} |",
            f"| TTFT on a miss / on a hit, seconds | {fmt(sp['ttft_miss_s'], 3)} / {fmt(sp['ttft_hit_s'], 3)} |",
            f"| {chat['streams']} streams sharing a {chat['system_tokens']}-token system prompt: aggregate tok/s, "
            f"cache on / off | {fmt(chat['aggregate_tok_s']['on'])} / {fmt(chat['aggregate_tok_s']['off'])} |",
            f"| their TTFT p50 ms, on / off | {fmt(chat['ttft_p50_ms']['on'])} / {fmt(chat['ttft_p50_ms']['off'])} |",
            f"| their TTFT p99 ms, on / off | {fmt(chat['ttft_p99_ms']['on'])} / {fmt(chat['ttft_p99_ms']['off'])} |",
        ]
    if "spec" in sec:
        lines += spec_rows(sec["spec"])
    own = source.resolve() == TRAINED_SPEC
    trained = json.loads(TRAINED_SPEC.read_text()) if TRAINED_SPEC.is_file() and not own else None
    if trained is not None and "spec" in trained["sections"]:
        lines += [f"| **the same on a trained model** ({_model(trained)}; `{TRAINED_SPEC.relative_to(ROOT)}`) | |",
                  *spec_rows(trained["sections"]["spec"])]
    lines += ["", "Left out: HTTP and SSE (`python -m bench --only serve` measures the served path), other hardware "
              "and, except in the trained-model rows, trained weights (speed does not depend on the weights' "
              "values, but how often n-gram drafts land does: a random model's greedy output soon repeats).", ""]
    return "\n".join(lines)


def _model(results: dict[str, Any]) -> str:
    m = results["model"]
    layout = "GPT-2 layout" if m.get("positions") == "learned" else "modern layout"
    return (f"{m['n_layer']}x{m['n_embd']} {layout}, vocab {m['vocab_size']}, context {m['block_size']}, "
            f"{results.get('weights', 'random weights')}")


if __name__ == "__main__":
    sys.exit(main())
