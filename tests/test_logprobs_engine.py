"""Logprobs inside the engine (no HTTP): sampled tokens' and prompt tokens' log-probabilities against the model
run directly, with chunked prefill, the prefix cache, speculation and other requests in the batch."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.grammar import GrammarSpec
from pocketgpt.app.engine.speculate import may_draft
from pocketgpt.app.engine.types import DoneEvent, GenRequest, Logprob, PromptEvent, TokenEvent
from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.model.sampling import SamplingParams
from tests.conftest import make_tiny_checkpoint

GREEDY = SamplingParams(temperature=0.0)


@dataclass
class Result:
    ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob | None] = field(default_factory=list)
    prompt: tuple[Logprob | None, ...] | None = None
    done: DoneEvent | None = None


async def collect(engine: Engine, request: GenRequest) -> Result:
    ticket, out = engine.submit(request), Result()
    while True:
        event = await asyncio.wait_for(ticket.queue.get(), 30)
        if isinstance(event, TokenEvent):
            out.ids.append(event.id)
            out.logprobs.append(event.logprob)
        elif isinstance(event, PromptEvent):
            assert not out.ids and out.prompt is None  # once, before any token
            out.prompt = event.logprobs
        else:
            assert isinstance(event, DoneEvent), event
            out.done = event
            return out


def reference(engine: Engine, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of `ids`, one full forward (no cache)."""
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids]))[0][0]
    return logits.float().log_softmax(-1)


def assert_matches(entry: Logprob, ref: torch.Tensor, token: int, k: int) -> None:
    """`entry` (the token at some position, and its top k) against that position's reference row."""
    assert entry.token == token
    assert abs(entry.logprob - float(ref[token])) < 1e-4
    assert len(entry.top) == k
    vals, ids = ref.topk(k)
    for (tid, lp), rid, rv in zip(entry.top, ids.tolist(), vals.tolist(), strict=True):
        assert abs(lp - rv) < 1e-4 and (tid == rid or abs(float(ref[tid]) - rv) < 1e-4)  # ties may swap ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("lp") / "ck", tie_embeddings=False, block_size=256)


@pytest.fixture(scope="module")
def engine(checkpoint: Path):
    # Small chunks (16) so prompts are prefilled in several chunks; a prefix cache that the same prompts warm.
    eng = Engine(load_checkpoint(checkpoint), max_running=8, prefill_chunk=16, lone_prefill_chunk=16,
                 prefix_cache_slots=2.0, spec_tokens=3).start()
    yield eng
    eng.stop()


def prompt_ids(engine: Engine) -> list[int]:
    return engine.tokenizer.encode("To be, or not to be, that is the question. 床前明月光，疑是地上霜。 " * 2)


def test_greedy_logprobs_equal_log_softmax_of_the_model(engine: Engine) -> None:
    prompt = prompt_ids(engine)
    out = asyncio.run(collect(engine, GenRequest(prompt, 12, GREEDY, logprobs=5)))
    ref = reference(engine, prompt + out.ids)
    assert len(out.logprobs) == len(out.ids) == 12
    for j, (token, entry) in enumerate(zip(out.ids, out.logprobs, strict=True)):
        row = ref[len(prompt) - 1 + j]
        assert token == int(row.argmax())  # greedy: the most likely token, so also the top-1 alternative
        assert_matches(entry, row, token, 5)
        assert entry.top[0][0] == token


