"""Text holding: whole UTF-8 characters only, and stop strings that never leak, even split over tokens."""

from __future__ import annotations

import random

import pytest

from pocketgpt.app.engine.stream import StopHolder, TextStream
from pocketgpt.app.testing import byte_token_ids
from tests.conftest import CHINESE


def run_holder(pieces: list[str], stop: list[str]) -> tuple[list[str], str | None]:
    holder = StopHolder(stop)
    out = []
    for piece in pieces:
        text, hit = holder.push(piece)
        out.append(text)
        if hit is not None:
            return out, hit
    out.append(holder.flush())
    return out, None


def reference(text: str, stop: list[str]) -> tuple[str, str | None]:
    """Truncate at the earliest stop string (longest first on ties)."""
    hits = [(text.find(s), -len(s), s) for s in stop if s in text]
    if not hits:
        return text, None
    i, _, s = min(hits)
    return text[:i], s


def test_stop_split_across_pieces_is_held_then_dropped() -> None:
    out, hit = run_holder(["Hello S", "T", "OP world"], ["STOP"])
    assert hit == "STOP"
    assert out == ["Hello ", "", ""]
    assert "".join(out) == "Hello "


def test_false_alarm_is_released_when_it_cannot_be_a_stop() -> None:
    out, hit = run_holder(["xS", "T", "A", "y"], ["STOP"])
    assert hit is None
    assert out == ["x", "", "STA", "y", ""]


def test_held_tail_is_released_at_the_end() -> None:
    out, hit = run_holder(["ab", "\n"], ["\n\n"])
    assert hit is None
    assert out == ["ab", "", "\n"]


def test_earliest_stop_wins_and_longest_on_ties() -> None:
    assert run_holder(["a--b==c"], ["==", "--"]) == (["a"], "--")
    assert run_holder(["x\n\ny"], ["\n", "\n\n"]) == (["x"], "\n\n")


def test_no_stop_strings_passes_text_through() -> None:
    assert run_holder(["a", "b"], []) == (["a", "b", ""], None)


@pytest.mark.parametrize("seed", range(300))
def test_random_pieces_match_reference_truncation(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "abST\n"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    stop = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 10))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    out, hit = run_holder(pieces, stop)
    expected, expected_hit = reference(text, stop)
    assert ("".join(out), hit) == (expected, expected_hit)
    # Nothing released before the end may contain a stop string or run past the truncation point.
    released = ""
    for part in out:
        released += part
        assert expected.startswith(released)


def test_text_stream_chinese_split_into_single_bytes(tokenizer) -> None:
    ids = byte_token_ids(tokenizer, CHINESE.encode())
    stream = TextStream(tokenizer)
    pieces = [stream.push(i)[0] for i in ids]
    tail, _ = stream.finish()
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p == "") >= len(CHINESE)  # the first bytes of each character are held
    assert "".join(pieces) + tail == CHINESE


def test_text_stream_stop_split_over_tokens(tokenizer) -> None:
    ids = byte_token_ids(tokenizer, "床前明月光，疑是".encode())
    stream = TextStream(tokenizer, ["明月"])
    out, hit = [], None
    for i in ids:
        text, hit = stream.push(i)
        out.append(text)
        if hit:
            break
    assert hit == "明月"
    assert "".join(out) == "床前"


def test_text_stream_incomplete_character_flushes_replacement(tokenizer) -> None:
    ids = byte_token_ids(tokenizer, "明".encode())[:2]
    stream = TextStream(tokenizer)
    assert [stream.push(i)[0] for i in ids] == ["", ""]
    assert stream.finish() == ("\ufffd", None)


def test_text_stream_ids_beyond_tokenizer_carry_no_text(tokenizer) -> None:
    stream = TextStream(tokenizer)
    assert stream.push(tokenizer.vocab_size + 5) == ("", None)
