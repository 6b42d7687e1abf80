"""Structured output's cost: decode tokens/s of JSON-schema-constrained streams against free ones, and the
grammar libraries' per-token mask time on this project's tokenizers.

    python -m bench.structured [--rounds 3] [--new-tokens 64] [--threads 1] [--out docs/benchmarks/structured.json]

Engine section: the bench model (6 layers x 384, random weights, `bench.common.headline_config`) decodes
`--new-tokens` greedy tokens per stream, at batch 1 and batch 16, free and constrained by a JSON schema (an array
of at least 64 small objects, so no stream ends before the budget), in the same rounds, alternating; a third
batch-16 run has one constrained stream among 15 free ones. Decode tokens/s counts the tokens after each stream's
first over the time from the first to the last token (prefill left out); batch 16 is the sum over streams.

Library section: per-token mask time of llguidance (the one the server uses), xgrammar and outlines-core (those
two only if installed) for the same schema, on the bench tokenizer and on a 32k vocabulary of words from the
standard library's sources (a stand-in for a GPT-2-sized vocabulary: no download), walking 60 tokens by random
logits under the mask. Measures compile time too. Weights are random, so only costs are measured, not quality.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import re
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import ROOT, cached_bench_tokenizer, headline_config, make_checkpoint, summary, write_result

ITEM = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                         "name": {"type": "string", "maxLength": 12},
                                         "ok": {"type": "boolean"}},
        "required": ["id", "name", "ok"], "additionalProperties": False}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 64}


def _request(engine, prompt: list[int], n: int, schema: dict[str, Any] | None):
    from pocketgpt.app.engine.grammar import GrammarSpec
    from pocketgpt.app.engine.types import GenRequest
    from pocketgpt.model.sampling import SamplingParams

    constraint = engine.grammars.constraint(GrammarSpec.json_schema(schema)) if schema is not None else None
    return GenRequest(prompt, n, SamplingParams(temperature=0.0), constraint=constraint)


async def _stream(engine, request) -> list[float]:
    from pocketgpt.app.engine.types import TokenEvent

    ticket = engine.submit(request)
    arrivals = []
    while isinstance(await ticket.queue.get(), TokenEvent):
        arrivals.append(time.perf_counter())
    return arrivals


def _decode_tok_s(engine, prompts: list[list[int]], n: int, constrained: list[bool]) -> float:
    """Aggregate decode tokens/s of streams started together (tokens after the first, over first to last)."""
    async def run() -> list[list[float]]:
        requests = [_request(engine, p, n, SCHEMA if c else None) for p, c in zip(prompts, constrained, strict=True)]
        return await asyncio.gather(*(_stream(engine, r) for r in requests))

    streams = asyncio.run(run())
    start, end = min(s[0] for s in streams), max(s[-1] for s in streams)
    return sum(len(s) - 1 for s in streams) / (end - start)


def engine_section(checkpoint: Path, tokenizer, rounds: int, n: int) -> dict[str, Any]:
    from pocketgpt.app.engine.engine import Engine
    from pocketgpt.model.checkpoint import load_checkpoint

    engine = Engine(load_checkpoint(checkpoint), max_running=16).start()
    try:
        prompts = [tokenizer.encode(f"Record {i}: a list of items as JSON.") for i in range(16)]
        runs = {"batch_1_free": ([prompts[0]], [False]), "batch_1_json": ([prompts[0]], [True]),
                "batch_16_free": (prompts, [False] * 16), "batch_16_json": (prompts, [True] * 16),
                "batch_16_one_json": (prompts, [True] + [False] * 15)}
        for p, c in runs.values():  # warm-up, and the schema compiled once (cached afterwards, as in the server)
            _decode_tok_s(engine, p, 8, c)
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, (p, c) in runs.items():
                rates[name].append(_decode_tok_s(engine, p, n, c))
        out: dict[str, Any] = {"new_tokens": n, "tok_s": {k: summary(v) for k, v in rates.items()}}
        for batch in ("batch_1", "batch_16"):
            out[f"{batch}_json_over_free"] = summary(
                [j / f for j, f in zip(rates[f"{batch}_json"], rates[f"{batch}_free"], strict=True)])
        out["batch_16_one_json_over_free"] = summary(
            [j / f for j, f in zip(rates["batch_16_one_json"], rates["batch_16_free"], strict=True)])
        return out
    finally:
        engine.stop()


# -- the libraries ----------------------------------------------------------------------------------------------
def _stdlib_vocab(n: int) -> list[bytes]:
    """`n` tokens: the 256 bytes, then the most frequent words, numbers, punctuation runs and spaces of stdlib."""
    counts: dict[str, int] = {}
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:200]:
        text = Path(path).read_text(errors="ignore")
        for w in re.findall(r" ?[A-Za-z_]+| ?[0-9]{1,3}|[^\sA-Za-z0-9]{1,3}|\s+", text):
            counts[w] = counts.get(w, 0) + 1
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    for w in sorted(counts, key=lambda w: -counts[w]):
        if len(tokens) >= n:
            break
        if (b := w.encode()) not in seen:
            tokens.append(b)
            seen.add(b)
    return tokens


def _bits(mask: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(32, dtype=torch.int32)
    return ((mask.reshape(-1).unsqueeze(1) >> shifts) & 1).flatten()[:n].bool()


def _walk(n_vocab: int, fill, consume, steps: int = 60) -> tuple[float, int]:
    """Mean microseconds per mask over a walk of up to `steps` tokens picked by random logits under the mask."""
    gen = torch.Generator().manual_seed(0)
    spent, k = 0.0, 0
    for k in range(1, steps + 1):  # noqa: B007  # k: the tokens walked, read after the loop
        t0 = time.perf_counter()
        ok = fill()
        spent += time.perf_counter() - t0
        logits = torch.randn(n_vocab, generator=gen).masked_fill(~ok, float("-inf"))
        if not consume(int(logits.argmax())):
            break
    return spent / k * 1e6, k


def _greedy_encoder(tokens: list[bytes], eos: int):
    ids = {b: i for i, b in enumerate(tokens) if i != eos}

    def encode(text: str | bytes) -> list[int]:
        data, out, i = text.encode() if isinstance(text, str) else text, [], 0
        while i < len(data):
            j = next(j for j in range(min(len(data), i + 16), i, -1) if data[i:j] in ids or j == i + 1)
            if data[i:j] in ids:
                out.append(ids[data[i:j]])
            i = j
        return out

    return encode


def _llguidance(tokens: list[bytes], eos: int, encode) -> dict[str, float]:
    import llguidance

    class Vocab:
        def __init__(self) -> None:
            self.tokens = [b"<eos>" if i == eos else b for i, b in enumerate(tokens)]
            self.eos_token_id, self.bos_token_id, self.special_token_ids = eos, None, [eos]

        def __call__(self, text: str | bytes) -> list[int]:
            return encode(text)

    t0 = time.perf_counter()
    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocab()))
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
    t2 = time.perf_counter()
    mask = torch.zeros(1, (len(tokens) + 31) // 32, dtype=torch.int32)

    def fill() -> torch.Tensor:
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        return _bits(mask, len(tokens))

    us, k = _walk(len(tokens), fill, lambda t: t != eos and matcher.consume_token(t))
    return {"tokenizer_s": t1 - t0, "compile_s": t2 - t1, "mask_us_per_token": us, "tokens_walked": k}


def _xgrammar(tokens: list[bytes], eos: int, encode) -> dict[str, float]:
    import xgrammar

    t0 = time.perf_counter()
    info = xgrammar.TokenizerInfo([b"" if i == eos else b for i, b in enumerate(tokens)],
                                  vocab_type=xgrammar.VocabType.RAW, vocab_size=len(tokens), stop_token_ids=[eos])
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    t1 = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    t2 = time.perf_counter()
    mask = xgrammar.allocate_token_bitmask(1, len(tokens))

    def fill() -> torch.Tensor:
        matcher.fill_next_token_bitmask(mask)
        return _bits(mask, len(tokens))

    us, k = _walk(len(tokens), fill, lambda t: t != eos and matcher.accept_token(t))
    return {"tokenizer_s": t1 - t0, "compile_s": t2 - t1, "mask_us_per_token": us, "tokens_walked": k}


def _outlines_core(tokens: list[bytes], eos: int, encode) -> dict[str, float]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(tokens):
        if i != eos:
            by_bytes.setdefault(b, []).append(i)
    vocab = Vocabulary(eos, by_bytes)
    t1 = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?"), vocab))  # the regex index per schema
    t2 = time.perf_counter()

    def fill() -> torch.Tensor:
        ok = torch.zeros(len(tokens), dtype=torch.bool)
        ok[torch.tensor(guide.get_tokens())] = True
        return ok

    def consume(t: int) -> bool:
        if t == eos:
            return False
        guide.advance(t)
        return not guide.is_finished()

    us, k = _walk(len(tokens), fill, consume)
    return {"tokenizer_s": t1 - t0, "compile_s": t2 - t1, "mask_us_per_token": us, "tokens_walked": k}


def library_section(tokenizer) -> dict[str, Any]:
    vocabs = {f"bench_tokenizer_{tokenizer.vocab_size}": (
        [tokenizer.token_bytes(i) or b"<special>" for i in range(tokenizer.vocab_size)], tokenizer.eot_id,
        lambda t: tokenizer.encode(t if isinstance(t, str) else t.decode("utf-8", "replace"), allow_special=False))}
    words = _stdlib_vocab(32_000)
    vocabs["stdlib_words_32000"] = ([b"<eos>", *words], 0, _greedy_encoder([b"<eos>", *words], 0))
    out: dict[str, Any] = {}
    for vocab_name, (tokens, eos, encode) in vocabs.items():
        for lib, run in (("llguidance", _llguidance), ("xgrammar", _xgrammar), ("outlines-core", _outlines_core)):
            try:
                out[f"{lib}/{vocab_name}"] = {"vocab": len(tokens), **run(tokens, eos, encode)}
            except ImportError:
                out[f"{lib}/{vocab_name}"] = {"error": "not installed"}
            print(lib, vocab_name, out[f"{lib}/{vocab_name}"], file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pocketgpt-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "structured.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    tokenizer = cached_bench_tokenizer(args.work)
    cfg = headline_config(block_size=512, vocab_size=tokenizer.vocab_size)
    checkpoint = make_checkpoint(args.work / "structured-model", cfg, tokenizer)
    record = {
        "command": " ".join(["python -m bench.structured", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "load_average_before": load_before,
        "model": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size},
        "schema": SCHEMA,
        "engine": engine_section(checkpoint, tokenizer, args.rounds, args.new_tokens),
        "libraries": library_section(tokenizer),
        "load_average_after": os.getloadavg(),
    }
    write_result(args.out, record)


if __name__ == "__main__":
    main()
