"""How well a fine-tuned model answers held-out examples: loss on the answer tokens, and greedy answers scored
against the references (exact match, BLEU, ROUGE via training.evaluate).

Shared by the trainer's periodic evaluation (task sft) and `python -m pocketgpt.training eval --sft FILE`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pocketgpt.model.generate import stream_tokens
from pocketgpt.model.gpt import GPT
from pocketgpt.model.sampling import SamplingParams
from pocketgpt.model.tokenizer import Tokenizer
from pocketgpt.training.evaluate import text_metrics
from pocketgpt.training.sft_data import SFTExample
from pocketgpt.training.sft_sampler import IGNORE, collate

MAX_SCORED = 64  # held-out answers generated per evaluation: greedy decoding is the slow part
EXTRA_TOKENS = 8  # generate this much past the reference's length, so a rambling answer shows as wrong

GREEDY = SamplingParams(temperature=0.0)
Autocast = Callable[[], contextlib.AbstractContextManager]  # the trainer's mixed-precision context


@dataclass
class SFTEval:
    loss: float  # mean nats per answer token
    bpb: float | None  # bits per byte of answer text
    sample: str  # the first held-out prompt and the model's answer
    scores: dict[str, Any]  # exact_match, bleu, rouge1/2/L (percentages), scored, samples (the first 3)


@torch.no_grad()
def answer_loss(model: GPT, examples: list[SFTExample], tokenizer: Tokenizer, batch_size: int,
                device: torch.device, autocast: Autocast) -> tuple[float, float | None]:
    """(mean nats per target token, bits per byte of the target tokens' text) over `examples`."""
    nats, count, n_bytes = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        x, y = collate(examples[i : i + batch_size], tokenizer.eot_id)
        with autocast():
            logits, _ = model(x.to(device))
        nats += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE,
                                      reduction="sum"))
        targets = y[y != IGNORE].tolist()
        count += len(targets)
        n_bytes += sum(len(tokenizer.token_bytes(t)) for t in targets)
    loss = nats / max(count, 1)
    return loss, (nats / (math.log(2) * n_bytes) if n_bytes else None)


def greedy_answer(model: GPT, example: SFTExample) -> list[int]:
    """The model's greedy answer to the example's prompt, cut at the first stop token (not included)."""
    prompt = example.ids[: example.prompt_len]
    room = model.config.block_size - len(prompt)
    out: list[int] = []
    if room <= 0:
        return out
    stops = set(example.stop_ids)
    for token in stream_tokens(model, prompt, min(example.answer_len + EXTRA_TOKENS, room), params=GREEDY,
                               eos_id=example.stop_ids[0]):
        if token in stops:
            break
        out.append(token)
    return out


def answer_scores(model: GPT, tokenizer: Tokenizer, examples: list[SFTExample], limit: int = MAX_SCORED
                  ) -> dict[str, Any]:
    """Exact match (after stripping surrounding whitespace), BLEU and ROUGE of greedy answers, in percent."""
    scored = examples[:limit]
    hyps = [tokenizer.decode(greedy_answer(model, e)) for e in scored]
    refs = [e.reference for e in scored]
    exact = 100 * sum(h.strip() == r.strip() for h, r in zip(hyps, refs, strict=True)) / len(scored)
    shown = [{"prompt": tokenizer.decode(e.ids[: e.prompt_len]), "reference": r, "answer": h}
             for e, r, h in list(zip(scored, refs, hyps, strict=True))[:3]]
    return {"scored": len(scored), "exact_match": exact, **text_metrics(hyps, refs), "samples": shown}


def evaluate_sft(model: GPT, tokenizer: Tokenizer, examples: list[SFTExample], batch_size: int,
                 device: torch.device, autocast: Autocast = contextlib.nullcontext, limit: int = MAX_SCORED
                 ) -> SFTEval:
    """Loss and answer scores on held-out `examples` (the model is put in eval mode and left there)."""
    model.eval()
    loss, bpb = answer_loss(model, examples, tokenizer, batch_size, device, autocast)
    scores = answer_scores(model, tokenizer, examples, limit)
    first = scores["samples"][0]
    return SFTEval(loss=loss, bpb=bpb, sample=f"{first['prompt']!r} -> {first['answer']!r}", scores=scores)
