"""Batched sampling with per-row parameters."""

from __future__ import annotations

import torch

from pocketgpt.model.sampling import (
    MIN_REPETITION_PENALTY,
    SamplingParams,
    apply_penalties,
    make_generator,
    sample,
)


def _logits(batch: int = 4, vocab: int = 50) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, vocab) * 2


def test_greedy_and_top_k_1_equal_argmax() -> None:
    logits = _logits()
    for p in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_k=1)):
        gens = [make_generator(i) for i in range(4)]
        assert torch.equal(sample(logits, [p] * 4, gens), logits.argmax(-1))


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    logits = _logits()
    p = SamplingParams(temperature=1.0, top_p=0.9)
    a = [int(sample(logits[2:3], [p], [make_generator(7)])[0]) for _ in range(1)]
    gens = [make_generator(s) for s in (1, 2, 7, 3)]
    runs = [sample(logits, [p] * 4, gens) for _ in range(20)]
    gens2 = [make_generator(s) for s in (9, 9, 7, 9)]
    runs2 = [sample(logits, [p] * 4, gens2) for _ in range(20)]
    assert [int(r[2]) for r in runs] == [int(r[2]) for r in runs2]  # row 2 unaffected by its neighbours
    assert a[0] == int(runs[0][2])
    assert len({tuple(r.tolist()) for r in runs}) > 1  # and it really samples


def _histogram(logits: torch.Tensor, p: SamplingParams, n: int = 4000) -> torch.Tensor:
    gen = make_generator(0)
    rows = logits.expand(n, -1)
    toks = sample(rows, [p] * n, [gen] * n)
    return torch.bincount(toks, minlength=logits.size(-1)).float() / n


def test_temperature_and_top_p_shape_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    base = _histogram(logits, SamplingParams(temperature=1.0))
    assert (base - probs).abs().max() < 0.03  # T=1 samples the softmax
    cold = _histogram(logits, SamplingParams(temperature=0.3))
    hot = _histogram(logits, SamplingParams(temperature=2.0))
    assert cold[0] > base[0] + 0.2 and hot[0] < base[0] - 0.1
    # top_p=0.6: token 0 holds ~0.54 < 0.6 so tokens 0 and 1 stay, renormalised; the rest never appear.
    nucleus = _histogram(logits, SamplingParams(temperature=1.0, top_p=0.6))
    assert nucleus[2:].sum() == 0
    expected0 = probs[0] / (probs[0] + probs[1])
    assert abs(nucleus[0] - expected0) < 0.03
    topk = _histogram(logits, SamplingParams(temperature=1.0, top_k=3))
    assert topk[3:].sum() == 0 and topk[2] > 0


def test_penalties_discourage_repeats() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    counts = torch.tensor([[2, 0, 0]], dtype=torch.int32)
    seen = torch.zeros(1, 3, dtype=torch.bool)
    greedy = SamplingParams(temperature=0.0)
    assert int(sample(logits, [greedy], [None], counts, seen)[0]) == 0
    for p in (
        SamplingParams(temperature=0.0, repetition_penalty=1.2),
        SamplingParams(temperature=0.0, presence_penalty=0.5),
        SamplingParams(temperature=0.0, frequency_penalty=0.1),
    ):
        assert int(sample(logits, [p], [None], counts, seen)[0]) == 1
    # Repetition penalty also covers prompt tokens.
    prompt_seen = torch.tensor([[True, False, False]])
    rep = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert int(sample(logits, [rep], [None], torch.zeros_like(counts), prompt_seen)[0]) == 1


def test_tiny_temperature_is_greedy_not_the_last_id() -> None:
    """A temperature that underflows float32 (logits / 1e-39 is inf/nan) samples like temperature 0."""
    logits = _logits(batch=4, vocab=50)
    for temperature in (1e-39, 1e-45, 1e-20, 9e-6):
        for extra in ({}, {"top_p": 0.9}, {"top_k": 5}):
            p = SamplingParams(temperature=temperature, **extra)
            assert p.greedy
            gens = [make_generator(i) for i in range(4)]
            assert torch.equal(sample(logits, [p] * 4, gens), logits.argmax(-1)), (temperature, extra)
    assert not SamplingParams(temperature=1e-4).greedy  # small but usable temperatures still sample


def test_tiny_repetition_penalty_does_not_divide_by_zero() -> None:
    """A penalty that is 0 in float32 (1e-46) must not turn seen logits into inf: it is bounded below."""
    logits = torch.tensor([[3.0, 2.0, 1.0, -1.0]])
    counts = torch.tensor([[0, 1, 0, 0]])
    mask = torch.zeros(1, 4, dtype=torch.bool)
    p = SamplingParams(temperature=0.0, repetition_penalty=1e-46)
    out = apply_penalties(logits.clone(), [p], counts, mask)
    assert torch.isfinite(out).all()
    bounded = apply_penalties(logits.clone(), [SamplingParams(repetition_penalty=MIN_REPETITION_PENALTY)],
                              counts, mask)
    assert torch.equal(out, bounded)
