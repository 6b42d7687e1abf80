"""Structured output: constrained decoding with llguidance (JSON schema, any JSON object, regex, Lark grammar).

A request's constraint is compiled off the decode thread (in the request's tokenizing worker thread), into an
`llguidance.LLMatcher` over the served tokenizer's byte table; compiled matchers are kept in a bounded LRU by
(kind, source) and each request gets a cheap `deep_copy` of the cached one. On the decode thread the runner asks
a constrained row's matcher for its allowed-token bitmask before sampling (unconstrained rows pay nothing), and
the output hands it every sampled token; when the grammar can take nothing more the request ends (`eos`).

llguidance was chosen over xgrammar and outlines-core (docs/structured.md has the measurements): it is a small
Rust wheel with no dependencies (xgrammar requires torch, transformers and triton), compiles a JSON schema in
about a millisecond without precomputing anything per vocabulary (outlines-core builds a regex index over the
whole vocabulary per schema), and supports JSON schema references and recursion. It is imported lazily: a
server that never sees a constrained request never loads it.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from pocketgpt.model.tokenizer import Tokenizer

GrammarKind = Literal["json_schema", "regex", "grammar"]
# JSON output as json.dumps writes it by default (", " and ": ", no other whitespace): what models have seen most,
# and a random-weight model cannot wander off into endless whitespace. A schema's "x-guidance" may override it.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = '{"type": "object"}'  # response_format json_object


class GrammarError(ValueError):
    """The constraint cannot be compiled (an unsupported keyword, a bad regex...); the message says why."""


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint as the client sent it: `kind` and its `source` (a JSON schema as canonical JSON text, a
    regex or a Lark grammar). Hashable, so it keys the compiled-grammar cache."""

    kind: GrammarKind
    source: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> GrammarSpec:
        # Key order is kept: the output's properties come in the schema's order.
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))


class Constraint:
    """One request's matcher: the bitmask of allowed tokens now, and the tokens it has taken."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bitmask (int32 words, 32 tokens each) into `bitmask[row]` (a contiguous CPU
        tensor). What llguidance.torch's helper does, without importing that module (it runs torch.compile)."""
        words = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def advance(self, token: int) -> bool:
        """Take a sampled token; False if the grammar refused it (the matcher is then in an error state)."""
        return bool(self._matcher.consume_token(token))

    @property
    def done(self) -> bool:
        """The grammar can take nothing more: the output is complete."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str:
        return self._matcher.get_error()


def allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Boolean (rows, vocab) view of int32 bitmask words: token t is allowed where bit t % 32 of word t // 32 is
    set."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab].bool()


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: each token's bytes, the special ids and an encoder (used for
    tokens the grammar forces)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        specials = {tokenizer.token_id(t) for t in tokenizer.special_tokens}
        # Special tokens have no bytes in our table; llguidance wants a name for them (it never matches text).
        self.tokens = [f"<special_{i}>".encode() if i in specials else tokenizer.token_bytes(i)
                       for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(specials)
        self.eos_token_id = tokenizer.eot_id
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer
        self._ids: dict[bytes, int] | None = None  # bytes -> id, for the greedy fallback (built when first needed)

    def __call__(self, text: str | bytes) -> list[int]:
        """Ids whose bytes are exactly `text`'s: the tokenizer's own encoding when it is (a SentencePiece-style
        tokenizer puts a "▁" space before the first word, which the grammar did not ask for), else the longest
        tokens greedily."""
        data = text if isinstance(text, bytes) else text.encode()
        ids = self._tokenizer.encode(data.decode("utf-8", errors="replace"), allow_special=False)
        if b"".join(self._tokenizer.token_bytes(i) for i in ids) == data:
            return ids
        return self._greedy(data)

    def _greedy(self, data: bytes) -> list[int]:
        if self._ids is None:
            self._ids = {}
            for i, b in enumerate(self.tokens):
                if b and i not in self.special_token_ids:
                    self._ids.setdefault(b, i)
        longest = max(map(len, self._ids))
        out, i = [], 0
        while i < len(data):
            for j in range(min(len(data), i + longest), i, -1):
                token = self._ids.get(data[i:j])
                if token is not None:
                    out.append(token)
                    i = j
                    break
            else:  # a byte no token holds (a vocabulary without all 256 bytes): skip it
                i += 1
        return out


class GrammarCache:
    """Compiles constraints for one tokenizer and keeps the last `size` compiled ones (thread-safe)."""

    def __init__(self, tokenizer: Tokenizer, size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.size = size
        self._lock = threading.Lock()
        self._lltok: Any = None
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self.hits = self.misses = 0

    def _llg_tokenizer(self) -> Any:
        import llguidance

        if self._lltok is None:  # under the lock: built once (about 0.3 s for a 32k vocabulary)
            # Every id that ends a generation counts as end of text: the grammar allows them once it is complete.
            self._lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(self.tokenizer)),
                                                 eos_token=list(self.tokenizer.stop_ids))
        return self._lltok

    def constraint(self, spec: GrammarSpec) -> Constraint:
        """A fresh matcher for `spec`; raises GrammarError if it cannot be compiled."""
        with self._lock:
            matcher = self._cache.get(spec)
            if matcher is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
            else:
                self.misses += 1
                matcher = self._compile(spec)
                self._cache[spec] = matcher
                if len(self._cache) > self.size:
                    self._cache.popitem(last=False)
            return Constraint(matcher.deep_copy())

    def _compile(self, spec: GrammarSpec) -> Any:
        import llguidance

        LLMatcher = llguidance.LLMatcher  # the library's class name
        try:  # a native library's boundary: whatever it raises (a Rust panic too) is this request's problem
            if spec.kind == "json_schema":
                grammar = LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS)
            elif spec.kind == "regex":
                grammar = LLMatcher.grammar_from_regex(spec.source)
            else:
                grammar = LLMatcher.grammar_from_lark(spec.source)
            matcher = LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # pyo3's PanicException derives from BaseException
            raise GrammarError(str(exc) or type(exc).__name__) from None
        if matcher.is_error():  # the constructor never raises for a bad grammar: it records the error
            raise GrammarError(matcher.get_error())
        return matcher
