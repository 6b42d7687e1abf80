"""`python -m pocketgpt.training eval`: how well a checkpoint models a text.

- loss, perplexity and bits per byte over the text, cut into consecutive context-sized windows (every token
  scored once; bytes counted exactly from the tokens scored);
- BLEU (sacrebleu) and ROUGE-1/2/L F1 (rouge-score) of greedy continuations against references: the text is
  cut into chunks spread evenly over it, each chunk's first tokens are the prompt and the next ones the
  reference. `--prompts FILE` (JSONL of {"prompt": ..., "reference": ...}) gives held-out pairs instead.
- `--sft FILE`: held-out fine-tuning examples (prompt/completion or messages, as `train --task sft` reads):
  loss on the answer tokens, and exact match, BLEU and ROUGE of greedy answers (training.sft_eval).

Chinese is scored per character: sacrebleu's `zh` tokenizer, and a ROUGE tokenizer that splits CJK characters
(rouge-score's default one drops every non-ASCII character).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from pocketgpt.training.errors import DataError, UserError

CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_CJK_CHAR = re.compile(f"([{CJK}])")
_WORD = re.compile(r"[^\W_]+")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory (e.g. RUN_DIR/best)")
    p.add_argument("--data", nargs="+", action="extend", metavar="SOURCE",
                   help="text to evaluate on: files, folders, globs, .jsonl or stdlib")
    p.add_argument("--prompts", metavar="FILE", help='JSONL of {"prompt": ..., "reference": ...} pairs')
    p.add_argument("--sft", metavar="FILE", help="JSONL of held-out fine-tuning examples to answer and score")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps (default: auto)")
    p.add_argument("--max-tokens", type=int, default=200_000, help="score at most this many tokens (200000)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (8)")
    p.add_argument("--n-prompts", type=int, default=20, help="prompts cut from --data for BLEU/ROUGE (20)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (64)")
    p.add_argument("--reference-tokens", type=int, default=32, help="tokens per reference/continuation (32)")


class RougeTokenizer:
    """Lower-cased Unicode words, with every CJK character a word of its own."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(_CJK_CHAR.sub(r" \1 ", text.lower()))


def is_mostly_cjk(texts: list[str]) -> bool:
    chars = "".join(texts)
    letters = sum(ch.isalnum() for ch in chars)
    return letters > 0 and len(_CJK_CHAR.findall(chars)) / letters > 0.3


