"""The speculative-decoding section of `python -m bench.engine`: greedy batch-1 decode with n-gram drafts.

Code continuations (prompts cut from the standard library's sources) and prose (Tiny Shakespeare), each
decoded greedily by the same engine model with speculation off and on (same round, alternating), plus a run
whose drafts always miss (a drafter proposing tokens the model never picks), which bounds what speculation
costs where it cannot help. Decode tokens/s counts the tokens after the first over the time from the first
to the last (prefill left out). The tokens with and without speculation are compared.

What this leaves out: the weights are random, and a random model's greedy output soon repeats itself, which
n-gram drafts predict well whatever the prompt; a trained model continuing code repeats less, so the code and
prose figures here are an upper bound on the gain, and the always-miss run is the honest lower bound.
"""

from __future__ import annotations

import asyncio
import sysconfig
from pathlib import Path
from typing import Any

from bench.common import CORPUS, SHAKESPEARE, summary
from bench.engine import _engine, _stream
from pocketgpt.app.engine.speculate import NgramDrafter


class MissingDrafter(NgramDrafter):
    """Drafts of the right length that the model never accepts (tokens it has not produced)."""

    def propose(self, limit: int) -> list[int]:
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


def _decode_rate(engine, prompt: list[int], n: int) -> tuple[float, list[float]]:
    _, arrivals = asyncio.run(_stream(engine, prompt, n))
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]), arrivals


def _tokens(engine, prompt: list[int], n: int) -> list[int]:
    from pocketgpt.app.engine.types import GenRequest, TokenEvent
    from pocketgpt.model.sampling import SamplingParams

    async def run() -> list[int]:
        ticket = engine.submit(GenRequest(prompt, n, SamplingParams(temperature=0.0)))
        ids = []
        while isinstance(event := await ticket.queue.get(), TokenEvent):
            ids.append(event.id)
        return ids

    return asyncio.run(run())


def spec_section(checkpoint: Path, tokenizer, rounds: int, new_tokens: int = 128, k: int = 4,
                 n_prompts: int = 3) -> dict[str, Any]:
    from pocketgpt.app.metrics import Metrics

    prompts = _prompts(tokenizer, n_prompts, 200)
    metrics = {"spec": Metrics(), "miss": Metrics()}
    engines = {"plain": _engine(checkpoint, max_running=4),
               "spec": _engine(checkpoint, max_running=4, spec_tokens=k, metrics=metrics["spec"]),
               "miss": _engine(checkpoint, max_running=4, spec_tokens=k, drafter=MissingDrafter,
                               metrics=metrics["miss"])}
    try:
        for e in engines.values():
            _decode_rate(e, prompts["code"][0][:32], 16)  # warm-up
        out: dict[str, Any] = {"k_max": k, "new_tokens": new_tokens, "prompt_tokens": 200}
        for kind, group in prompts.items():
            identical = all(_tokens(engines["plain"], p, new_tokens) == _tokens(engines["spec"], p, new_tokens)
                            for p in group)
            rates: dict[str, list[float]] = {name: [] for name in engines}
            for _ in range(rounds):
                for p in group:
                    for name, e in engines.items():
                        rates[name].append(_decode_rate(e, p, new_tokens)[0])
            out[kind] = {
                "identical_tokens": identical, "tok_s": {name: summary(v) for name, v in rates.items()},
                "spec_over_plain": summary([s / p for s, p in zip(rates["spec"], rates["plain"], strict=True)]),
                "miss_over_plain": summary([s / p for s, p in zip(rates["miss"], rates["plain"], strict=True)]),
            }
        for name, m in metrics.items():
            out[f"{name}_accepted_over_drafted"] = (m.spec_accepted_tokens._value.get()
                                                   / max(1.0, m.spec_draft_tokens._value.get()))
        return out
    finally:
        for e in engines.values():
            e.stop()
