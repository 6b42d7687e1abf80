"""Speculative decoding with temperature > 0: the tokens are distributed exactly as without drafts.

The check is a chi-square goodness-of-fit of the first three sampled tokens (over many seeds) against their
exact distribution, computed from the model's own logits. Its power is checked too: verification rules that
are wrong (always accepting the draft; verifying with the wrong sampling parameters) must fail it.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from pathlib import Path

import pytest
import torch

from pocketgpt.app.engine import verify
from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.speculate import NgramDrafter
from pocketgpt.app.engine.types import GenRequest, TokenEvent
from pocketgpt.app.metrics import Metrics
from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.model.sampling import SamplingParams, sample
from tests.test_speculative import contextual_checkpoint

PARAMS = SamplingParams(temperature=0.05, top_k=4)  # peaked, four tokens at most per position: 64 triples
SEEDS = 600


class TableDrafter(NgramDrafter):
    """Drafts `table[generated so far]` (the likeliest continuation), so drafts are often but not always right."""

    def __init__(self, history: list[int], k_max: int, table: dict, n_prompt: int) -> None:
        super().__init__(history, k_max)
        self.table, self.n_prompt = table, n_prompt

    def propose(self, limit: int) -> list[int]:
        return self.table.get(tuple(self.history[self.n_prompt :]), [])[:limit]


def _processed(model, ids: list[int]) -> dict[int, float]:
    """The exact distribution of the token after `ids`: temperature, then top-k, as `sample` applies them."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0][0, -1].float() / PARAMS.temperature
    vals, idx = logits.topk(PARAMS.top_k)
    return dict(zip(idx.tolist(), vals.softmax(-1).tolist(), strict=True))


def _exact(model, prompt: list[int]) -> tuple[dict[tuple[int, ...], float], dict[tuple[int, ...], list[int]]]:
    """P(first three tokens), and a drafter table: after the first token, its two likeliest successors."""
    probs, table = {}, {}
    for a, pa in _processed(model, prompt).items():
        second = _processed(model, [*prompt, a])
        b_best = max(second, key=second.get)
        for b, pb in second.items():
            third = _processed(model, [*prompt, a, b])
            if b == b_best:
                table[(a,)] = [b, max(third, key=third.get)]
            for c, pc in third.items():
                probs[(a, b, c)] = pa * pb * pc
    return probs, table


def _p_value(counts: Counter, probs: dict, n: int) -> float:
    """Chi-square goodness of fit; cells expecting fewer than 5 pooled into one."""
    observed, expected, rest_o, rest_e = [], [], 0, 0.0
    for cell, p in probs.items():
        if p * n >= 5:
            observed.append(counts[cell])
            expected.append(p * n)
        else:
            rest_o, rest_e = rest_o + counts[cell], rest_e + p * n
    observed.append(rest_o + sum(v for cell, v in counts.items() if cell not in probs))  # impossible triples
    expected.append(max(rest_e, 1e-9))
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    df = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)))


async def _first_three(engine: Engine, prompt: list[int], seed: int) -> tuple[int, ...]:
    ticket = engine.submit(GenRequest(prompt, 4, PARAMS, seed=seed))  # 4: room for a two-token draft
    ids = []
    while isinstance(event := await asyncio.wait_for(ticket.queue.get(), 120), TokenEvent):
        ids.append(event.id)
    return tuple(ids[:3])


def _sampled(path: Path, prompt: list[int], table: dict) -> tuple[Counter, Metrics]:
    metrics = Metrics()
    drafter = functools.partial(TableDrafter, table=table, n_prompt=len(prompt))
    engine = Engine(load_checkpoint(path), max_running=32, max_queue=SEEDS, spec_tokens=2, drafter=drafter,
                    metrics=metrics).start()

    async def main() -> list[tuple[int, ...]]:
        return list(await asyncio.gather(*(_first_three(engine, prompt, s) for s in range(SEEDS))))

    try:
        return Counter(asyncio.run(main())), metrics
    finally:
        engine.stop()


def _always_accept(first: int, draft: list[int], picks: list[int]) -> list[int]:
    return [*draft, picks[-1]]


def _wrong_params(logits, params, generators):  # verifies at temperature 1, not the request's
    return sample(logits, [SamplingParams(temperature=1.0, top_k=4)] * len(params), generators)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int], dict, dict]:
    path = contextual_checkpoint(tmp_path_factory.mktemp("spec") / "ck")
    ck = load_checkpoint(path)
    prompt = ck.tokenizer.encode("To be, or not to be, that is")
    probs, table = _exact(ck.model.eval(), prompt)
    return path, prompt, probs, table


def test_sampled_tokens_with_drafts_follow_the_exact_distribution(setup) -> None:
    path, prompt, probs, table = setup
    counts, metrics = _sampled(path, prompt, table)
    accepted, drafted = metrics.spec_accepted_tokens._value.get(), metrics.spec_draft_tokens._value.get()
    assert 0.2 * drafted < accepted < 0.8 * drafted  # both branches (accept, reject) ran many times
    assert _p_value(counts, probs, SEEDS) > 1e-3


@pytest.mark.parametrize("wrong", ["always_accept", "wrong_params"])
def test_the_distribution_check_catches_a_wrong_rule(setup, monkeypatch: pytest.MonkeyPatch, wrong: str) -> None:
    path, prompt, probs, table = setup
    if wrong == "always_accept":
        monkeypatch.setattr(verify, "accept", _always_accept)
    else:
        monkeypatch.setattr(verify, "sample", _wrong_params)
    counts, _ = _sampled(path, prompt, table)
    assert _p_value(counts, probs, SEEDS) < 1e-6
