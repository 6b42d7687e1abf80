"""Log-probabilities in the OpenAI response shapes (the engine hands them over as token ids, `Logprob`).

A token's string is its text when its bytes are whole UTF-8; a token holding part of a multi-byte character
(byte-level BPE splits CJK and emoji) is written `bytes:\\xe5\\x8d` (its bytes, escaped), as OpenAI's chat
`bytes` field exists for; a special token is its name ("<|endoftext|>"). Chat entries also carry `bytes`.
Completions' `text_offset` is each token's character offset in the choice's `text` (the prompt included with
`echo`); a token that starts inside a character points at that character.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from typing import Any

from pocketgpt.app.engine.types import Logprob
from pocketgpt.model.tokenizer import Tokenizer


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The token's bytes; a special token's are its name's."""
    data = tokenizer.token_bytes(token_id)
    return data or (tokenizer.token_name(token_id) or "").encode()


def token_str(tokenizer: Tokenizer, token_id: int) -> str:
    """The token as a string: its text, `bytes:\\xNN...` when it is not whole UTF-8, or a special token's name."""
    data = tokenizer.token_bytes(token_id)
    if not data:
        return tokenizer.token_name(token_id) or ""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def logprob_dict(entry: Logprob) -> dict[str, Any]:
    """/v1/generate's shape of one token's logprobs: token ids, as that route's token events carry them."""
    return {"id": entry.token, "logprob": entry.logprob,
            "top_logprobs": [{"id": i, "logprob": lp} for i, lp in entry.top]}


class CompletionLogprobs:
    """Builds completions' `logprobs` objects ({tokens, token_logprobs, top_logprobs, text_offset}) for one
    choice, chunk after chunk: the text offsets run on across the chunks of a stream."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = 0

    def build(self, entries: Iterable[tuple[int, Logprob | None]]) -> dict[str, Any]:
        """The object for `entries` (token id, its logprobs or None: a prompt's first token)."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in entries:
            out["text_offset"].append(self._offset)
            self._offset += len(self._decoder.decode(self.tokenizer.token_bytes(token)))  # special tokens: no text
            out["tokens"].append(token_str(self.tokenizer, token))
            out["token_logprobs"].append(None if entry is None else entry.logprob)
            out["top_logprobs"].append(None if entry is None else self._top(entry))
        return out

    def _top(self, entry: Logprob) -> dict[str, float]:
        # As OpenAI's: the k most likely, plus the chosen token when it is not among them (up to k + 1 entries).
        top = {token_str(self.tokenizer, i): lp for i, lp in entry.top}
        top.setdefault(token_str(self.tokenizer, entry.token), entry.logprob)
        return top


def chat_logprobs(tokenizer: Tokenizer, entries: Iterable[Logprob]) -> dict[str, Any]:
    """Chat's `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        return {"token": token_str(tokenizer, token), "logprob": logprob, "bytes": list(token_bytes(tokenizer, token))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]}
                        for e in entries], "refusal": None}
