"""Batched token sampling with per-row parameters and per-row seeded generators.

Each row draws its random number from its own `torch.Generator`, so a request's output depends only on its
seed, never on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below this temperature a row is greedy: logits / T overflows float32 long before T reaches 0 (at T ~ 1e-38 the
# scaled logits are inf and the softmax NaN, which sampled the last vocabulary id every step). At 1e-5 a logit
# gap of 1e-3 is already a 1e2 gap after scaling, so the distribution is one-hot in all but name.
GREEDY_BELOW = 1e-5
# Repetition penalties are clamped to at least this: a penalty that is 0 in float32 (1e-46) divided seen logits
# by zero. The HTTP schemas refuse smaller values; the clamp keeps direct callers safe too.
MIN_REPETITION_PENALTY = 0.01


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token. temperature 0 (or below GREEDY_BELOW) means greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # >1 discourages any token already in prompt or output
    presence_penalty: float = 0.0  # OpenAI-style: subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # OpenAI-style: subtracted per occurrence in the output

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

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
    rep = torch.tensor([max(p.repetition_penalty, MIN_REPETITION_PENALTY) for p in params], device=dev).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in params], device=dev).unsqueeze(1)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev).unsqueeze(1)
    seen = prompt_mask | (counts > 0)
    # CTRL-style repetition penalty: shrink positive logits, push negative ones further down.
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return logits - pres * (counts > 0).to(logits.dtype) - freq * counts.to(logits.dtype)


PREFIX = 64  # top-k / top-p rows look at this many top tokens first (a full sort only when the nucleus is wider)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    counts: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row of `logits` (B, V) and return them as a (B,) long tensor.

    Greedy rows take the argmax. Plain temperature rows (no top-k, no top-p) invert the CDF of the softmax in
    vocabulary order: O(V), no sort. Top-k/top-p rows invert the CDF of the kept tokens in descending order,
    found with a top-`PREFIX` selection (a full sort only for a nucleus wider than that). Every row's
    result depends only on its own logits, parameters and generator, never on the other rows.
    """
    logits = logits.float()
    if counts is not None and prompt_mask is not None and any(p.penalized for p in params):
        logits = apply_penalties(logits, params, counts, prompt_mask)
    greedy_tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy_tokens

    dev = logits.device
    vocab = logits.size(1)
    draws = [torch.rand((), generator=g) if g is not None else torch.rand(()) for g in generators]
    u = torch.stack(draws).to(dev)
    plain = [i for i, p in enumerate(params) if not p.greedy and p.top_k == 0 and p.top_p >= 1.0]
    filtered = [i for i, p in enumerate(params) if not p.greedy and (p.top_k != 0 or p.top_p < 1.0)]
    tokens = greedy_tokens.clone()
    if plain:
        rows = slice(None) if len(plain) == len(params) else torch.tensor(plain, device=dev)  # no gather if all
        temp = torch.tensor([params[i].temperature for i in plain], device=dev).unsqueeze(1)
        cdf = (logits[rows] / temp).softmax(dim=-1).cumsum(dim=-1)
        pick = torch.searchsorted(cdf, (u[rows] * cdf[:, -1]).unsqueeze(1), right=True).clamp_max(vocab - 1)
        tokens[rows] = pick.squeeze(1)
    if filtered:
        prefix = min(PREFIX, vocab)
        short = [i for i in filtered if params[i].top_k <= prefix]  # top-p only (0) or a small top-k
        full = [i for i in filtered if params[i].top_k > prefix]
        if short:
            scaled = _scaled(logits, params, short)
            vals, order = scaled.topk(prefix, dim=-1)
            probs = (vals - scaled.logsumexp(dim=-1, keepdim=True)).exp()
            # A top-p row whose nucleus reaches past the prefix needs the full sort.
            wide = (probs.sum(dim=-1) < torch.tensor([params[i].top_p for i in short], device=dev)) & torch.tensor(
                [params[i].top_k == 0 for i in short], device=dev)
            if bool(wide.any()):
                full += [i for i, w in zip(short, wide.tolist(), strict=True) if w]
                keep = [j for j, w in enumerate(wide.tolist()) if not w]
                short = [short[j] for j in keep]
                probs, order = probs[keep], order[keep]
            if short:
                tokens[torch.tensor(short, device=dev)] = _pick(probs, order, [params[i] for i in short], u[short])
        if full:
            full.sort()
            scaled = _scaled(logits, params, full)
            vals, order = scaled.sort(dim=-1, descending=True)
            probs = (vals - scaled.logsumexp(dim=-1, keepdim=True)).exp()
            tokens[torch.tensor(full, device=dev)] = _pick(probs, order, [params[i] for i in full], u[full])
    return tokens


def _scaled(logits: torch.Tensor, params: list[SamplingParams], rows: list[int]) -> torch.Tensor:
    temp = torch.tensor([params[i].temperature for i in rows], device=logits.device).unsqueeze(1)
    return logits[torch.tensor(rows, device=logits.device)] / temp


def _pick(probs: torch.Tensor, order: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF over tokens in descending order (`probs`, their ids `order`) after top-k/top-p filtering."""
    dev = probs.device
    top_k = torch.tensor([p.top_k for p in params], device=dev).unsqueeze(1)
    top_p = torch.tensor([p.top_p for p in params], device=dev).unsqueeze(1)
    rank = torch.arange(probs.size(1), device=dev).unsqueeze(0)
    drop = (top_k > 0) & (rank >= top_k)
    # Nucleus: drop a token when the mass before it already reaches top_p (the first token always stays).
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p
    cdf = probs.masked_fill(drop, 0.0).cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_max(probs.size(1) - 1)
    return order.gather(1, pick).squeeze(1)
