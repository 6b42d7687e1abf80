"""The decode engine without HTTP: exactness against the model, batching invariance, chunked prefill,
cancellation, timeouts, admission limits, idling, and hot swap through EngineHolder."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.holder import EngineHolder
from pocketgpt.app.engine.types import DoneEvent, ErrorEvent, GenRequest, QueueFull, TokenEvent
from pocketgpt.app.testing import slowed
from pocketgpt.model.checkpoint import CheckpointError, load_checkpoint
from pocketgpt.model.generate import generate as model_generate
from pocketgpt.model.gpt import GPT
from pocketgpt.model.sampling import SamplingParams
from tests.conftest import make_tiny_checkpoint


@dataclass
class Outcome:
    ids: list[int]
    text: str
    done: DoneEvent | None
    error: ErrorEvent | None


async def run(engine: Engine, request: GenRequest) -> Outcome:
    ticket = engine.submit(request)
    ids, parts = [], []
    while True:
        event = await asyncio.wait_for(ticket.queue.get(), 30)
        if isinstance(event, TokenEvent):
            ids.append(event.id)
            parts.append(event.text)
        else:
            done = event if isinstance(event, DoneEvent) else None
            error = event if isinstance(event, ErrorEvent) else None
            return Outcome(ids, "".join(parts), done, error)


def make_engine(path: Path, **kwargs) -> Engine:
    return Engine(load_checkpoint(path), **kwargs).start()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untied embeddings: the sharpened tied model only repeats its last token, this one wanders."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("engine") / "untied", tie_embeddings=False)


@pytest.fixture(scope="module")
def engine(checkpoint: Path):
    eng = make_engine(checkpoint, max_running=16, max_queue=64, prefill_chunk=16)
    yield eng
    eng.stop()


def greedy_uncached(model: GPT, prompt: list[int], n: int, eot: int) -> list[int]:
    """The plain full-forward reference: no KV cache, no batching."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([seq]))[0][0, -1].argmax())
            out.append(tok)
            if tok == eot:
                break
            seq.append(tok)
    return out


PROMPTS = [
    "The quick brown fox", "To be, or not to be", "床前明月光", "def add(a, b):", "A journey of a thousand miles",
    "All that glitters", "class Point:", "🚀 launch", "The lazy dog", "举头望明月，低头思故乡。",
    "return a + b", "that is the question", "a single step. " * 6, "x", "白日依山尽，黄河入海流。欲穷千里目", "Hello",
]


def test_greedy_equals_uncached_reference(engine: Engine) -> None:
    async def main() -> None:
        for text in PROMPTS[:6]:
            ids = engine.tokenizer.encode(text)
            out = await run(engine, GenRequest(ids, 40, SamplingParams(temperature=0.0)))
            ref = greedy_uncached(engine.model, ids, 40, engine.eot_id)
            assert out.ids == ref, text
            assert len(set(ref)) > 3  # a real sequence, not one token repeated
            assert out.done is not None and out.done.completion_tokens == len(ref)
            assert out.text == engine.tokenizer.decode(ref)
    asyncio.run(main())


def request_mix(engine: Engine) -> list[GenRequest]:
    """16 requests with different prompts, lengths and sampling settings (greedy, seeded, penalized)."""
    rng = random.Random(0)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_k=20),
        SamplingParams(temperature=1.2, top_p=0.9),
        SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
    ]
    return [GenRequest(engine.tokenizer.encode(p), rng.randint(5, 60), params[i % len(params)], seed=100 + i)
            for i, p in enumerate(PROMPTS)]


def test_solo_sampling_equals_model_generate(engine: Engine) -> None:
    async def main() -> None:
        for req in request_mix(engine)[:6]:
            out = await run(engine, req)
            ref = model_generate(engine.model, req.prompt_ids, req.max_new_tokens, params=req.params,
                                 seed=req.seed, eos_id=engine.eot_id)
            assert [t for t in out.ids if t != engine.eot_id] == ref
    asyncio.run(main())


