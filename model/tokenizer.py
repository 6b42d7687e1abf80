"""BPE tokenizers (Hugging Face `tokenizers`) plus an incremental stream decoder.

Two kinds of tokenizer.json read here: byte-level BPE (GPT-2, ours, Llama 3, Qwen2, SmolLM2) and
SentencePiece-style BPE with a Metaspace ("▁" for space) and byte fallback ("<0xE5>" tokens for bytes
the vocabulary lacks: Llama 2, TinyLlama, Mistral). Either way every token maps to exact bytes, so any
text encodes and decodes back exactly. Decoding is done here from a precomputed id -> bytes table instead
of the library's decoder, so that whole-sequence decoding and streaming decoding are the same byte
concatenation followed by the same UTF-8 decoding, and cannot disagree; token healing and stop strings
work on those bytes too. (The library's `decoders.DecodeStream` is not used: it has no end-of-stream
flush, so bytes of an unfinished character would vanish instead of becoming U+FFFD, and it yields text,
not the bytes token healing needs.) One difference from the library's decode: a SentencePiece tokenizer's
leading "▁" is kept as a space, which is what a continuation of a prompt needs ("Hello" + " world").

`TokenizerSettings` (a `tokenizer_config.json` beside tokenizer.json, in Hugging Face's key names) says
which token ends a text, whether prompts start with a BOS token, and which other tokens end a generation
(a chat model's end-of-turn, from generation_config.json). Without it: our own tokenizers' defaults.

Note: by default a literal "<|endoftext|>" in input text is encoded as the special EOT id (the
library's default for special tokens, which training data relies on). Untrusted text (the server's
prompts and chat messages) is encoded with `allow_special=False`: there it is plain text.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT]  # EOT is first so it gets id 0
MIN_VOCAB_SIZE = 260  # 256 byte tokens + special tokens + a few merges

TOKENIZER_FILENAME = "tokenizer.json"
# Texts at least this long are encoded through the library's batch call, which releases the GIL while it works
# (its single-text call holds it): a server thread encoding a long prompt then does not stall the event loop.
RELEASE_GIL_CHARS = 2048
SETTINGS_FILENAME = "tokenizer_config.json"
METASPACE = "▁"
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback
# CJK characters (kana, Han, hangul, CJK and full-width punctuation) that a trained tokenizer keeps whole:
# each is a piece of its own before byte-level BPE, so merges build characters, never runs of them. Chinese has
# no spaces, so without this a whole line is one "word": BPE training on 3 MB of poems took 10x longer, and a
# small vocabulary went to multi-character pieces instead of covering the characters (bench/budget.py).
CJK_CHARS = "\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\uff00-\uffef"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's fixed byte -> printable-character table used by byte-level BPE.

    Printable Latin-1 bytes map to themselves; the rest (control chars, space, ...) are
    shifted to code points 256+ so that every token is a string of visible characters.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


BYTE_ENCODER = _bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


@dataclass(frozen=True)
class TokenizerSettings:
    """The tokens with a role: end of text, beginning of text (prepended to prompts when `add_bos`), and
    further tokens that end a generation (e.g. "<|im_end|>", "<|eot_id|>")."""

    eos_token: str = EOT
    bos_token: str | None = None
    add_bos: bool = False
    stop_tokens: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"eos_token": self.eos_token, "bos_token": self.bos_token, "add_bos_token": self.add_bos,
                "stop_tokens": list(self.stop_tokens)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerSettings:
        """Parse our keys (Hugging Face's names; tokens may be {"content": ...} objects as HF writes them)."""
        def token(value: Any) -> str | None:
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None and not isinstance(value, str):
                raise ValueError(f"a token must be a string, got {value!r}")
            return value

        eos = token(data.get("eos_token")) or EOT
        stops = data.get("stop_tokens") or []
        if not isinstance(stops, list):
            raise ValueError("stop_tokens must be a list of strings")
        return cls(eos_token=eos, bos_token=token(data.get("bos_token")),
                   add_bos=bool(data.get("add_bos_token", False)),
                   stop_tokens=tuple(t for t in map(token, stops) if t))

    def is_default(self) -> bool:
        return self == TokenizerSettings()


def _decoder_parts(spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A tokenizer.json decoder as a flat list (Sequence decoders unpacked)."""
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [p for d in spec.get("decoders", []) for p in _decoder_parts(d)]
    return [spec]


def _token_kind(hf: HFTokenizer) -> str:
    """"byte-level" or "metaspace", from the tokenizer's decoder; ValueError for anything else."""
    parts = _decoder_parts(json.loads(hf.to_str()).get("decoder"))
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return "byte-level"
    if "Metaspace" in types or any(p.get("type") == "Replace" and (p.get("pattern") or {}).get("String") == METASPACE
                                   for p in parts):
        return "metaspace"
    raise ValueError(f"unsupported tokenizer (decoder {sorted(map(str, types)) or 'none'}): pocketgpt reads "
                     "byte-level BPE and SentencePiece-style (Metaspace, byte fallback) tokenizers")


def _resolve(path: str | Path) -> Path:
    """A directory means `<dir>/tokenizer.json` (handy for checkpoint directories)."""
    p = Path(path)
    return p / TOKENIZER_FILENAME if p.is_dir() else p


class Tokenizer:
    """Thin wrapper over a BPE `tokenizers.Tokenizer` with exact byte decoding and the role tokens' ids."""

    def __init__(self, hf: HFTokenizer, settings: TokenizerSettings | None = None) -> None:
        self._hf = hf
        self.settings = settings = settings or TokenizerSettings()
        # By token, not by position: GPT-2 has <|endoftext|> last (50256), ours first (0), Llama 2 "</s>" at 2.
        self.eot_id: int = self._require(settings.eos_token, "end-of-text")
        self.bos_id: int | None = self._require(settings.bos_token, "BOS") if settings.bos_token else None
        if settings.add_bos and self.bos_id is None:
            raise ValueError("add_bos_token is set but the tokenizer settings name no bos_token")
        # Every id that ends a generation: end of text first, then e.g. a chat model's end of turn.
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(
            [self.eot_id, *(self._require(t, "stop") for t in settings.stop_tokens)]))
        self.kind = _token_kind(hf)  # "byte-level" or "metaspace"
        self._table = self._build_byte_table(hf, self.kind)
        self._plain: HFTokenizer | None = None  # a copy that reads special-token strings as text, made lazily

    def _require(self, token: str, role: str) -> int:
        i = self._hf.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no {token!r} token (its {role} token)")
        return i

    @staticmethod
    def _build_byte_table(hf: HFTokenizer, kind: str) -> list[bytes]:
        added = hf.get_added_tokens_decoder()
        table: list[bytes] = []
        for i in range(hf.get_vocab_size(with_added_tokens=True)):
            token = hf.id_to_token(i)
            if token is None:
                raise ValueError(f"tokenizer vocabulary has a gap at id {i}")
            if i in added:
                # Special tokens are control symbols, not text: they decode to nothing. Other added tokens are
                # stored as their text.
                table.append(b"" if added[i].special else added[i].content.encode())
            elif kind == "metaspace":
                byte = BYTE_TOKEN.fullmatch(token)
                table.append(bytes([int(byte[1], 16)]) if byte else token.replace(METASPACE, " ").encode())
            else:
                try:
                    table.append(bytes(BYTE_DECODER[c] for c in token))
                except KeyError as exc:
                    raise ValueError(f"token {i} ({token!r}) is not byte-level BPE") from exc
        return table

    # -- persistence ---------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load from a tokenizer.json file (or a directory containing one), with the tokenizer_config.json
        beside it when there is one."""
        target = _resolve(path)
        side = target.with_name(SETTINGS_FILENAME)
        settings = TokenizerSettings.from_dict(json.loads(side.read_text())) if side.is_file() else None
        return cls(HFTokenizer.from_file(str(target)), settings)

    @classmethod
    def from_str(cls, json_str: str) -> Tokenizer:
        """Load from the JSON string produced by `to_str()`."""
        return cls(HFTokenizer.from_str(json_str))

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json to `path` (or into it, if it is a directory); returns the file."""
        target = _resolve(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(target))
        if not self.settings.is_default():
            target.with_name(SETTINGS_FILENAME).write_text(json.dumps(self.settings.to_dict(), indent=2) + "\n")
        return target

    def to_str(self) -> str:
        """Serialize to a JSON string (e.g. to embed in a checkpoint)."""
        return self._hf.to_str()

    # -- encoding / decoding -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding size must cover it)."""
        return len(self._table)

    def heal_prompt(self, ids: list[int]) -> tuple[list[int], bytes]:
        """Token healing: drop a trailing whitespace-only token and return it as a prefix to regenerate.

        BPE puts a space before a word in the same token (" name"), so a prompt ending in a lone " " token
        ("def ") sits in a state the model hardly saw in training. Dropping that token and requiring the first
        generated token to start with its bytes lets the model pick " name" itself.
        """
        if len(ids) < 2 or not 0 <= ids[-1] < len(self._table):
            return ids, b""
        tail = self._table[ids[-1]]
        if not tail or tail.strip():
            return ids, b""
        return ids[:-1], tail

    def ids_with_prefix(self, prefix: bytes) -> list[int]:
        """Ids of the (non-special) tokens whose bytes start with `prefix`."""
        return [i for i, b in enumerate(self._table) if b.startswith(prefix) and b]

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Encode text to ids. A literal "<|endoftext|>" becomes `eot_id` unless `allow_special` is False,
        in which case special-token strings are encoded as the plain text they are (for untrusted content,
        e.g. chat messages, where "<|assistant|>" typed by a user must not become a role marker)."""
        hf = self._hf if allow_special else self._plain_tokenizer()
        if len(text) >= RELEASE_GIL_CHARS:
            return hf.encode_batch([text], add_special_tokens=False)[0].ids
        return hf.encode(text, add_special_tokens=False).ids

    def _plain_tokenizer(self) -> HFTokenizer:
        if self._plain is None:
            plain = HFTokenizer.from_str(self._hf.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def token_id(self, token: str) -> int | None:
        """The id of a whole token (e.g. a special token such as "<|end|>"), or None if it is not one."""
        return self._hf.token_to_id(token)

    def token_name(self, token_id: int) -> str | None:
        """The vocabulary's name for a token (a special token's text, e.g. "<|endoftext|>"), None if out of range."""
        return self._hf.id_to_token(int(token_id))

    def with_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
        """A new tokenizer with `tokens` added as special tokens (appended after the last id) where missing.

        The model's embedding table must then cover the new ids (see model.vocab.add_token_rows).
        """
        hf = HFTokenizer.from_str(self._hf.to_str())
        missing = [t for t in dict.fromkeys(tokens) if hf.token_to_id(t) is None]
        if missing:
            hf.add_special_tokens(missing)
        return Tokenizer(hf, self.settings)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and each token's (start, end) character span in `text`."""
        enc = self._hf.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    @property
    def special_tokens(self) -> list[str]:
        """The strings of the special (control) tokens, e.g. "<|im_start|>", "</s>"."""
        return [t.content for t in self._hf.get_added_tokens_decoder().values() if t.special]

    def encode_prompt(self, text: str, allow_special: bool = True) -> list[int]:
        """`encode(text, allow_special)` with the BOS token first when the model expects one (add_bos_token)."""
        ids = self.encode(text, allow_special)
        return [self.bos_id, *ids] if self.settings.add_bos and self.bos_id is not None else ids

    def encode_batch(self, texts: Iterable[str], allow_special: bool = True) -> list[list[int]]:
        """Encode many texts at once (parallelised inside the library, without holding the GIL); `allow_special`
        as in `encode`."""
        hf = self._hf if allow_special else self._plain_tokenizer()
        return [e.ids for e in hf.encode_batch(list(texts), add_special_tokens=False)]

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (b"" for special tokens). Raises ValueError if out of range."""
        i = int(token_id)
        # Guard explicitly: a negative id would otherwise silently index from the end.
        if not 0 <= i < len(self._table):
            raise ValueError(f"token id {i} out of range [0, {len(self._table)})")
        return self._table[i]

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; invalid/incomplete UTF-8 becomes U+FFFD, special tokens vanish."""
        data = b"".join(self.token_bytes(i) for i in ids)
        return data.decode("utf-8", errors="replace")


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get text as soon as it is complete.

    A character whose UTF-8 bytes are split over several tokens is held back until its
    last byte arrives, so pushed pieces never contain a half character. The concatenation
    of all `push` results plus `flush()` equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly "")."""
        return self.push_bytes(self._tokenizer.token_bytes(token_id))

    def push_bytes(self, data: bytes) -> str:
        """Add raw bytes (part of a token); return the newly completed text."""
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """End of stream: return held-back bytes (an incomplete char becomes U+FFFD), then reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
                    cjk_whole: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts` with EOT as special token id 0.

    The result may have fewer than `vocab_size` ids if the corpus runs out of merges
    occurring at least `min_frequency` times. `cjk_whole`: CJK characters are pieces of their own
    (see CJK_CHARS); tokens stay byte-level either way, so decoding and streaming are unchanged.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + special tokens)"
        )
    hf = HFTokenizer(models.BPE())
    # No normalizer: text must round-trip byte for byte. No prefix space for the same reason.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(f"[{CJK_CHARS}]"), behavior="isolated"), byte_level])
        if cjk_whole else byte_level
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        # Seed all 256 bytes, even ones absent from the corpus, so nothing is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)
