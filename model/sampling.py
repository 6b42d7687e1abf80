"""Batched token sampling with per-row parameters and per-row seeded generators.

Each row draws its random number from its own `torch.Generator`, so a request's output depends only on its
seed, never on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token. temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # >1 discourages any token already in prompt or output
    presence_penalty: float = 0.0  # OpenAI-style: subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # OpenAI-style: subtracted per occurrence in the output

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator: draws are the same on every device, so a seed means the same text everywhere."""
    return torch.Generator(device="cpu").manual_seed(seed)


def apply_penalties(
    logits: torch.Tensor, params: list[SamplingParams], counts: torch.Tensor, prompt_mask: torch.Tensor
) -> torch.Tensor:
    """Penalize repeats. `counts` (B, V) counts generated tokens; `prompt_mask` (B, V) marks prompt tokens."""
    dev = logits.device
    rep = torch.tensor([p.repetition_penalty for p in params], device=dev).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in params], device=dev).unsqueeze(1)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev).unsqueeze(1)
    seen = prompt_mask | (counts > 0)
    # CTRL-style repetition penalty: shrink positive logits, push negative ones further down.
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return logits - pres * (counts > 0).to(logits.dtype) - freq * counts.to(logits.dtype)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    counts: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row of `logits` (B, V) and return them as a (B,) long tensor."""
    logits = logits.float()
    if counts is not None and prompt_mask is not None and any(p.penalized for p in params):
        logits = apply_penalties(logits, params, counts, prompt_mask)
    greedy_tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy_tokens

    dev = logits.device
    temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)
    top_k = torch.tensor([p.top_k for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)

    sorted_logits, order = torch.sort(logits / temp.unsqueeze(1), dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    rank = torch.arange(probs.size(1), device=dev).unsqueeze(0)
    drop = (top_k.unsqueeze(1) > 0) & (rank >= top_k.unsqueeze(1))
    # Nucleus: drop a token when the mass before it already reaches top_p (the first token always stays).
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(dim=-1)

    draws = [torch.rand((), generator=g) if g is not None else torch.rand(()) for g in generators]
    u = torch.stack(draws).to(dev) * cdf[:, -1]
    pick = torch.searchsorted(cdf, u.unsqueeze(1), right=True).clamp_max(probs.size(1) - 1)
    sampled = order.gather(1, pick).squeeze(1)
    greedy_rows = torch.tensor([p.greedy for p in params], device=dev)
    return torch.where(greedy_rows, greedy_tokens, sampled)