@pytest.mark.parametrize("max_running", [16, 3])
def test_batched_equals_solo(checkpoint: Path, max_running: int) -> None:
    """16 concurrent requests give exactly what each gives alone (3 slots: also through the waiting queue)."""
    eng = make_engine(checkpoint, max_running=max_running, max_queue=64, prefill_chunk=8)
    try:
        requests = request_mix(eng)

        async def main() -> tuple[list[Outcome], list[Outcome]]:
            solo = [await run(eng, r) for r in requests]
            steps_before = eng.steps
            together = await asyncio.gather(*(run(eng, r) for r in requests))
            # Batching really happened: far fewer steps than the tokens generated.
            assert eng.steps - steps_before < sum(len(o.ids) for o in together) / 2
            return solo, together

        solo, together = asyncio.run(main())
        for a, b in zip(solo, together, strict=True):
            assert a.done is not None and b.done is not None
            assert (a.ids, a.text, a.done.finish_reason) == (b.ids, b.text, b.done.finish_reason)
        assert len({tuple(o.ids) for o in solo}) > 8  # the requests really differ
    finally:
        eng.stop()


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(checkpoint: Path) -> None:
    eng = make_engine(checkpoint, max_running=4, prefill_chunk=8, runner=slowed(0.003))
    calls: list[tuple[int, int]] = []
    forward = eng.model.forward_cached

    def recording(idx, cache, slots, starts, **kw):
        calls.append(tuple(idx.shape))
        return forward(idx, cache, slots, starts, **kw)

    eng.model.forward_cached = recording
    try:
        long_prompt = eng.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)[:100]
        short = eng.tokenizer.encode("Hello")

        async def main() -> None:
            first = asyncio.ensure_future(run(eng, GenRequest(short, 80, SamplingParams(temperature=0.0))))
            await asyncio.sleep(0.02)
            long = await run(eng, GenRequest(long_prompt, 4, SamplingParams(temperature=0.0)))
            assert long.done is not None
            await first

        asyncio.run(main())
    finally:
        eng.stop()
    assert all(c <= 8 for _, c in calls)  # never more than the per-step budget at once
    assert len([c for _, c in calls if c == 8]) >= 100 // 8  # the long prompt went in 8-token chunks
    # Decode steps of the short request ran between the long prompt's chunks: no stall.
    chunk_calls = [i for i, (_, c) in enumerate(calls) if c == 8]
    between = [i for i, (_, c) in enumerate(calls) if c == 1 and chunk_calls[0] < i < chunk_calls[-1]]
    assert len(between) >= len(chunk_calls) - 1


def test_cancel_frees_the_slot_within_a_step(checkpoint: Path) -> None:
    eng = make_engine(checkpoint, max_running=2, runner=slowed(0.02))
    try:
        async def main() -> None:
            ticket = eng.submit(GenRequest(eng.tokenizer.encode("Hello"), 100, SamplingParams(temperature=0.0)))
            for _ in range(3):
                assert isinstance(await ticket.queue.get(), TokenEvent)
            assert eng.running == 1
            ticket.cancel()
            t0 = time.perf_counter()
            while eng.outstanding:
                await asyncio.sleep(0.005)
            assert time.perf_counter() - t0 < 0.2  # a handful of 20 ms steps at most, not the 100 tokens
            assert eng.running == 0
            out = await run(eng, GenRequest(eng.tokenizer.encode("Hi"), 3, SamplingParams(temperature=0.0)))
            assert out.done is not None

        asyncio.run(main())
    finally:
        eng.stop()


def test_timeout_fails_the_request_and_frees_the_slot(checkpoint: Path) -> None:
    eng = make_engine(checkpoint, max_running=1, runner=slowed(0.02))
    try:
        out = asyncio.run(run(eng, GenRequest(eng.tokenizer.encode("Hi"), 100, SamplingParams(temperature=0.0),
                                              timeout=0.2)))
        assert out.error is not None and out.error.status == 504 and out.error.code == "request_timeout"
        assert 3 < len(out.ids) < 100
        assert eng.outstanding == 0
    finally:
        eng.stop()


def test_admission_is_bounded(checkpoint: Path) -> None:
    eng = make_engine(checkpoint, max_running=1, max_queue=1, runner=slowed(0.02))
    try:
        async def main() -> None:
            req = GenRequest(eng.tokenizer.encode("Hi"), 50, SamplingParams(temperature=0.0))
            a, b = eng.submit(req), eng.submit(GenRequest(req.prompt_ids, 50))
            with pytest.raises(QueueFull):
                eng.submit(GenRequest(req.prompt_ids, 5))
            assert (eng.outstanding, eng.running + eng.waiting) == (2, 2)
            a.cancel()
            b.cancel()
            while eng.outstanding:
                await asyncio.sleep(0.005)
            eng.submit(GenRequest(req.prompt_ids, 1))  # room again

        asyncio.run(main())
        with pytest.raises(ValueError, match="128"):
            asyncio.run(run(eng, GenRequest([1] * 100, 29)))
    finally:
        eng.stop()


