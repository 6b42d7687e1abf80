"""Log-probabilities for the requests that ask for them: of sampled tokens, and of prompt tokens (echo).

They describe the raw model distribution, as vLLM's default and OpenAI's do: `log_softmax` of the model's
logits, before temperature, top-k/top-p, penalties and token healing (ids past the tokenizer's vocabulary, a
padded embedding's, are excluded: they can never be sampled). Only the rows that asked are computed, and one
host transfer per step carries all of them; rows that did not ask cost nothing.
"""

from __future__ import annotations

import torch

from pocketgpt.app.engine.types import Logprob

MAX_TOP_LOGPROBS = 20  # the most alternatives a request may ask for per token (OpenAI's bound)


def log_probs(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """(N, V) logits -> float32 log-probabilities over the first `vocab` ids (the rest -inf)."""
    logits = logits.float()
    if vocab < logits.size(-1):
        logits = logits.clone()
        logits[..., vocab:] = float("-inf")
    return logits.log_softmax(dim=-1)


def gather(logprobs: torch.Tensor, targets: torch.Tensor, ks: list[int]) -> list[Logprob]:
    """Row i's log-probability of `targets[i]` and its `ks[i]` most likely tokens, as `Logprob`s."""
    chosen = logprobs.gather(1, targets.view(-1, 1)).squeeze(1)
    k = min(max(ks, default=0), logprobs.size(-1))
    ids = vals = None
    if k > 0:
        vals, ids = logprobs.topk(k, dim=-1)
        ids, vals = ids.tolist(), vals.tolist()
    out = []
    for i, (token, lp) in enumerate(zip(targets.tolist(), chosen.tolist(), strict=True)):
        top = tuple(zip(ids[i][: ks[i]], vals[i][: ks[i]], strict=True)) if ids is not None else ()
        out.append(Logprob(token, lp, top))
    return out
