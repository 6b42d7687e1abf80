"""Property tests (hypothesis) for the text path every response goes through:

- any Unicode string round-trips through the tokenizer;
- the pieces a StreamDecoder releases, joined, equal the whole decode, for any token sequence;
- stop-string holding (StopHolder, TextStream) never drops text and never leaks any part of a stop string.
"""

from __future__ import annotations

import os

import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pocketgpt.app.engine.stream import StopHolder, TextStream  # noqa: E402
from pocketgpt.model.chat import ChatTemplate  # noqa: E402
from pocketgpt.model.tokenizer import EOT, StreamDecoder, Tokenizer, train_tokenizer  # noqa: E402
from tests.conftest import small_corpus  # noqa: E402

EXAMPLES = int(os.environ.get("POCKETGPT_PROPERTY_EXAMPLES", "300"))
PROFILE = settings(max_examples=EXAMPLES, deadline=None, database=None,
                   derandomize=os.environ.get("POCKETGPT_PROPERTY_RANDOM") != "1",
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_TOK: dict[str, Tokenizer] = {}


def tok() -> Tokenizer:
    """The tests' tokenizer, with the chat markers added (so special tokens are in play too)."""
    if "t" not in _TOK:
        _TOK["t"] = train_tokenizer(small_corpus(), vocab_size=400).with_special_tokens(ChatTemplate().special_tokens)
    return _TOK["t"]


# Text likely to contain what is hard: multi-byte characters, emoji with joiners, special-token look-alikes.
TRICKY = st.sampled_from(["床前", "明月", "🚀", "👨‍👩‍👧", "é", "\u0301", "\n", "\r\n", " ", "\x00", "\ufffd", "<|",
                          "|>", EOT, "<|user|>", "<|end|>", "def ", "\t"])
ANY_TEXT = st.one_of(st.text(), st.lists(st.one_of(TRICKY, st.text(max_size=5))).map("".join))


# -- tokenizer -------------------------------------------------------------------------------------------------
@PROFILE
@given(text=ANY_TEXT)
def test_any_unicode_string_round_trips(text: str) -> None:
    t = tok()
    # As untrusted text (special-token strings stay text): always exact.
    assert t.decode(t.encode(text, allow_special=False)) == text
    # With special tokens allowed, exact too unless the text spells one (it becomes a control token).
    specials = [EOT, *ChatTemplate().special_tokens]
    if not any(s in text for s in specials):
        assert t.decode(t.encode(text)) == text


@PROFILE
@given(ids=st.lists(st.integers(min_value=0, max_value=10_000)))
def test_stream_decoder_pieces_join_to_the_whole_decode(ids: list[int]) -> None:
    t = tok()
    ids = [i % t.vocab_size for i in ids]  # any ids at all: byte tokens, merges, special tokens
    decoder = StreamDecoder(t)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == t.decode(ids)
    # A piece is never half a character; after flush() the decoder starts clean.
    assert not any("\ud800" <= c <= "\udfff" for piece in pieces for c in piece)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == t.decode(ids)


@PROFILE
@given(text=ANY_TEXT, cut=st.integers(min_value=0, max_value=8))
def test_stream_decoder_on_real_text_releases_whole_characters(text: str, cut: int) -> None:
    t = tok()
    ids = t.encode(text, allow_special=False)
    decoder = StreamDecoder(t)
    released = ""
    for i in ids:
        released += decoder.push(i)
        assert text.startswith(released)  # nothing garbled on the way, not even for a moment
    assert released + decoder.flush() == text


# -- stop strings ------------------------------------------------------------------------------------------------
STOP_ALPHABET = st.sampled_from(["a", "b", "c", "\n", "好", "🚀"])
STOPS = st.lists(st.lists(STOP_ALPHABET, min_size=1, max_size=4).map("".join), max_size=4)
PIECES = st.lists(st.lists(STOP_ALPHABET, max_size=5).map("".join), max_size=25)


def _check_stops(stops: list[str], pieces: list[str]) -> None:
    holder = StopHolder(stops)
    fed = released = ""
    hit = None
    for piece in pieces:
        fed += piece
        out, hit = holder.push(piece)
        released += out
        if hit is not None:
            break
        assert fed.startswith(released)  # in order, nothing dropped
        held = fed[len(released):]
        # Held back only while it could still become a stop string (never more than that).
        assert held == "" or any(s.startswith(held) and len(held) < len(s) for s in stops if s), (held, stops)
    if hit is None:
        released += holder.flush()
        assert released == fed  # no stop string: everything comes out, exactly
    else:
        assert hit in stops and (released + hit) == fed[: len(released) + len(hit)]  # cut right before the stop
    assert not any(s and s in released for s in stops)  # no stop string, whole, ever leaked


@PROFILE
@given(stops=STOPS, pieces=PIECES)
def test_stop_holder_never_drops_or_leaks(stops: list[str], pieces: list[str]) -> None:
    _check_stops(stops, pieces)


@PROFILE
@given(stops=STOPS, text=st.lists(STOP_ALPHABET, max_size=60).map("".join), eot=st.booleans())
def test_text_stream_never_drops_or_leaks(stops: list[str], text: str, eot: bool) -> None:
    """Token ids in (the tokens of `text`, one at a time), text out: the same guarantees, through UTF-8 holding."""
    t = tok()
    ids = t.encode(text, allow_special=False)
    stream = TextStream(t, stops)
    released, hit, decoded = "", None, ""
    decoder = StreamDecoder(t)
    for i in ids:
        decoded += decoder.push(i)
        out, hit = stream.push(i)
        released += out
        if hit is not None:
            break
        assert decoded.startswith(released)
    if hit is None:
        out, hit = stream.finish()
        released += out
    if hit is None:
        assert released == text
    else:
        assert hit in stops and text.startswith(released + hit)
    assert not any(s and s in released for s in stops)
