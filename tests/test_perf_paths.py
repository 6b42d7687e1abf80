"""Correctness of the serving fast paths (no timing here): each must give what the plain path gives.

Flat forward vs modules (bitwise), the cheap CacheBatch forms vs an uncached forward, batched vs solo, padded
batched prefill, the static (CUDA-graph) decode step with its row/length buckets run eagerly on CPU, the
granular prefill plan, and the sampling shortcuts.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import pocketgpt.model.sampling as sampling
from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.graphs import GraphDecoder, buckets_for
from pocketgpt.app.engine.scheduler import Scheduler
from pocketgpt.app.engine.types import GenRequest, TokenEvent
from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.model.config import ModelConfig
from pocketgpt.model.fastpath import onednn_linear
from pocketgpt.model.gpt import GPT
from pocketgpt.model.kv_cache import KVCache
from pocketgpt.model.sampling import SamplingParams, make_generator, sample
from tests.conftest import make_tiny_checkpoint

V = 97
LAYOUTS = {
    "modern": {},
    "gpt2": dict(positions="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False),
    "gpt2-tied": dict(positions="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "gqa": dict(n_head=4, n_kv_head=2, qkv_bias=True, tie_embeddings=False),
    "mqa": dict(n_head=4, n_kv_head=1),
}


def make_model(layout: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    shape = {"vocab_size": V, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64}
    m = GPT(ModelConfig(**{**shape, **LAYOUTS[layout]})).eval()
    with torch.no_grad():
        m.wte.weight.mul_(20)  # sharpen: argmax comparisons mean something
        for name, p in m.named_parameters():
            if name.endswith("c_attn.bias"):
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(seed))
    return m


# The passes a serving step makes: prefill at 0, a chunk at an offset, lockstep decode over contiguous slots,
# rows at different positions, non-contiguous slots, a padded batched prefill.
PASSES = [
    ([0], [0], 7, None), ([2], [0], 5, None), ([2], [5], 3, None), ([1, 3], [0, 0], 6, [6, 4]),
    ([0, 1, 2, 3], [7, 6, 8, 4], 1, None), ([0, 1], [8, 7], 1, None), ([2, 3], [9, 5], 1, None),
    ([3, 0], [6, 9], 1, None), ([1, 2, 3], [8, 10, 7], 1, None),
]


def run_passes(ref: GPT, fast: GPT, check: Callable[[torch.Tensor, torch.Tensor], None]) -> tuple[KVCache, KVCache]:
    """Run PASSES (prefills, padded prefills, batched decodes) through both models' caches; `check(ref_out,
    fast_out)` compares each pass's logits. Returns both caches for a last comparison."""
    c_ref, c_fast = KVCache.for_model(ref, 4), KVCache.for_model(fast, 4)
    gen = torch.Generator().manual_seed(1)
    for slots, starts, n, lengths in PASSES:
        idx = torch.randint(0, V, (len(slots), n), generator=gen)
        check(ref.forward_cached(idx, c_ref, slots, starts, last_only=lengths is None, lengths=lengths),
              fast.forward_cached(idx, c_fast, slots, starts, last_only=lengths is None, lengths=lengths))
    return c_ref, c_fast


def assert_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("transpose", [False, True])
def test_flat_forward_is_bitwise_equal_to_the_modules(layout: str, transpose: bool) -> None:
    ref = make_model(layout)
    fast = copy.deepcopy(ref).prepare_inference(transpose_weights=transpose, onednn=False)
    if transpose:  # the module path on the same (transposed) weights
        ref.prepare_inference(transpose_weights=True)
        ref._flat = None
    c_ref, c_fast = run_passes(ref, fast, assert_equal)
    assert torch.equal(c_ref.k, c_fast.k) and torch.equal(c_ref.v, c_fast.v)


@pytest.mark.parametrize("layout", ["modern", "gpt2", "gqa"])
def test_onednn_products_match_the_modules_and_do_not_depend_on_the_batch(layout: str) -> None:
    """Multi-row products on oneDNN: within float rounding of the module path, and a row's logits are the
    same bits in every batch of two or more rows it is part of (so batching never changes a greedy token)."""
    if onednn_linear(torch.ones(1, 1)) is None:
        pytest.fail("this torch has no oneDNN linear on CPU: the serving fast path falls back to F.linear")
    ref = make_model(layout)
    fast = copy.deepcopy(ref).prepare_inference(onednn=True)
    assert fast._flat.linear is not F.linear
    run_passes(ref, fast, lambda a, b: torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 32, generator=gen)
    whole = fast._flat.logits(x)
    for rows in (slice(0, 2), slice(3, 6), slice(1, 8)):
        assert torch.equal(fast._flat.logits(x[rows]), whole[rows])


def test_transposed_weights_keep_values_and_training_drops_the_fast_path() -> None:
    m = make_model("gpt2-tied")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.prepare_inference(transpose_weights=True)
    w = m.h[0].attn.c_attn.weight
    assert w.shape == (96, 32) and not w.is_contiguous() and w.t().is_contiguous()
    assert m.lm_head.weight is m.wte.weight  # still tied
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m._flat is not None
    m.train()
    assert m._flat is None
    m.eval().prepare_inference()
    m.to(torch.float64)
    assert m._flat is None


@pytest.mark.parametrize("layout", ["modern", "gpt2", "gqa", "mqa"])
def test_every_cache_form_equals_the_uncached_forward(layout: str) -> None:
    """Rows at one position (no mask), at different positions (mask), gathered slots, padded prefill."""
    m = make_model(layout).prepare_inference()
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (9, 5, 9, 12)]
    cache = KVCache.for_model(m, 6)
    slots = [4, 1, 2, 5]
    # Padded batched prefill of the first 5 tokens of each, then the rest one prompt at a time.
    first = torch.tensor([s[:5] for s in seqs])
    m.forward_cached(first, cache, slots, [0] * 4)
    for slot, s in zip(slots, seqs, strict=True):
        if len(s) > 5:
            m.forward_cached(torch.tensor([s[5:]]), cache, [slot], [5])
    for _ in range(4):
        # All rows (different positions: the masked form); a gathered, non-contiguous pair at one position.
        for order in ([0, 1, 2, 3], [2, 0]):
            rows = [slots[i] for i in order]
            toks = torch.tensor([[seqs[i][-1]] for i in order])
            # Peek: the logits of the next token for these rows, without advancing (written keys are rewritten
            # by the advancing call below with the same values).
            got = m.forward_cached(toks, cache, rows, [len(seqs[i]) - 1 for i in order])
            for j, i in enumerate(order):
                want = m(torch.tensor([seqs[i]]))[0][0, -1]
                torch.testing.assert_close(got[j], want, atol=2e-5, rtol=1e-5)
        nxt = [int(m(torch.tensor([s]))[0][0, -1].argmax()) for s in seqs]
        for s, t in zip(seqs, nxt, strict=True):
            s.append(t)
        m.forward_cached(torch.tensor([[s[-1]] for s in seqs]), cache, slots, [len(s) - 1 for s in seqs])


def test_padded_batched_prefill_equals_one_prompt_at_a_time() -> None:
    m = make_model("modern").prepare_inference()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18]]
    solo_cache, batch_cache = KVCache.for_model(m, 3), KVCache.for_model(m, 3)
    solo = [m.forward_cached(torch.tensor([p]), solo_cache, [i], [0])[0] for i, p in enumerate(prompts)]
    width = max(map(len, prompts))
    idx = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    batched = m.forward_cached(idx, batch_cache, [0, 1, 2], [0, 0, 0], lengths=[len(p) for p in prompts])
    for i, p in enumerate(prompts):
        torch.testing.assert_close(batched[i], solo[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch_cache.k[:, i, :, : len(p)], solo_cache.k[:, i, :, : len(p)])
    # Decoding on from there agrees too (the padding's keys past a prompt are overwritten first).
    toks = torch.tensor([[int(s.argmax())] for s in solo])
    pos = [len(p) for p in prompts]
    a = m.forward_cached(toks, solo_cache, [0, 1, 2], pos)
    b = m.forward_cached(toks, batch_cache, [0, 1, 2], pos)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_buckets() -> None:
    assert buckets_for(16, (1, 2, 4, 8, 12, 16, 24)) == [1, 2, 4, 8, 12, 16]
    assert buckets_for(20, (1, 2, 4, 8, 12, 16, 24)) == [1, 2, 4, 8, 12, 16, 20]
    m = make_model("modern").prepare_inference()
    dec = GraphDecoder(m, KVCache.for_model(m, 20), use_graphs=True)  # CPU: graphs off, buckets all the same
    assert not dec.use_graphs
    assert dec.shape_for([0], [3]) == (1, 64)
    assert dec.shape_for([0, 2], [3, 10]) == (4, 64)
    assert dec.shape_for([5, 16], [63, 1]) == (20, 64)
    assert dec.shape_for([8], [0]) == (12, 64)


@pytest.mark.parametrize("layout", ["modern", "gpt2-tied", "gqa"])
def test_static_decode_step_equals_forward_cached(layout: str) -> None:
    """The CUDA-graph step (run eagerly on CPU): bucketed rows and lengths, idle and prefilling slots padded."""
    m = make_model(layout).prepare_inference()
    ref_cache = KVCache.for_model(m, 8)  # max_len 64, the context length
    st_cache = KVCache.for_model(m, 8)
    dec = GraphDecoder(m, st_cache, use_graphs=False)
    dec.length_buckets = buckets_for(64, (16, 32))  # several length buckets in a short test
    gen = torch.Generator().manual_seed(3)
    lens = {0: 5, 2: 14, 3: 3, 6: 30}  # slot -> prompt length; slots 1, 4, 5, 7 idle
    for cache in (ref_cache, st_cache):
        for slot, n in lens.items():
            m.forward_cached(torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(slot)), cache,
                             [slot], [0])
    pos = dict(lens)
    for step in range(8):
        active = [s for s in sorted(pos) if (step + s) % 3]  # a changing subset decodes; the rest wait
        toks = torch.randint(0, V, (len(active),), generator=gen).tolist()
        want = m.forward_cached(torch.tensor([[t] for t in toks]), ref_cache, active, [pos[s] for s in active])
        got = dec.step(active, toks, [pos[s] for s in active])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        for s in active:
            pos[s] += 1
    # Every real key matches; the padding only ever wrote at max_len - 1.
    for s, n in pos.items():
        torch.testing.assert_close(st_cache.k[:, s, :, :n], ref_cache.k[:, s, :, :n], atol=1e-6, rtol=1e-6)
    assert st_cache.k[:, [1, 4, 5, 7], :, : 64 - 1].abs().sum() == 0


def _greedy_run(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    async def one(p: list[int]) -> list[int]:
        ticket = engine.submit(GenRequest(p, n, SamplingParams(temperature=0.0)))
        out = []
        while isinstance(event := await asyncio.wait_for(ticket.queue.get(), 30), TokenEvent):
            out.append(event.id)
        return out

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(one(p) for p in prompts)))

    return asyncio.run(main())


@pytest.mark.parametrize("heads", [{"n_head": 2}, {"n_head": 4, "n_kv_head": 1}], ids=["mha", "mqa"])
def test_engine_with_static_decode_and_batched_prefill_matches_the_plain_engine(tmp_path, heads: dict) -> None:
    path = make_tiny_checkpoint(tmp_path / "ck", tie_embeddings=False, **heads)
    tok = load_checkpoint(path).tokenizer
    prompts = [tok.encode(t) for t in ("The quick brown fox", "To be, or not", "a single step. " * 3, "x", "Hello")]
    plain = Engine(load_checkpoint(path), max_running=8, prefill_chunk=64, prefill_granule=64).start()
    fast = Engine(load_checkpoint(path), max_running=8, prefill_chunk=64, prefill_granule=4,
                  decode_graphs=True).start()
    try:
        solo = [_greedy_run(plain, [p], 12)[0] for p in prompts]
        assert _greedy_run(plain, prompts, 12) == solo
        assert _greedy_run(fast, prompts, 12) == solo
        assert fast.runner.graphs is not None and not fast.runner.graphs.use_graphs
    finally:
        plain.stop()
        fast.stop()


@pytest.mark.slow  # compiles two decode graphs with torch.compile: ~70 s of the 2-core CI budget
def test_compiled_decode_step_serves_the_plain_engines_tokens(tmp_path) -> None:
    """`--compile`: the static step compiled by torch.compile (C++ on CPU), batch 1 and batched, warmed up at
    load; greedy outputs equal the uncompiled engine's, alone and batched, and it did not fall back to eager."""
    path = make_tiny_checkpoint(tmp_path / "ck", tie_embeddings=False, n_head=4, n_kv_head=2)
    tok = load_checkpoint(path).tokenizer
    prompts = [tok.encode(t) for t in ("The quick brown fox", "To be, or not", "a single step. " * 3, "x")]
    plain = Engine(load_checkpoint(path), max_running=4, prefill_chunk=64).start()
    fast = Engine(load_checkpoint(path), max_running=4, prefill_chunk=64, compile_decode=True).start()
    try:
        solo = [_greedy_run(plain, [p], 12)[0] for p in prompts]
        assert [_greedy_run(fast, [p], 12)[0] for p in prompts] == solo
        assert _greedy_run(fast, prompts, 12) == solo
        assert fast.runner.graphs is not None and fast.runner.graphs._compiled is not None
    finally:
        plain.stop()
        fast.stop()


def test_prefill_plan_cuts_on_the_granule_grid_within_the_budget() -> None:
    def seq(n: int, prefilled: int = 0) -> SimpleNamespace:
        return SimpleNamespace(request=SimpleNamespace(prompt_ids=list(range(n))), prefilled=prefilled,
                               prefilling=prefilled < n, leader=None)

    sched = Scheduler(4, 4)
    a, b, c = seq(40), seq(5), seq(20, prefilled=8)
    sched.running = {0: a, 1: b, 2: c}
    assert sched.prefill_plan(64, 16) == [(a, 0, 16), (a, 16, 32), (a, 32, 40), (b, 0, 5), (c, 8, 16), (c, 16, 20)]
    assert sched.prefill_plan(48, 16) == [(a, 0, 16), (a, 16, 32), (a, 32, 40), (b, 0, 5)]  # no overtaking
    assert sched.prefill_plan(16, 16) == [(a, 0, 16)]
    assert sched.prefill_plan(4, 16) == [(a, 0, 16)]  # the first chunk always runs
    assert sched.prefill_plan(8, None) == [(a, 0, 8)]


def test_sampling_shortcuts_are_batch_invariant_and_exact() -> None:
    torch.manual_seed(4)
    logits = torch.randn(6, 300) * 3
    params = [SamplingParams(temperature=0.9), SamplingParams(temperature=0.0), SamplingParams(top_k=5),
              SamplingParams(top_p=0.5), SamplingParams(top_p=0.999, temperature=2.0), SamplingParams(top_k=200)]
    together = sample(logits, params, [make_generator(i) for i in range(6)])
    for i, p in enumerate(params):  # each row alone, with a greedy neighbour, gives the same token
        alone = sample(logits[i : i + 1], [p], [make_generator(i)])
        assert int(alone[0]) == int(together[i])
    # The top-PREFIX shortcut picks what the full sort picks (including the wide-nucleus fallback row 4).
    full_sort = sampling.PREFIX
    try:
        for seed in range(20):
            fast = sample(logits, params, [make_generator(seed * 10 + i) for i in range(6)])
            sampling.PREFIX = 300
            slow = sample(logits, params, [make_generator(seed * 10 + i) for i in range(6)])
            sampling.PREFIX = full_sort
            assert torch.equal(fast, slow)
    finally:
        sampling.PREFIX = full_sort
    assert int(together[1]) == int(logits[1].argmax())
