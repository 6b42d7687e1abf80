"""Verification of speculative drafts, greedy or sampled, exactly.

A draft is deterministic (the n-gram drafter's guess: a point mass q on one token d). The standard
speculative-sampling rule accepts d with probability min(1, p(d) / q(d)) = p(d), p being the target's
distribution after temperature, top-k and top-p, and on a rejection samples from the normalized residual
max(0, p - q): p with d removed and renormalized. Sampling x ~ p with the row's own sampler and accepting d when
x == d is the same rule: P(accept) = p(d), and given a rejection x is distributed as p restricted to tokens
other than d, renormalized, which is the residual, and x is then the output. So a row's token at each position
is drawn by the very sampler plain decoding uses (`model.sampling.sample`, same processing of the logits), and
the row keeps draft tokens while they equal what was drawn, then the first token that differs (or, all
accepted, the token after the draft). For a greedy row the sampler is argmax: the output is exactly that of
decoding without drafts. For a sampled row each token's distribution is exactly that without drafts, and
more: every position is drawn (one generator draw each), then the row's generator is rewound to just after
the draws its kept tokens used, so a sampled row consumes one draw per token as it does without drafts and
the same seed gives the same tokens with speculation on or off (up to float rounding: the many-position
verify forward may round logits differently from a one-position step, which could move a draw that lands
within rounding of a boundary between two tokens).
"""

from __future__ import annotations

import torch

from pocketgpt.app.engine.scheduler import Sequence
from pocketgpt.model.sampling import sample


def accept(first: int, draft: list[int], picks: list[int]) -> list[int]:
    """A row's tokens for the step: `first` (drawn after its fed-back token), then while the last token equals
    the draft's next one, the token drawn after that draft token (`picks[j]` follows draft token j)."""
    out = [first]
    for d, pick in zip(draft, picks, strict=True):
        if out[-1] != d:
            break
        out.append(pick)
    return out


def verify_drafts(rows: list[Sequence], drafts: dict[Sequence, list[int]], wide: torch.Tensor,
                  tokens: list[list[int]]) -> None:
    """Extend `tokens[i]` (row i's token drawn from `wide[i, 0]`) of every drafting row by `accept`.

    `wide` (rows, 1 + longest draft, V) holds the logits after each row's fed-back token and draft tokens,
    ids past the text vocabulary already masked. Drafting rows are unpenalized (their penalty state would
    change within the step), so the sampler needs no penalty state.
    """
    drafting = [(i, s, d) for i, s in enumerate(rows) if (d := drafts.get(s))]
    if not drafting:
        return
    logits = torch.cat([wide[i, 1 : 1 + len(d)] for i, _, d in drafting])
    params = [s.request.params for _, s, d in drafting for _ in d]
    generators = [s.generator for _, s, d in drafting for _ in d]
    # Sampled rows: where each generator stood before this draft's draws (greedy rows draw nothing that counts).
    states = [None if s.request.params.greedy else s.generator.get_state() for _, s, _ in drafting]
    picks = sample(logits, params, generators).tolist()
    at = 0
    for (i, seq, d), state in zip(drafting, states, strict=True):
        tokens[i] = accept(tokens[i][0], d, picks[at : at + len(d)])
        at += len(d)
        if state is not None:
            _rewind(seq.generator, state, len(tokens[i]) - 1)


def _rewind(generator: torch.Generator, state: torch.Tensor, used: int) -> None:
    """Put `generator` back to `state` plus the `used` draws the kept tokens took (one `sample` draw each)."""
    generator.set_state(state)
    for _ in range(used):
        torch.rand((), generator=generator)
