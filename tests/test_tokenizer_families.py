"""Tokenizers of imported models: SentencePiece-style (Metaspace + byte fallback) streams Chinese and emoji exactly,
agreeing with the library's own DecodeStream; every end id of a model ends a generation in the engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from tokenizers.decoders import DecodeStream

from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.types import DoneEvent, GenRequest, TokenEvent
from pocketgpt.model.checkpoint import load_checkpoint, save_checkpoint
from pocketgpt.model.sampling import SamplingParams
from pocketgpt.model.tokenizer import StreamDecoder, Tokenizer, TokenizerSettings
from tests.hf_models import chatml_tokenizer, sentencepiece_tokenizer

TEXT = "Hello world. 床前明月光，疑是地上霜。🚀🎉 def f(x):\n    return x  # done"


@pytest.fixture(scope="module")
def sp() -> tuple[Tokenizer, object]:
    hf = sentencepiece_tokenizer()
    return Tokenizer(hf, TokenizerSettings(eos_token="</s>", bos_token="<s>", add_bos=True)), hf


def test_sentencepiece_bytes_and_byte_fallback(sp) -> None:
    tok, hf = sp
    ids = tok.encode(TEXT)
    assert ids == hf.encode(TEXT, add_special_tokens=False).ids
    pieces = [hf.id_to_token(i) for i in ids]
    assert "<0xE5>" in pieces and "<0xF0>" in pieces  # Chinese and emoji go through byte fallback
    assert tok.token_bytes(hf.token_to_id("<0xE5>")) == b"\xe5"
    assert tok.token_bytes(hf.token_to_id("▁")) == b" "
    assert tok.token_bytes(tok.eot_id) == b"" and tok.token_bytes(tok.bos_id) == b""
    # The library strips the space SentencePiece prepends to a text; we keep it (a continuation needs it).
    assert tok.decode(ids) == " " + TEXT == " " + hf.decode(ids)
    assert tok.encode_prompt("Hi") == [tok.bos_id, *tok.encode("Hi")]


def test_sentencepiece_stream_is_exact_and_agrees_with_decode_stream(sp) -> None:
    tok, hf = sp
    ids = tok.encode(TEXT)
    ours, theirs = StreamDecoder(tok), DecodeStream(skip_special_tokens=True)
    got, lib = [], []
    for i in ids:
        piece = ours.push(i)
        assert "\ufffd" not in piece  # never half a character
        got.append(piece)
        lib.append(theirs.step(hf, i) or "")
    got.append(ours.flush())
    assert "".join(got) == tok.decode(ids) == " " + "".join(lib)
    # Held back until complete: the three bytes of 床 release the character on the third.
    first = ids.index(hf.token_to_id("<0xE5>"))
    assert got[first : first + 3] == ["", "", "床"]


def test_an_unfinished_character_at_the_end_becomes_a_replacement(sp) -> None:
    tok, hf = sp
    dec = StreamDecoder(tok)
    assert dec.push(hf.token_to_id("<0xE5>")) == "" and dec.flush() == "\ufffd"


def test_unsupported_tokenizer_kind_is_named() -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    wp = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "</s>": 2}, unk_token="[UNK]"))
    wp.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match=r"unsupported tokenizer \(decoder \['WordPiece'\]\)"):
        Tokenizer(wp, TokenizerSettings(eos_token="</s>"))


def test_settings_file_round_trips_beside_tokenizer_json(sp, tmp_path: Path) -> None:
    tok, _ = sp
    tok.save(tmp_path)
    again = Tokenizer.from_file(tmp_path)
    assert again.settings == tok.settings and (again.bos_id, again.eot_id) == (tok.bos_id, tok.eot_id)


def test_every_end_id_ends_a_generation(tmp_path: Path) -> None:
    """A ChatML model ends on <|im_end|> (its eos) and on <|endoftext|> (generation_config's second end id)."""
    from pocketgpt.model.config import ModelConfig
    from pocketgpt.model.gpt import GPT

    hf = chatml_tokenizer()
    tok = Tokenizer(hf, TokenizerSettings(eos_token="<|im_end|>", stop_tokens=("<|endoftext|>",)))
    assert tok.stop_ids == (hf.token_to_id("<|im_end|>"), hf.token_to_id("<|endoftext|>")) == (2, 0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=32))
    with torch.no_grad():  # every logit 0: greedy picks id 0, <|endoftext|>, which is not the eos token
        model.ln_f.weight.zero_()
    path = save_checkpoint(tmp_path / "ck", model, tok, meta={"step": 0})
    engine = Engine(load_checkpoint(path), max_running=2).start()

    async def run() -> list:
        ticket = engine.submit(GenRequest(tok.encode("Hi"), 10, SamplingParams(temperature=0.0)))
        events = []
        while not isinstance(event := await asyncio.wait_for(ticket.queue.get(), 30), DoneEvent):
            events.append(event)
        return [*events, event]

    try:
        events = asyncio.run(run())
    finally:
        engine.stop()
    # The end token itself is the one (textless) token event, as for end-of-text; without the model's second end
    # id the request would run to its length limit.
    assert [(e.id, e.text) for e in events if isinstance(e, TokenEvent)] == [(0, "")]
    assert events[-1].finish_reason == "eos" and events[-1].completion_tokens == 1
