"""The prefix cache: exact block matching, bounded LRU memory, exact outputs, metrics and OpenAI usage."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch

from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.prefix_cache import BlockPool, PrefixIndex
from pocketgpt.app.engine.types import DoneEvent, GenRequest, TokenEvent
from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import running_server
from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.model.kv_cache import KVCache
from pocketgpt.model.sampling import SamplingParams
from tests.conftest import make_tiny_checkpoint
from tests.prom import scrape


def test_index_matches_whole_blocks_exactly_and_leaves_the_last_token() -> None:
    idx = PrefixIndex(n_blocks=8, block=4)
    prompt = list(range(100, 112))  # 3 blocks
    assert idx.match(prompt) == []
    new = idx.insert(prompt)
    assert [start for _, start in new] == [0, 4, 8] and idx.used == 3
    blocks = [b for b, _ in new]
    assert idx.match(prompt) == blocks[:2]  # the last block holds the last token: it is recomputed
    assert idx.match([*prompt, 1]) == blocks
    assert idx.match([*prompt[:4], 0, *prompt[5:], 1]) == blocks[:1]  # a different token: no match after
    assert idx.match([0, *prompt]) == []  # same tokens at other positions never match
    assert idx.insert(prompt + [7] * 4) == [(idx.match(prompt + [7] * 5)[-1], 12)]  # only the new block


def test_index_memory_is_bounded_and_evicts_least_recently_used_leaves() -> None:
    idx = PrefixIndex(n_blocks=4, block=2)
    a, b = [1, 2, 3, 4, 5, 6], [9, 9, 8, 8]
    idx.insert(a)  # blocks a0 <- a1 <- a2
    idx.insert(b)  # b0 <- b1: b0 takes the last free block, b1 takes a2 (the oldest leaf)
    assert idx.used == 4
    assert len(idx.match([*a, 0])) == 2  # a's leaf went, its parents stay reachable
    assert len(idx.match([*b, 0])) == 2
    idx.match([*a, 0])  # a is used again: b's leaf is now the oldest
    idx.insert([7, 7, 7, 7])  # needs two blocks: takes b1, then b0 (a leaf once b1 is gone)
    assert idx.match([*b, 0]) == [] and len(idx.match([*a, 0])) == 2 and idx.used == 4


def test_pool_copies_blocks_out_of_and_into_slots() -> None:
    cache = KVCache(n_layer=2, n_slots=3, max_len=16, n_head=2, head_dim=4)
    cache.k.normal_()
    cache.v.normal_()
    pool = BlockPool(cache, n_blocks=5, block=4)
    pool.save(1, [(3, 0), (0, 4)])
    pool.load(2, [3, 0])
    assert torch.equal(cache.k[:, 2, :, :8], cache.k[:, 1, :, :8])
    assert torch.equal(cache.v[:, 2, :, :8], cache.v[:, 1, :, :8])
    assert not torch.equal(cache.k[:, 2, :, 8:], cache.k[:, 1, :, 8:])


async def _run(engine: Engine, prompt: list[int], n: int) -> tuple[list[int], DoneEvent]:
    ticket = engine.submit(GenRequest(prompt, n, SamplingParams(temperature=0.0)))
    ids = []
    while isinstance(event := await asyncio.wait_for(ticket.queue.get(), 30), TokenEvent):
        ids.append(event.id)
    assert isinstance(event, DoneEvent)
    return ids, event


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("prefix") / "ck", tie_embeddings=False, block_size=256)


def _prompts(tokenizer) -> list[list[int]]:
    system = tokenizer.encode("You are a helpful poet. Answer in verse, briefly and kindly. " * 3)
    return [system + tokenizer.encode(q) for q in ("To be, or not", "The quick brown fox", "x", "床前明月光")]


@pytest.mark.parametrize("slots", [2.0, 0.15])  # 0.15 x 256 tokens: 2 blocks, full all along
def test_greedy_outputs_are_identical_with_the_cache_on_and_off(checkpoint: Path, slots: float) -> None:
    off = Engine(load_checkpoint(checkpoint), max_running=4, prefill_chunk=16).start()
    on = Engine(load_checkpoint(checkpoint), max_running=4, prefill_chunk=16, prefix_cache_slots=slots).start()
    try:
        prompts = _prompts(on.tokenizer)
        prompts += [p + on.tokenizer.encode(" again") for p in prompts]

        async def main() -> None:
            cached = 0
            for p in prompts:  # one at a time: later prompts hit what earlier ones stored
                want, done_off = await _run(off, p, 24)
                got, done_on = await _run(on, p, 24)
                assert got == want
                assert done_off.cached_tokens == 0 and done_on.cached_tokens % 16 == 0
                cached += done_on.cached_tokens
            assert cached >= (len(prompts) - 1) * 16  # the cache really served tokens
            # Concurrently (hits, misses and stores in the same steps): still the same tokens.
            together = await asyncio.gather(*(_run(on, p, 24) for p in prompts))
            assert [ids for ids, _ in together] == [(await _run(off, p, 24))[0] for p in prompts]

        asyncio.run(main())
        assert on.prefix_cache_usage > 0 and on.info()["prefix_cache_tokens"] == int(slots * 256) // 16 * 16
    finally:
        off.stop()
        on.stop()


def test_openai_usage_and_metrics_report_cached_tokens(checkpoint: Path) -> None:
    settings = Settings(checkpoint=checkpoint, max_running=2, prefix_cache_slots=1)
    prompt = "You are a helpful poet. Answer in verse, briefly and kindly. " * 3
    with running_server(create_app(settings)) as base, httpx.Client(base_url=base, timeout=30) as client:
        body = {"prompt": prompt, "max_tokens": 4, "temperature": 0}
        first = client.post("/v1/completions", json=body).json()
        second = client.post("/v1/completions", json=body).json()
        n = first["usage"]["prompt_tokens"]
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16 > 0
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        metrics = scrape(base)
    assert metrics("pocketgpt_prefix_cache_query_tokens_total") == 2 * n
    assert metrics("pocketgpt_prefix_cache_hit_tokens_total") == (n - 1) // 16 * 16
    assert 0 < metrics("pocketgpt_prefix_cache_usage_ratio") <= 1


def test_a_hot_swap_starts_with_an_empty_cache(tmp_path: Path, checkpoint: Path) -> None:
    """The cache belongs to one model: after a swap the same prompt is a miss and gets the new model's tokens."""
    from pocketgpt.app.engine.holder import EngineHolder

    other = make_tiny_checkpoint(tmp_path / "other", seed=5, tie_embeddings=False, block_size=256)
    holder = EngineHolder(lambda p: Engine(load_checkpoint(p), max_running=2, prefix_cache_slots=1).start())

    async def main() -> None:
        await holder.load(checkpoint)
        prompt = _prompts(holder.current.tokenizer)[0]
        await _run(holder.current, prompt, 8)
        _, done = await _run(holder.current, prompt, 8)
        assert done.cached_tokens > 0
        await holder.swap(other)
        got, done = await _run(holder.current, prompt, 8)
        assert done.cached_tokens == 0
        fresh = Engine(load_checkpoint(other), max_running=1).start()
        try:
            assert got == (await _run(fresh, prompt, 8))[0]
        finally:
            fresh.stop()
        await holder.close()

    asyncio.run(main())


def test_a_finished_requests_output_is_cached_for_the_next_turn(checkpoint: Path) -> None:
    """A chat's next turn repeats the previous prompt and answer: both come from the cache, same tokens."""
    off = Engine(load_checkpoint(checkpoint), max_running=2).start()
    on = Engine(load_checkpoint(checkpoint), max_running=2, prefix_cache_slots=1).start()
    try:
        first = _prompts(on.tokenizer)[1]

        async def main() -> None:
            answer, _ = await _run(on, first, 40)
            turn = first + answer[:-1] + on.tokenizer.encode(" and then?")  # answer[-1] was never fed back
            want, _ = await _run(off, turn, 16)
            got, done = await _run(on, turn, 16)
            assert got == want
            assert done.cached_tokens == (len(first) + len(answer) - 1) // 16 * 16 > len(first)

        asyncio.run(main())
    finally:
        off.stop()
        on.stop()
