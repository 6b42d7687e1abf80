"""Reference single-prompt generation: prefill into a one-slot KV cache, then cached decode."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pocketgpt.model.gpt import GPT
from pocketgpt.model.kv_cache import KVCache
from pocketgpt.model.sampling import SamplingParams, make_generator, sample


def stream_tokens(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    prefill_chunk: int = 512,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt`, stopping after `eos_id` (not yielded)."""
    if not prompt:
        raise ValueError("prompt must contain at least one token")
    params = params or SamplingParams()
    limit = model.config.block_size
    if len(prompt) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds context {limit}")
    device = next(model.parameters()).device
    cache = KVCache.for_model(model, n_slots=1, max_len=len(prompt) + max_new_tokens)
    generator = make_generator(seed) if seed is not None else None
    vocab = model.config.vocab_size
    counts = torch.zeros(1, vocab, dtype=torch.int32, device=device)
    prompt_mask = torch.zeros(1, vocab, dtype=torch.bool, device=device)
    prompt_mask[0, torch.tensor(prompt, device=device)] = True

    logits = None
    for start in range(0, len(prompt), prefill_chunk):
        chunk = torch.tensor([prompt[start : start + prefill_chunk]], device=device)
        logits = model.forward_cached(chunk, cache, [0], [start])
    pos = len(prompt)
    for i in range(max_new_tokens):
        token = int(sample(logits, [params], [generator], counts, prompt_mask)[0])
        if token == eos_id:
            return
        yield token
        if i == max_new_tokens - 1:
            return  # no forward pass for a token nobody will sample after
        counts[0, token] += 1
        logits = model.forward_cached(torch.tensor([[token]], device=device), cache, [0], [pos])
        pos += 1


def generate(model: GPT, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """All tokens of `stream_tokens` as a list."""
    return list(stream_tokens(model, prompt, max_new_tokens, **kwargs))