def text_metrics(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and mean ROUGE-1/2/L F1 (as percentages) of hypotheses against references."""
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(hypotheses, [references], tokenize="zh" if is_mostly_cjk(references) else "13a")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=RougeTokenizer())
    scores = [scorer.score(ref, hyp) for ref, hyp in zip(references, hypotheses, strict=True)]
    rouge = {k: 100 * sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}
    return {"bleu": bleu.score, **rouge}


def corpus_tokens(specs: list[str], tokenizer: Any, limit: int) -> Any:
    """Token ids of the documents of `specs` joined by EOT, cut to `limit` tokens (int64 numpy array)."""
    import numpy as np

    from pocketgpt.training.sources import ReadStats, expand_sources, iter_documents

    ids: list[int] = []
    for doc in iter_documents(expand_sources(specs), ReadStats()):
        if ids:
            ids.append(tokenizer.eot_id)
        ids += tokenizer.encode(doc)
        if len(ids) >= limit:
            break
    if len(ids) < 2:
        raise DataError(f"the evaluation text from {', '.join(specs)} has fewer than 2 tokens")
    return np.asarray(ids[:limit], dtype=np.int64)


def score_tokens(model: Any, tokens: Any, byte_lengths: Any, batch_size: int, device: Any) -> dict[str, Any]:
    """Loss, perplexity and bits per byte over consecutive windows covering `tokens`."""
    import torch

    T = model.config.block_size
    starts = list(range(0, len(tokens) - 1, T))
    nats, count, n_bytes = 0.0, 0, 0
    full = [s for s in starts if s + T + 1 <= len(tokens)]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[s] for s in starts if s + T + 1 > len(tokens)]  # the short tail window runs alone
    with torch.no_grad():
        for group in groups:
            n = min(T, len(tokens) - 1 - group[0])
            windows = torch.from_numpy(tokens[[list(range(s, s + n + 1)) for s in group]])
            x, y = windows[:, :-1].to(device), windows[:, 1:]
            _, loss = model(x, y.contiguous().to(device))
            nats += float(loss) * y.numel()
            count += y.numel()
            n_bytes += int(byte_lengths[y.numpy()].sum())
    loss = nats / count
    return {
        "tokens": count, "bytes": n_bytes, "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": nats / (math.log(2) * n_bytes) if n_bytes else None,
    }


def pairs_from_tokens(tokens: Any, block_size: int, n: int, prompt_len: int, ref_len: int) -> list[tuple]:
    """(prompt ids, reference ids) chunks spread evenly over `tokens`, fitting the context."""
    ref_len = min(ref_len, block_size // 2)
    prompt_len = min(prompt_len, block_size - ref_len)
    chunk = prompt_len + ref_len
    count = min(n, len(tokens) // chunk)
    if count == 0:
        return []
    starts = [round(i * (len(tokens) - chunk) / max(count - 1, 1)) for i in range(count)]
    return [(tokens[s : s + prompt_len].tolist(), tokens[s + prompt_len : s + chunk].tolist()) for s in starts]


def pairs_from_file(path: str, tokenizer: Any, block_size: int) -> list[tuple]:
    """(prompt ids, reference ids) from a JSONL prompts file; long prompts keep their end."""
    pairs = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt, ref = tokenizer.encode(item["prompt"]), tokenizer.encode(item["reference"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{lineno}: expected {{\"prompt\": str, \"reference\": str}}") from None
        ref = ref[: block_size // 2]
        prompt = prompt[-(block_size - max(len(ref), 1)) :] or [tokenizer.eot_id]
        pairs.append((prompt, ref))
    if not pairs:
        raise UserError(f"{path} holds no prompts")
    return pairs


def continuation_metrics(model: Any, tokenizer: Any, pairs: list[tuple]) -> dict[str, Any]:
    """BLEU/ROUGE of greedy continuations (as long as each reference) and a few examples."""
    from pocketgpt.model.generate import generate
    from pocketgpt.model.sampling import SamplingParams

    hyps, refs, examples = [], [], []
    for prompt, ref in pairs:
        out = generate(model, prompt, max(len(ref), 1), params=SamplingParams(temperature=0.0))
        hyps.append(tokenizer.decode(out))
        refs.append(tokenizer.decode(ref))
        if len(examples) < 3:
            examples.append({"prompt": tokenizer.decode(prompt), "reference": refs[-1], "continuation": hyps[-1]})
    return {"prompts": len(pairs), **text_metrics(hyps, refs), "examples": examples}


def evaluate_checkpoint(ns: argparse.Namespace) -> dict[str, Any]:
    """All metrics for the `eval` arguments in `ns`."""
    from pocketgpt.model.checkpoint import CheckpointError, load_checkpoint
    from pocketgpt.training.data import token_byte_lengths
    from pocketgpt.training.distributed import DistContext, pick_device

    if not ns.data and not ns.prompts and not ns.sft:
        raise UserError("give the text to evaluate on with --data (and/or held-out pairs with --prompts or --sft)")
    try:
        ckpt = load_checkpoint(ns.checkpoint, device=pick_device(ns.device, DistContext()))
    except CheckpointError as e:
        raise UserError(str(e)) from None
    model, tok = ckpt.model, ckpt.tokenizer
    device = next(model.parameters()).device
    result: dict[str, Any] = {"checkpoint": str(ckpt.path), "step": ckpt.meta.get("step")}
    pairs: list[tuple] = []
    if ns.data:
        tokens = corpus_tokens(ns.data, tok, ns.max_tokens)
        result.update(score_tokens(model, tokens, token_byte_lengths(tok), ns.batch_size, device))
        pairs = pairs_from_tokens(tokens, model.config.block_size, ns.n_prompts, ns.prompt_tokens,
                                  ns.reference_tokens)
    if ns.prompts:
        pairs = pairs_from_file(ns.prompts, tok, model.config.block_size)
    if pairs:
        result.update(continuation_metrics(model, tok, pairs))
    if ns.sft:
        result["sft"] = sft_metrics(ckpt, ns.sft, ns.batch_size, device)
    return result


def sft_metrics(ckpt: Any, path: str, batch_size: int, device: Any) -> dict[str, Any]:
    """Answer loss and scores of a checkpoint on a file of fine-tuning examples."""
    from pocketgpt.training.sft_data import encode_all, read_records
    from pocketgpt.training.sft_eval import evaluate_sft

    examples, dropped = encode_all(read_records([path]), ckpt.tokenizer, ckpt.chat_template,
                                   ckpt.config.block_size)
    if not examples:
        raise UserError(f"{path} holds no example that fits the context ({dropped} too long)")
    ev = evaluate_sft(ckpt.model, ckpt.tokenizer, examples, batch_size, device, limit=len(examples))
    return {"examples": len(examples), "dropped_too_long": dropped, "loss": ev.loss, "bits_per_byte": ev.bpb,
            **{k: v for k, v in ev.scores.items() if k != "scored"}}


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['checkpoint']} (step {result['step']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("tokens", "tokens", "{:,}"), ("bytes", "bytes", "{:,}"), ("loss (nats/token)", "loss", "{:.4f}"),
            ("perplexity", "perplexity", "{:.2f}"), ("bits per byte", "bits_per_byte", "{:.4f}"),
            ("prompts", "prompts", "{}"), ("BLEU", "bleu", "{:.2f}"), ("ROUGE-1 F1", "rouge1", "{:.2f}"),
            ("ROUGE-2 F1", "rouge2", "{:.2f}"), ("ROUGE-L F1", "rougeL", "{:.2f}")]
    sft = result.get("sft") or {}
    rows += [("sft examples", "sft.examples", "{}"), ("sft answer loss", "sft.loss", "{:.4f}"),
             ("sft exact match %", "sft.exact_match", "{:.2f}"), ("sft BLEU", "sft.bleu", "{:.2f}"),
             ("sft ROUGE-L F1", "sft.rougeL", "{:.2f}")]
    for label, key, fmt in rows:
        value = sft.get(key[4:]) if key.startswith("sft.") else result.get(key)
        if value is not None:
            table.add_row(label, fmt.format(value))
    Console().print(table)


def cmd_eval(ns: argparse.Namespace) -> int:
    result = evaluate_checkpoint(ns)
    if ns.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print_table(result)
    return 0
