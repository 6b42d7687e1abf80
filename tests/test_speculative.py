"""N-gram speculative decoding: drafting, greedy outputs identical to plain decoding inside continuous batching,
and sampled outputs distributed exactly as without drafts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.speculate import NgramDrafter
from pocketgpt.app.engine.types import GenRequest, TokenEvent
from pocketgpt.app.metrics import Metrics
from pocketgpt.model.checkpoint import load_checkpoint, save_checkpoint
from pocketgpt.model.config import ModelConfig
from pocketgpt.model.gpt import GPT
from pocketgpt.model.sampling import SamplingParams
from pocketgpt.model.tokenizer import train_tokenizer
from tests.conftest import make_tiny_checkpoint, small_corpus


def test_drafter_copies_what_followed_the_latest_earlier_occurrence() -> None:
    history = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3]
    assert NgramDrafter(history, k_max=3, k_start=3).propose(10) == [7, 8, 6]  # "2 3" last came before "7 8 6"
    history[-3] = 1
    assert NgramDrafter(history, k_max=3, k_start=3).propose(10) == [4, 5, 9]  # "1 2 3" beats "2 3"
    history[:] = [1, 2, 3, 4, 5, 1, 2, 3]
    d = NgramDrafter(history, k_max=3, k_start=3)
    assert d.propose(10) == [4, 5, 1]
    assert d.propose(2) == [4, 5]  # never past the limit
    history.append(4)  # the history grows: the index catches up
    assert d.propose(10) == [5, 1, 2]
    assert NgramDrafter([5, 6, 7, 8], k_max=3, k_start=3).propose(10) == []  # no repeat, no draft


def test_drafter_runs_a_loop_on_past_the_end_of_the_history() -> None:
    # "2 3" last came just before the final "1": the copy runs on into itself, the loop's next k tokens.
    assert NgramDrafter([1, 2, 3, 1, 2, 3, 1, 2, 3], k_max=5, k_start=5).propose(10) == [1, 2, 3, 1, 2]
    assert NgramDrafter([7, 7, 7, 7], k_max=4, k_start=4).propose(10) == [7, 7, 7, 7]  # period one
    assert NgramDrafter([4, 9, 9, 9], k_max=4, k_start=4).propose(3) == [9, 9, 9]  # and never past the limit


def test_drafter_adapts_and_pauses_when_drafts_stop_paying() -> None:
    d = NgramDrafter([1, 2, 1, 2, 1, 2], k_max=4, patience=2, k_start=4)
    d.adapt(4, 1)
    assert d.k == 2  # what was accepted, plus one
    d.adapt(2, 2)
    assert d.k == 3
    assert d.k == 3

    def paused_for() -> int:
        n = 0
        while not d.propose(10):
            n += 1
        return n

    for pause in (16, 32, 64):  # each pause that no accepted token interrupts is twice as long
        d.adapt(3, 0)
        assert d.propose(10) != []  # one miss: still drafting
        d.adapt(1, 0)
        assert paused_for() == pause  # two misses in a row: paused
    d.adapt(1, 1)  # a draft lands: the next pause is short again
    d.adapt(2, 0)
    d.adapt(1, 0)
    assert paused_for() == 16
    d = NgramDrafter([1, 2, 1, 2, 1, 2], k_max=4, max_pause=40, patience=2)
    for _ in range(4):
        d.adapt(1, 0)
        d.adapt(1, 0)
        last = paused_for()
    assert last == 40


async def _run(engine: Engine, request: GenRequest) -> list[int]:
    ticket = engine.submit(request)
    ids = []
    while isinstance(event := await asyncio.wait_for(ticket.queue.get(), 30), TokenEvent):
        ids.append(event.id)
    return ids


def contextual_checkpoint(path: Path, **heads: int) -> Path:
    """A random model whose next token depends on the whole context, not only on the last token (the
    sharpened test models mostly follow their last token, which makes every n-gram draft right)."""
    tok = train_tokenizer(small_corpus(), vocab_size=400)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{"vocab_size": tok.vocab_size, "n_layer": 2, "n_head": 2, "n_embd": 32,
                               "block_size": 256, "tie_embeddings": False, **heads}))
    with torch.no_grad():
        for block in model.h:  # strong attention: what came earlier moves the logits
            block.attn.c_attn.weight.mul_(4)
            block.attn.c_proj.weight.mul_(8)
    return save_checkpoint(path, model, tok, meta={"step": 0})


@pytest.mark.parametrize("kind", ["contextual", "sharpened"])
def test_speculation_changes_no_output_alone_or_batched_greedy_or_seeded(tmp_path: Path, kind: str) -> None:
    if kind == "contextual":
        path = contextual_checkpoint(tmp_path / kind)
    else:
        path = make_tiny_checkpoint(tmp_path / kind, tie_embeddings=False, block_size=256)
    metrics = Metrics()
    plain = Engine(load_checkpoint(path), max_running=8).start()
    spec = Engine(load_checkpoint(path), max_running=8, spec_tokens=4, metrics=metrics).start()
    try:
        tok = plain.tokenizer
        texts = ["def add(a, b):\n    return a + b\n\ndef add(", "To be, or not to be, to be, or not",
                 "the cat the cat the cat", "x = 1\nx = 1\nx = 1\n", "Hello"]
        greedy = SamplingParams(temperature=0.0)
        requests = [GenRequest(tok.encode(t), 60, greedy) for t in texts]
        # Sampled requests draft too (same seed, same tokens); penalized ones never draft.
        requests += [GenRequest(tok.encode(texts[0]), 40, SamplingParams(temperature=0.9), seed=3),
                     GenRequest(tok.encode(texts[1]), 40, SamplingParams(temperature=0.0, repetition_penalty=1.3))]
        requests += [GenRequest(tok.encode(t), 50, SamplingParams(temperature=0.05, top_k=k, top_p=p), seed=seed)
                     for seed, (t, k, p) in enumerate([(texts[0], 0, 1.0), (texts[1], 5, 1.0), (texts[2], 0, 0.9),
                                                       (texts[3], 3, 0.8), (texts[2], 0, 1.0)])]

        async def main() -> None:
            want = [await _run(plain, r) for r in requests]
            assert [await _run(spec, r) for r in requests] == want  # one at a time
            assert list(await asyncio.gather(*(_run(spec, r) for r in requests))) == want  # batched
            # A short max_new_tokens is honoured exactly even when a draft would run past it.
            assert await _run(spec, GenRequest(requests[2].prompt_ids, 3, greedy)) == want[2][:3]
            # The sampled requests alone: they drafted (and on the contextual model drafts were accepted).
            before = metrics.spec_draft_tokens._value.get(), metrics.spec_accepted_tokens._value.get()
            assert [await _run(spec, r) for r in requests[-5:]] == want[-5:]
            assert metrics.spec_draft_tokens._value.get() > before[0]
            if kind == "contextual":
                assert metrics.spec_accepted_tokens._value.get() > before[1]

        asyncio.run(main())
    finally:
        plain.stop()
        spec.stop()
    accepted, drafted = metrics.spec_accepted_tokens._value.get(), metrics.spec_draft_tokens._value.get()
    assert 0 < accepted <= drafted
    if kind == "contextual":
        assert accepted < drafted  # some drafts were wrong: verification really rejected tokens


@pytest.mark.parametrize("heads", [{}, {"n_head": 4, "n_kv_head": 2}], ids=["mha", "gqa"])
def test_prefix_cache_speculation_and_batching_together_change_no_greedy_output(tmp_path: Path, heads: dict) -> None:
    """Random prompts sharing random prefixes, all at once, through a small (evicting) prefix cache and
    speculation, against the plain engine one request at a time (also with grouped-query attention)."""
    import random

    path = contextual_checkpoint(tmp_path / "ck", **heads)
    plain = Engine(load_checkpoint(path), max_running=1).start()
    full = Engine(load_checkpoint(path), max_running=6, prefill_chunk=32, prefix_cache_slots=0.5,
                  spec_tokens=3).start()
    try:
        rng = random.Random(7)
        vocab = plain.tokenizer.vocab_size
        stems = [[rng.randrange(1, vocab) for _ in range(rng.randrange(10, 60))] for _ in range(3)]
        greedy = SamplingParams(temperature=0.0)
        requests = []
        for _ in range(14):
            stem = rng.choice(stems)
            tail = stem[: rng.randrange(0, len(stem))] if rng.random() < 0.5 else []  # repeats invite drafts
            prompt = stem + tail + [rng.randrange(1, vocab) for _ in range(rng.randrange(1, 20))]
            requests.append(GenRequest(prompt, rng.randrange(1, 40), greedy))

        async def main() -> None:
            want = [await _run(plain, r) for r in requests]
            for _ in range(2):  # the second round mostly hits the cache
                assert list(await asyncio.gather(*(_run(full, r) for r in requests))) == want

        asyncio.run(main())
    finally:
        plain.stop()
        full.stop()
