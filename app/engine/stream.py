"""Turning sampled token ids into text that is safe to send: whole UTF-8 characters, no stop-string leaks.

A stop string can arrive split over several tokens ("ST" then "OP"). Text that could be the start of a stop
string is therefore held back until the next token shows whether it was; text before a completed stop
string is released and everything from the stop string on is dropped.
"""

from __future__ import annotations

from pocketgpt.model.tokenizer import StreamDecoder, Tokenizer


class StopHolder:
    """Text-level stop-string detection with a held-back tail. Knows nothing about tokens."""

    def __init__(self, stop: tuple[str, ...] | list[str] = ()) -> None:
        self.stop = tuple(s for s in stop if s)
        self._held = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Add text; return (text safe to release, the stop string that matched or None)."""
        buf = self._held + text
        if not self.stop:
            self._held = ""
            return buf, None
        # The earliest match wins; at the same position the longest one, so "\n\n" beats "\n".
        hit: tuple[int, int, str] | None = None
        for s in self.stop:
            i = buf.find(s)
            if i >= 0 and (hit is None or (i, -len(s)) < (hit[0], hit[1])):
                hit = (i, -len(s), s)
        if hit is not None:
            self._held = ""
            return buf[: hit[0]], hit[2]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """End of output: whatever is held was not a stop string after all."""
        text, self._held = self._held, ""
        return text

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best


class TextStream:
    """Token ids in, releasable text out: UTF-8 holding (StreamDecoder) followed by stop-string holding."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] | list[str] = (), skip: bytes = b"") -> None:
        self._tokenizer = tokenizer
        self._decoder = StreamDecoder(tokenizer)
        self._stops = StopHolder(stop)
        self._vocab = tokenizer.vocab_size
        self._skip = skip  # token healing: the prompt already holds these bytes of the first token

    def push(self, token_id: int) -> tuple[str, str | None]:
        """Add one token; return (text to release now, matched stop string or None)."""
        # Ids past the tokenizer (a padded embedding table) carry no text.
        data = self._tokenizer.token_bytes(token_id) if 0 <= token_id < self._vocab else b""
        if self._skip:
            data, self._skip = data.removeprefix(self._skip), b""
        return self._stops.push(self._decoder.push_bytes(data))

    def finish(self) -> tuple[str, str | None]:
        """End of generation: release held bytes (an incomplete character becomes U+FFFD) and held text."""
        text, stop = self._stops.push(self._decoder.flush())
        if stop is not None:
            return text, stop
        return text + self._stops.flush(), None