def test_idle_engine_blocks_instead_of_spinning(engine: Engine) -> None:
    asyncio.run(run(engine, GenRequest(engine.tokenizer.encode("Hi"), 3)))
    time.sleep(0.05)
    wakeups, steps = engine.wakeups, engine.steps
    time.sleep(0.3)
    assert (engine.wakeups, engine.steps) == (wakeups, steps)
    assert engine.alive


def test_holder_swap_under_load(tmp_path: Path) -> None:
    """Swap A -> B -> A while 6 clients keep requesting: no failures, in-flight requests finish on the old
    model, requests after a swap see the new one, and the old engine is stopped."""
    path_a = make_tiny_checkpoint(tmp_path / "a", seed=1, tie_embeddings=False)
    path_b = make_tiny_checkpoint(tmp_path / "b", seed=2, tie_embeddings=False)
    holder = EngineHolder(lambda p: make_engine(p, max_running=4, max_queue=64, runner=slowed(0.002)))
    prompts = PROMPTS[:6]

    async def ask(text: str) -> tuple[str, Outcome]:
        for _ in range(5):
            engine = holder.current
            try:
                out = await run(engine, GenRequest(engine.tokenizer.encode(text), 12,
                                                   SamplingParams(temperature=0.0)))
                return engine.path.name, out
            except Exception as exc:  # EngineClosed between reading current and submitting: retry
                if type(exc).__name__ != "EngineClosed":
                    raise
        raise AssertionError("could not submit")

    async def main() -> None:
        await holder.load(path_a)
        expected = {}
        for name, path in (("a", path_a), ("b", path_b)):
            solo = make_engine(path, max_running=1)
            expected[name] = {t: (await run(solo, GenRequest(solo.tokenizer.encode(t), 12,
                                                             SamplingParams(temperature=0.0)))).ids
                              for t in prompts}
            solo.stop()
        assert expected["a"] != expected["b"]
        results: list[tuple[str, str, Outcome]] = []
        stop = asyncio.Event()

        async def client(i: int) -> None:
            while not stop.is_set():
                text = prompts[i % len(prompts)]
                name, out = await ask(text)
                results.append((name, text, out))

        clients = [asyncio.ensure_future(client(i)) for i in range(6)]
        await asyncio.sleep(0.3)
        first = holder.current
        await holder.swap(path_b)
        assert not first.alive and first.model is None  # drained, stopped, released
        after_swap = len(results)
        await asyncio.sleep(0.3)
        await holder.swap(path_a)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*clients)
        assert len(results) > 30
        names = [name for name, _, _ in results]
        assert "a" in names and "b" in names
        for name, text, out in results:
            assert out.error is None and out.done is not None, out.error
            assert out.ids == expected[name][text]
        assert any(name == "b" for name, _, _ in results[after_swap:])
        # Without waiting: the new engine serves at once while a slow stream finishes on the old one.
        slow = holder.current
        ticket = slow.submit(GenRequest(slow.tokenizer.encode("Hi"), 60, SamplingParams(temperature=0.0)))
        new = await holder.swap(path_b, wait_drained=False)
        assert holder.current is new and slow in holder.engines and slow.alive
        event = await ticket.queue.get()
        while isinstance(event, TokenEvent):
            event = await asyncio.wait_for(ticket.queue.get(), 30)
        assert isinstance(event, DoneEvent)  # finished on the old engine, not failed
        while slow.alive:
            await asyncio.sleep(0.01)
        assert holder.engines == [new]
        with pytest.raises(CheckpointError):
            await holder.swap(tmp_path / "missing")
        assert holder.current is not None and holder.current.alive  # the old one keeps serving
        out = await run(holder.current, GenRequest(holder.current.tokenizer.encode("Hi"), 2))
        assert out.done is not None
        await holder.close()
        assert holder.engines == []

    asyncio.run(main())
