"""The speculative-decoding section of `python -m bench.engine`: batch-1 decode with n-gram drafts.

Code continuations (prompts cut from the standard library's sources) and prose (Tiny Shakespeare), each
decoded by the same engine model greedily with speculation off and on, plus a run whose drafts always miss (a
drafter proposing tokens the model never picks: the cost where drafts cannot help), and code decoded with
temperature 0.7 (drafts verified by sampling; same seed, same tokens). The variants run interleaved, one
request each in turn, in a rotating order, over many short rounds, so a change in the machine's load hits them
alike; every figure is a median over rounds of a ratio taken within one round.

The primary figure is tokens per CPU second of the whole process (`time.process_time`, torch pinned to one
thread so no thread spins waiting for another): on a shared, loaded machine wall time mostly measures the other
tenants, CPU time what the decode itself cost. Wall-time ratios are recorded beside it. Decode time runs from
the first token to the last (prefill left out). `verify_cost`: the CPU time of one cached forward over 1 + k
positions (the verify step of a k-token draft) over a one-position decode step, same model, interleaved.

What this leaves out: the weights are random, and a random model's greedy output soon repeats itself, which
n-gram drafts predict well whatever the prompt; a trained model continuing code repeats less, so the code and
prose gains here are an upper bound, and the always-miss run is the honest lower bound. Batch 1 only: with
many rows a step is no longer memory-bound and drafts pay less. Single-thread CPU; a GPU's verify step costs
nearly the same as a decode step, which favours speculation.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sysconfig
import time
from pathlib import Path
from typing import Any

from bench.common import CORPUS, SHAKESPEARE, summary
from bench.engine import _engine
from pocketgpt.app.engine.speculate import NgramDrafter

GREEDY, SAMPLED = 0.0, 0.7


class MissingDrafter(NgramDrafter):
    """Drafts of the right length that the model never accepts (tokens it has not produced)."""

    def propose(self, limit: int) -> list[int]:
        if self._paused > 0:  # the adaptive pause applies as it does to real drafts
            return super().propose(limit)
        draft = super().propose(limit)
        return [(t + 1) % 256 + 1 for t in draft] if draft else [1] * min(self.k, limit)


def _prompts(tokenizer, n_prompts: int, n_tokens: int) -> dict[str, list[list[int]]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    code = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in
                     [root / "textwrap.py", root / "json" / "decoder.py", root / "shlex.py"] if p.is_file())
    prose = SHAKESPEARE.read_text(encoding="utf-8")[:200_000] if SHAKESPEARE.is_file() else "".join(CORPUS) * 50
    out = {}
    for name, text in (("code", code or "".join(CORPUS) * 50), ("prose", prose)):
        ids = tokenizer.encode(text)
        step = max(1, (len(ids) - n_tokens) // n_prompts)
        out[name] = [ids[i * step : i * step + n_tokens] for i in range(n_prompts)]
    return out


def _decode(engine, prompt: list[int], n: int, temperature: float, seed: int = 0) -> tuple[list[int], float, float]:
    """(tokens, decode wall seconds, decode process-CPU seconds) of one request, first token to last."""
    from pocketgpt.app.engine.types import GenRequest, TokenEvent
    from pocketgpt.model.sampling import SamplingParams

    async def run() -> tuple[list[int], float, float]:
        ticket = engine.submit(GenRequest(prompt, n, SamplingParams(temperature=temperature), seed=seed))
        ids: list[int] = []
        first = last = (0.0, 0.0)
        while isinstance(event := await ticket.queue.get(), TokenEvent):
            last = (time.perf_counter(), time.process_time())
            if not ids:
                first = last
            ids.append(event.id)
        return ids, last[0] - first[0], last[1] - first[1]

    return asyncio.run(run())


def _verify_cost(model, widths: tuple[int, ...], rounds: int) -> dict[str, Any]:
    """CPU ms of one cached forward over each width at position 256 (interleaved), and each over width 1."""
    import torch

    from pocketgpt.model.kv_cache import KVCache

    cache = KVCache.for_model(model, n_slots=1, max_len=512)
    cpu: dict[int, list[float]] = {w: [] for w in widths}
    with torch.inference_mode():
        model.forward_cached(torch.ones(1, 256, dtype=torch.long), cache, [0], [0])
        for _ in range(rounds):
            for w in widths:
                idx = torch.ones(1, w, dtype=torch.long)
                t0 = time.process_time()
                model.forward_cached(idx, cache, [0], [256], last_only=False)
                cpu[w].append(time.process_time() - t0)
    base = statistics.median(cpu[1])
    return {"cpu_ms": {str(w): 1e3 * statistics.median(v) for w, v in cpu.items()},
            "over_width_1": {str(w): statistics.median(v) / base for w, v in cpu.items()}}


def _counts(metrics) -> tuple[float, float]:
    return metrics.spec_draft_tokens._value.get(), metrics.spec_accepted_tokens._value.get()


def spec_section(checkpoint: Path, tokenizer, rounds: int, new_tokens: int = 96, k: int = 4,
                 n_prompts: int = 3) -> dict[str, Any]:
    """Run the section (see the module docstring); `rounds` passes over every prompt."""
    import torch

    from pocketgpt.app.metrics import Metrics

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg()
    prompts = _prompts(tokenizer, n_prompts, 200)
    metrics = {"spec": Metrics(), "miss": Metrics()}
    engines = {"plain": _engine(checkpoint, max_running=4),
               "spec": _engine(checkpoint, max_running=4, spec_tokens=k, metrics=metrics["spec"]),
               "miss": _engine(checkpoint, max_running=4, spec_tokens=k, drafter=MissingDrafter,
                               metrics=metrics["miss"])}
    # Each case: (prompt kind, temperature, the variants compared with "plain").
    cases = {"code": ("code", GREEDY, ("spec", "miss")), "prose": ("prose", GREEDY, ("spec", "miss")),
             "code_sampled": ("code", SAMPLED, ("spec",))}
    try:
        for e in engines.values():
            _decode(e, prompts["code"][0][:32], 16, GREEDY)  # warm-up
        out: dict[str, Any] = {"k_max": k, "new_tokens": new_tokens, "prompt_tokens": 200, "rounds": rounds,
                               "torch_threads": 1, "started": started, "load_average_before": load_before,
                               "figure": "tok/s per process CPU second (wall-time ratios beside it)"}
        for case, (kind, temp, variants) in cases.items():
            names = ("plain", *variants)
            before = {name: _counts(m) for name, m in metrics.items()}
            identical = True
            cpu: dict[str, list[float]] = {n: [] for n in names}
            wall: dict[str, list[float]] = {n: [] for n in names}
            for r in range(rounds):
                for i, p in enumerate(prompts[kind]):
                    order = names[r % len(names):] + names[: r % len(names)]  # rotate who runs first
                    got = {n: _decode(engines[n], p, new_tokens, temp, seed=i) for n in order}
                    identical &= got["spec"][0] == got["plain"][0]
                    for n in names:
                        cpu[n].append((len(got[n][0]) - 1) / got[n][2])
                        wall[n].append((len(got[n][0]) - 1) / got[n][1])
            out[case] = {"temperature": temp, "identical_tokens": identical,
                         "tok_per_cpu_s": {n: summary(v) for n, v in cpu.items()}}
            for n in variants:
                out[case][f"{n}_over_plain"] = summary([a / b for a, b in zip(cpu[n], cpu["plain"], strict=True)])
                out[case][f"{n}_over_plain_wall"] = summary([a / b for a, b in zip(wall[n], wall["plain"],
                                                                                    strict=True)])
                drafted, accepted = (a - b for a, b in zip(_counts(metrics[n]), before[n], strict=True))
                out[case][f"{n}_accepted_over_drafted"] = accepted / max(1.0, drafted)
        out["verify_cost"] = _verify_cost(engines["plain"].runner.model, (1, 2, 3, 5), 20 * rounds)
        out["load_average_after"] = os.getloadavg()
        return out
    finally:
        for e in engines.values():
            e.stop()
        torch.set_num_threads(threads)