def test_prompt_logprobs_are_exact_despite_chunks_and_a_warm_prefix_cache(engine: Engine) -> None:
    prompt = prompt_ids(engine)
    assert len(prompt) > 3 * 16  # several chunks, and whole blocks the prefix cache can hold

    async def main() -> tuple[Result, Result]:
        warm = await collect(engine, GenRequest(prompt, 2, GREEDY))  # stores the prompt's blocks
        assert warm.prompt is None and warm.logprobs == [None, None]
        again = await collect(engine, GenRequest(prompt, 2, GREEDY))
        assert again.done is not None and again.done.cached_tokens > 0  # the cache would serve this prompt
        return again, await collect(engine, GenRequest(prompt, 3, GREEDY, logprobs=2, prompt_logprobs=2))

    plain, scored = asyncio.run(main())
    assert scored.done is not None and scored.done.cached_tokens == 0  # computed in full, not from the cache
    assert scored.ids[:2] == plain.ids
    ref = reference(engine, prompt)
    assert scored.prompt is not None and len(scored.prompt) == len(prompt) and scored.prompt[0] is None
    for i in range(1, len(prompt)):
        assert_matches(scored.prompt[i], ref[i - 1], prompt[i], 2)


def test_scoring_a_prompt_with_no_new_tokens(engine: Engine) -> None:
    prompt = prompt_ids(engine)[:20]
    out = asyncio.run(collect(engine, GenRequest(prompt, 0, GREEDY, prompt_logprobs=0)))
    assert out.ids == [] and out.done is not None
    assert out.done.completion_tokens == 0 and out.done.finish_reason == "length"
    ref = reference(engine, prompt)
    total = sum(e.logprob for e in out.prompt[1:])
    expected = float(ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].sum())
    assert abs(total - expected) < 1e-3
    with pytest.raises(ValueError, match="prompt_logprobs"):
        engine.submit(GenRequest(prompt, 0, GREEDY))


def test_a_request_with_logprobs_does_not_change_its_batch(engine: Engine) -> None:
    texts = ["The quick brown fox", "def add(a, b):", "床前明月光", "All that glitters", "🚀 launch"]
    prompts = [engine.tokenizer.encode(t) for t in texts]
    sampled = SamplingParams(temperature=0.9, top_k=40)

    def request(i: int, lp: bool) -> GenRequest:
        extra = {"logprobs": 3, "prompt_logprobs": 1} if lp else {}
        return GenRequest(prompts[i], 16, GREEDY if i % 2 else sampled, seed=i, **extra)

    async def main() -> tuple[list[Result], list[Result], list[Result]]:
        alone = [await collect(engine, request(i, False)) for i in range(len(texts))]
        mixed = await asyncio.gather(*(collect(engine, request(i, i in (1, 2))) for i in range(len(texts))))
        scored = await asyncio.gather(*(collect(engine, request(i, True)) for i in range(len(texts))))
        return alone, mixed, scored

    alone, mixed, scored = asyncio.run(main())
    assert [r.ids for r in mixed] == [r.ids for r in alone] == [r.ids for r in scored]
    assert all(r.logprobs[0] is not None and r.prompt is not None for r in scored)
    assert mixed[0].logprobs[0] is None and mixed[1].logprobs[0] is not None
    # Each token's logprob is the same whether its request ran with others asking or all asking.
    assert [e.logprob for e in mixed[1].logprobs] == pytest.approx([e.logprob for e in scored[1].logprobs], abs=1e-5)


def test_constrained_rows_report_the_raw_distribution_and_logprob_rows_do_not_draft(engine: Engine) -> None:
    prompt = prompt_ids(engine)[:24]
    constraint = engine.grammars.constraint(GrammarSpec("regex", "[0-9]{6}"))
    request = GenRequest(prompt, 10, GREEDY, logprobs=3, constraint=constraint)
    assert not may_draft(request) and may_draft(GenRequest(prompt, 10, GREEDY))  # the engine drafts (spec_tokens)
    assert not may_draft(GenRequest(prompt, 10, GREEDY, logprobs=0))
    out = asyncio.run(collect(engine, request))
    text = engine.tokenizer.decode(out.ids)
    assert text.isdigit() and len(text) == 6  # the grammar held
    ref = reference(engine, prompt + out.ids)
    for j, (token, entry) in enumerate(zip(out.ids, out.logprobs, strict=True)):
        # Not the masked distribution (where the chosen digit would be the top-1 with all the mass): the model's.
        assert_matches(entry, ref[len(prompt) - 1 + j], token, 3)
