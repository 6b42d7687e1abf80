"""Tests for model/tokenizer.py: exact round trips, streaming, persistence, limits."""

from __future__ import annotations

import random

import pytest
from tokenizers import pre_tokenizers

from pocketgpt.model.tokenizer import (
    BYTE_ENCODER,
    EOT,
    StreamDecoder,
    Tokenizer,
    train_tokenizer,
)

VOCAB = 500


def _corpus() -> list[str]:
    rng = random.Random(0)
    subjects = ["The cat", "A small model", "Every token", "The server", "My friend"]
    verbs = ["reads", "writes", "streams", "decodes", "trains on"]
    objects = ["the text.", "a long story.", "many bytes.", "the data quickly.", "some code."]
    lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}" for _ in range(300)]
    # Made-up words from a few syllables: enough distinct pairs to fill the vocabulary.
    syllables = ["ka", "lo", "mi", "ren", "tas", "vu", "pel", "dor", "shi", "qu"]
    words = ["".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(150)]
    lines += [" ".join(rng.choices(words, k=12)) for _ in range(200)]
    lines += ["床前明月光，疑是地上霜。举头望明月，低头思故乡。"] * 20
    lines += ["火箭发射 🚀 庆祝 🎉 好的 👍🏽 谢谢"] * 20
    lines += [
        "def add(a, b):\n\treturn a + b\n",
        "for i in range(10):\n    print(i)\n",
        "class Foo:\n    def __init__(self):\n        self.x = {'k': [1, 2, 3]}\n",
    ] * 20
    return lines


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(_corpus(), vocab_size=VOCAB, min_frequency=2)


ROUND_TRIP = [
    "The cat reads the text.",
    "  leading spaces, trailing spaces  ",
    "床前明月光，疑是地上霜。",
    "🚀🎉👍🏽",
    "family: 👨‍👩‍👧 done",  # ZWJ sequence
    "def f(x):\n\tif x:\r\n\t\treturn {'a': [1, 2]}\n\n",
    "春眠不觉晓，处处闻啼鸟。",  # Chinese not in the corpus
    "Привет, мир! Как дела?",  # Cyrillic not in the corpus
    "مرحبا بالعالم · नमस्ते · 🦀 crab",
    "\x00\x01\x7f control bytes \u200b zero width",
    "",
]


def test_vocab_and_eot(tok: Tokenizer) -> None:
    assert tok.eot_id == 0
    assert 260 <= tok.vocab_size <= VOCAB
    # The corpus is big enough for the trainer to fill the requested vocabulary.
    assert tok.vocab_size == VOCAB


def test_byte_table_matches_library_alphabet() -> None:
    assert len(BYTE_ENCODER) == 256
    assert set(BYTE_ENCODER.values()) == set(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_merges_actually_compress(tok: Tokenizer) -> None:
    text = "The cat reads the text."
    assert len(tok.encode(text)) < len(text.encode("utf-8")) // 2


def test_random_unicode_round_trip(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(200):
        # Any code point except surrogates (which are not encodable as UTF-8).
        chars = []
        for _ in range(rng.randint(1, 30)):
            cp = rng.randint(0, 0x10FFFF)
            chars.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "x")
        text = "".join(chars)
        assert tok.decode(tok.encode(text)) == text


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    assert tok.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]


def _stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    dec = StreamDecoder(tok)
    return [dec.push(i) for i in ids], dec.flush()


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_streaming_matches_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids) == text
    assert tail == ""
    assert not any("\ufffd" in p for p in pieces)


