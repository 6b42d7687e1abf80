"""Supervised fine-tuning data: JSONL examples -> token ids with a loss mask, and a held-out split.

Each non-empty line of a data file (any name; folders and globs work as for pretraining) is one example:

    {"prompt": "What is 2 plus 3?", "completion": " 5"}
        prompt tokens, completion tokens, EOT; the loss is on the completion and the EOT. The prompt is
        encoded on its own, as /v1/completions encodes it, so training sees the token boundary serving sees.
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
        rendered with the chat template (model.chat); the loss is on every assistant message and its end
        marker. Markers the tokenizer lacks are added to it (the model grows rows for them).

Examples longer than the context (block_size + 1 tokens) are dropped and counted. A `val_fraction` share of the
examples (at least one), chosen by the seed, is held out: the trainer reports loss on it and scores the greedy
answer to its last assistant message / completion against the reference (exact match, BLEU, ROUGE).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pocketgpt.model.chat import ChatTemplate
from pocketgpt.model.tokenizer import Tokenizer
from pocketgpt.training.config import STDLIB
from pocketgpt.training.errors import DataError
from pocketgpt.training.sources import expand_sources

FORMAT_VERSION = 1


@dataclass(frozen=True)
class SFTExample:
    """One encoded example. `mask[i]`: ids[i] is a target. ids[:prompt_len] prompts the last answer."""

    ids: list[int]
    mask: list[bool]
    prompt_len: int
    reference: str  # the text of the last answer (completion or assistant message)
    stop_ids: tuple[int, ...]  # tokens that end an answer when generating it

    @property
    def answer_len(self) -> int:
        """Tokens of the last answer, its end token included."""
        return len(self.ids) - self.prompt_len


@dataclass
class SFTData:
    """Encoded train and held-out examples, the tokenizer they were encoded with, and the chat template."""

    tokenizer: Tokenizer
    template: ChatTemplate | None
    train: list[SFTExample]
    val: list[SFTExample]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_length(self) -> float:
        """Mean input length (tokens) of a training example."""
        return sum(len(e.ids) - 1 for e in self.train) / len(self.train)


def read_records(specs: list[str]) -> list[tuple[str, Any]]:
    """(file:line, parsed JSON) for every non-empty line of the data files; also hashes their bytes."""
    if STDLIB in specs:
        raise DataError("task sft needs JSONL examples (prompt/completion or messages), not the 'stdlib' corpus")
    records: list[tuple[str, Any]] = []
    for source in expand_sources(specs):
        try:
            text = source.path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {source.path} as UTF-8 JSONL: {e}") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{source.path}:{lineno}"
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
    return records


def uses_messages(records: list[tuple[str, Any]]) -> bool:
    return any(isinstance(r, dict) and "messages" in r for _, r in records)


def encode_record(where: str, record: Any, tokenizer: Tokenizer, template: ChatTemplate | None) -> SFTExample:
    """Encode one example; a DataError names the line and what is wrong with it."""
    eot = tokenizer.eot_id
    if isinstance(record, dict) and "messages" in record:
        if template is None:
            raise DataError(f"{where}: a messages example needs a chat template, and the checkpoint has none")
        return _encode_messages(where, record["messages"], tokenizer, template)
    if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)
            and isinstance(record.get("completion"), str)):
        raise DataError(f'{where}: expected {{"prompt": str, "completion": str}} or {{"messages": [...]}}')
    if not record["prompt"]:
        raise DataError(f"{where}: the prompt is empty (the model needs something to answer)")
    prompt, completion = tokenizer.encode(record["prompt"]), tokenizer.encode(record["completion"])
    ids = [*prompt, *completion, eot]
    mask = [False] * len(prompt) + [True] * (len(completion) + 1)
    return SFTExample(ids, mask, len(prompt), record["completion"], (eot,))


def _encode_messages(where: str, messages: Any, tokenizer: Tokenizer, template: ChatTemplate) -> SFTExample:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: messages must be a list of {{\"role\", \"content\"}} objects")
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: the conversation has no assistant message to learn")
    try:
        full = template.render(tokenizer, messages)
        prompt = template.render(tokenizer, messages[:last], add_generation_prompt=True)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    stops = (*template.stop_ids(tokenizer), tokenizer.eot_id)
    return SFTExample(full.ids, full.mask, len(prompt.ids), messages[last]["content"], stops)


def encode_all(records: list[tuple[str, Any]], tokenizer: Tokenizer, template: ChatTemplate | None,
               block_size: int) -> tuple[list[SFTExample], int]:
    """(examples that fit the context, how many were dropped for being too long)."""
    examples, dropped = [], 0
    for where, record in records:
        example = encode_record(where, record, tokenizer, template)
        if len(example.ids) - 1 > block_size:
            dropped += 1
        else:
            examples.append(example)
    return examples, dropped


def _fingerprint(records: list[tuple[str, Any]], tokenizer: Tokenizer, template: ChatTemplate | None,
                 settings: list[Any]) -> str:
    """Identifies the exact examples, tokenizer, template and split a run trained on (stored in checkpoints)."""
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, settings, template.to_dict() if template else None]).encode())
    h.update(tokenizer.to_str().encode("utf-8"))
    for _, record in records:
        h.update(json.dumps(record, sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def prepare_sft(specs: list[str], tokenizer: Tokenizer, template: ChatTemplate | None, *, block_size: int,
                val_fraction: float, seed: int, log: Callable[[str], None] = print) -> SFTData:
    """Read, encode and split the examples of `specs` for the checkpoint with `tokenizer` and `template`.

    Messages data uses the checkpoint's template, or the default one; its markers are added to the tokenizer
    when missing (the returned tokenizer is then larger than the one given).
    """
    records = read_records(specs)
    if uses_messages(records):
        template = template or ChatTemplate()
        grown = tokenizer.with_special_tokens(template.special_tokens)
        if grown.vocab_size > tokenizer.vocab_size:
            log(f"added chat markers {template.special_tokens} to the tokenizer "
                f"({tokenizer.vocab_size} -> {grown.vocab_size} tokens)")
        tokenizer = grown
    examples, dropped = encode_all(records, tokenizer, template, block_size)
    if dropped:
        log(f"warning: dropped {dropped} example(s) longer than the context of {block_size} tokens")
    if len(examples) < 2:
        raise DataError(f"{', '.join(specs)}: {len(examples)} usable example(s) ({dropped} too long); need at "
                        "least 2 (one to train on, one held out)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(examples) * val_fraction)), len(examples) - 1)
    val = [examples[i] for i in sorted(order[:n_val])]
    train = [examples[i] for i in sorted(order[n_val:])]
    meta = {
        "fingerprint": _fingerprint(records, tokenizer, template, [block_size, val_fraction, seed]),
        "examples": len(examples),
        "train_examples": len(train), "val_examples": len(val), "dropped_too_long": dropped,
        "files": len(expand_sources(specs)), "sources": specs,
    }
    log(f"sft data: {len(train)} training + {len(val)} held-out example(s) from {meta['files']} file(s)")
    return SFTData(tokenizer, template, train, val, meta)