def test_streaming_holds_back_split_character(tok: Tokenizer) -> None:
    # 🦀 never occurs in the corpus, so its 4 UTF-8 bytes must span several tokens.
    ids = tok.encode("🦀")
    assert len(ids) > 1
    pieces, tail = _stream(tok, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "🦀"
    assert tail == ""

    # Same inside a sentence: the crab appears only when its last byte arrives.
    ids = tok.encode("a 🦀 b")
    pieces, tail = _stream(tok, ids)
    first_crab = next(k for k, p in enumerate(pieces) if "🦀" in p)
    assert "" in pieces[:first_crab]
    assert "".join(pieces) + tail == "a 🦀 b"


def test_stream_flush_incomplete_char(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🦀")[:-1]  # cut inside the crab's bytes
    pieces, tail = _stream(tok, ids)
    assert "\ufffd" not in "".join(pieces)
    assert tail and set(tail) == {"\ufffd"}
    assert "".join(pieces) + tail == tok.decode(ids)


def test_stream_decoder_reusable_after_flush(tok: Tokenizer) -> None:
    dec = StreamDecoder(tok)
    crab = tok.encode("🦀")
    dec.push(crab[0])
    assert dec.flush() == "\ufffd"
    assert "".join(dec.push(i) for i in tok.encode("hi")) + dec.flush() == "hi"


def test_eot_special_token(tok: Tokenizer) -> None:
    assert tok.encode(EOT) == [tok.eot_id]
    assert tok.token_bytes(tok.eot_id) == b""
    ids = [*tok.encode("one"), tok.eot_id, *tok.encode("two")]
    assert tok.decode(ids) == "onetwo"
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == "onetwo"
    # Documented behaviour: a literal EOT in text becomes the special id.
    assert tok.eot_id in tok.encode(f"a{EOT}b")


def test_out_of_range_ids(tok: Tokenizer) -> None:
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError):
        tok.token_bytes(-1)


def test_save_load_round_trip(tok: Tokenizer, tmp_path) -> None:
    texts = [*ROUND_TRIP, "Every token streams many bytes."]
    path = tok.save(tmp_path / "tok.json")
    loaded = Tokenizer.from_file(path)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.eot_id == tok.eot_id
    assert [loaded.encode(t) for t in texts] == [tok.encode(t) for t in texts]

    # Directory form: save into / load from <dir>/tokenizer.json.
    assert tok.save(tmp_path).name == "tokenizer.json"
    assert Tokenizer.from_file(tmp_path).encode(texts[2]) == tok.encode(texts[2])

    from_str = Tokenizer.from_str(tok.to_str())
    assert [from_str.encode(t) for t in texts] == [tok.encode(t) for t in texts]


def test_vocab_too_small() -> None:
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["hello world"], vocab_size=259)
    # The minimum itself is accepted.
    assert train_tokenizer(["hello world"] * 5, vocab_size=260).vocab_size <= 260


def test_long_texts_encode_the_same_through_the_gil_free_path(tok: Tokenizer) -> None:
    """Texts past RELEASE_GIL_CHARS go through the library's batch call: same ids, with and without specials."""
    from pocketgpt.model.tokenizer import RELEASE_GIL_CHARS

    text = ("".join(ROUND_TRIP) + EOT) * (RELEASE_GIL_CHARS // 100)
    assert len(text) >= RELEASE_GIL_CHARS
    assert tok.encode(text) == tok._hf.encode(text, add_special_tokens=False).ids
    plain = tok.encode(text, allow_special=False)
    assert tok.eot_id not in plain and tok.decode(plain) == text


def test_cjk_characters_stay_whole_and_old_tokenizers_still_load(tmp_path) -> None:
    """New tokenizers never merge across CJK characters; ones trained without that (older checkpoints) still work."""
    poems = "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。白日依山盡，黃河入海流。" * 50
    texts = [poems, "The quick brown fox. " * 50]
    new = train_tokenizer(texts, vocab_size=400)
    cjk = [new.token_bytes(i).decode("utf-8", "ignore") for i in range(new.vocab_size)]
    whole = [t for t in cjk if t and all("\u3000" <= ch <= "\uffef" for ch in t)]
    assert whole and all(len(t) == 1 for t in whole)  # single characters, never runs of them
    assert any(len(t.strip()) > 3 for t in cjk)  # Latin words still merge
    old = train_tokenizer(texts, vocab_size=400, cjk_whole=False)
    assert any(len(t) > 1 and all("\u4e00" <= ch <= "\u9fff" for ch in t)
               for t in (old.token_bytes(i).decode("utf-8", "ignore") for i in range(old.vocab_size)))
    for tok in (new, old):
        loaded = Tokenizer.from_file(tok.save(tmp_path / f"{id(tok)}.json"))
        for text in (poems[:60], "Mixed 中文 and English。"):
            ids = loaded.encode(text)
            assert ids == tok.encode(text) and loaded.decode(ids) == text
            stream = StreamDecoder(loaded)
            assert "".join(stream.push(i) for i in ids) + stream.flush() == text
