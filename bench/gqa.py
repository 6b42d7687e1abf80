"""A SmolLM2-135M-shaped model (grouped-query attention): the engine against transformers `generate()`.

    python -m bench.gqa [--rounds 2] [--new-tokens 128] [--no-http] [--out docs/benchmarks/gqa.json]

The model has SmolLM2-135M's configuration (30 layers, width 576, 9 query heads and 3 key/value heads, MLP
1536, vocab 49152, tied embeddings) with random weights, made as a `transformers` LlamaForCausalLM and brought in
with `import-hf`, so both sides hold the same weights (the logits are compared). Each side generates 128 greedy
tokens after a 16-token prompt, for 1 request and for 8 at once (transformers: one batched `generate()`; the
engine: 8 concurrent requests, continuous batching). The figure is tokens per second over the whole call,
prefill included on both sides. Sides alternate round by round, so load from other processes spreads over
both; the ratio of medians is the result.

The served path, in the same rounds: the same checkpoint behind `pocketgpt serve` (a uvicorn subprocess,
bench.client.Server, same thread count), 1 SSE stream of /v1/generate and 8 concurrent ones, greedy, the same
prompts sent as text (decoded from the ids; the server re-tokenises them, `http_prompt_tokens` says to how many
tokens). Its figure is every stream's new tokens (the `done` event's count) over the wall time from sending the
first request to the last token's arrival, so HTTP / in-process is what the HTTP layer and the separate process
cost. `--rounds 1` is the short run for a loaded machine; the result file records the rounds.

Also: the KV cache's bytes per token against the same model without
GQA (9 key/value heads), from the cache tensors the engine allocates.

Left out: prompts of different lengths, and
any GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.client import Server
from bench.common import bench_tokenizer, machine_info, write_result
from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.types import DoneEvent, GenRequest, TokenEvent
from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.model.kv_cache import KVCache
from pocketgpt.model.sampling import SamplingParams
from pocketgpt.training.import_hf import import_hf

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.02)
PROMPT_LEN = 16


def build(root: Path) -> tuple[Path, torch.nn.Module]:
    """(our imported checkpoint, the transformers model) with the same random weights."""
    import transformers

    tok = bench_tokenizer(2048)
    # Pad the tokenizer to the model's vocabulary so the engine may sample every id, as transformers does.
    tok = tok.with_special_tokens(f"<|pad{i}|>" for i in range(SMOLLM2_135M["vocab_size"] - tok.vocab_size))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMOLLM2_135M, bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # tied head: a zero row keeps end-of-text from ever being the greedy choice
        hf.model.embed_tokens.weight[tok.eot_id].zero_()
    hf.generation_config.eos_token_id = None
    src = root / "hf"
    hf.save_pretrained(src, safe_serialization=True)
    tok.save(src / "tokenizer.json")
    return import_hf(src, root / "ck", max_context=1024), hf


def prompts(batch: int, vocab: int) -> torch.Tensor:
    return torch.randint(100, vocab, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))


@torch.inference_mode()
def hf_run(hf, batch: int, n: int) -> tuple[float, list[list[int]]]:
    x = prompts(batch, 2000)
    t0 = time.perf_counter()
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      use_cache=True, pad_token_id=0)
    return time.perf_counter() - t0, out[:, PROMPT_LEN:].tolist()


def engine_run(engine: Engine, batch: int, n: int) -> tuple[float, list[list[int]]]:
    x = prompts(batch, 2000).tolist()

    async def one(p: list[int]) -> list[int]:
        ticket = engine.submit(GenRequest(p, n, SamplingParams(temperature=0.0)))
        ids = []
        while isinstance(event := await ticket.queue.get(), TokenEvent):
            ids.append(event.id)
        assert isinstance(event, DoneEvent), event
        return ids

    async def all_of() -> list[list[int]]:
        return list(await asyncio.gather(*(one(p) for p in x)))

    t0 = time.perf_counter()
    out = asyncio.run(all_of())
    return time.perf_counter() - t0, out


def http_run(server: Server, texts: list[str], n: int) -> tuple[float, list[int]]:
    """Stream one /v1/generate per text at once: (seconds to the last token, each stream's new tokens)."""

    async def all_of() -> list:
        return list(await asyncio.gather(*(server.stream({"prompt": t, "max_new_tokens": n, "temperature": 0.0})
                                           for t in texts)))

    t0 = time.perf_counter()
    results = asyncio.run(all_of())
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} streams failed: {failed[:2]}")
    last = max(r.arrivals[-1] for r in results if r.arrivals)
    return last - t0, [r.done["usage"]["completion_tokens"] for r in results]


def kv_bytes_per_token(cfg, kv_heads: int) -> int:
    cache = KVCache(cfg.n_layer, 1, 64, kv_heads, cfg.head_dim)
    return (cache.k.numel() + cache.v.numel()) * cache.k.element_size() // 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-http", action="store_true", help="leave out the served (HTTP) path")
    parser.add_argument("--out", default="docs/benchmarks/gqa.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path, hf = build(Path(tmp))
        ckpt = load_checkpoint(path)
        cfg = ckpt.config
        x = prompts(1, 2000)
        with torch.no_grad():
            logits_diff = float((ckpt.model(x)[0] - hf(x).logits).abs().max())
        texts = {b: [ckpt.tokenizer.decode(p) for p in prompts(b, 2000).tolist()] for b in (1, 8)}
        http_prompt_tokens = sorted({len(ckpt.tokenizer.encode(t)) for b in (1, 8) for t in texts[b]})
        engine = Engine(ckpt, max_running=8).start()
        times: dict[str, list[float]] = {}
        outputs: dict[str, list[list[int]]] = {}
        http_tokens: dict[int, list[int]] = {1: [], 8: []}
        with contextlib.ExitStack() as stack:
            stack.callback(engine.stop)
            server = None if args.no_http else stack.enter_context(Server(path, args.threads, max_running=8))
            engine_run(engine, 1, 4)  # warm-up: first-call allocations on every side
            hf_run(hf, 1, 4)
            sides = [("engine", lambda b: engine_run(engine, b, args.new_tokens)),
                     ("transformers", lambda b: hf_run(hf, b, args.new_tokens))]
            if server is not None:
                http_run(server, texts[1], 4)
                sides.append(("http", lambda b: http_run(server, texts[b], args.new_tokens)))
            for _ in range(args.rounds):
                for batch in (1, 8):
                    for side, fn in sides:
                        seconds, out = fn(batch)
                        times.setdefault(f"{side}_b{batch}", []).append(seconds)
                        if side == "http":
                            http_tokens[batch].append(sum(out))
                        else:
                            outputs[f"{side}_b{batch}"] = out
    results: dict[str, object] = {}
    for batch in (1, 8):
        rates = {side: batch * args.new_tokens / statistics.median(times[f"{side}_b{batch}"])
                 for side in ("engine", "transformers")}
        same = sum(a == b for a, b in zip(outputs[f"engine_b{batch}"], outputs[f"transformers_b{batch}"],
                                          strict=True))
        results[f"batch_{batch}"] = {
            "engine_tok_s": round(rates["engine"], 1), "transformers_tok_s": round(rates["transformers"], 1),
            "ratio": round(rates["engine"] / rates["transformers"], 3),
            "seconds": {k: [round(t, 3) for t in v] for k, v in times.items() if k.endswith(f"b{batch}")},
            "identical_greedy_outputs": f"{same}/{batch}",
        }
        if not args.no_http:  # tokens the streams got (the done events' counts) over each round's wall time
            http = statistics.median(t / s for t, s in zip(http_tokens[batch], times[f"http_b{batch}"], strict=True))
            results[f"batch_{batch}"].update({
                "http_tok_s": round(http, 1), "http_over_engine": round(http / rates["engine"], 3),
                "http_tokens": http_tokens[batch],
            })
    gqa, mha = kv_bytes_per_token(cfg, cfg.kv_heads), kv_bytes_per_token(cfg, cfg.n_head)
    record = {
        "benchmark": "bench.gqa",
        "command": " ".join(["python -m bench.gqa", *(sys.argv[1:] if argv is None else argv)]),
        "model": {"config": "SmolLM2-135M shape, random weights, fp32", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
                  "n_head": cfg.n_head, "n_kv_head": cfg.kv_heads, "mlp_width": cfg.mlp_hidden,
                  "vocab_size": cfg.vocab_size, "params": ckpt.model.num_params()},
        "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_LEN, "rounds": args.rounds,
        **({} if args.no_http else {"http": {
            "server": f"pocketgpt serve subprocess (uvicorn), --max-running 8, {args.threads} torch thread(s)",
            "client": "bench.client raw asyncio SSE, POST /v1/generate stream=true, greedy",
            "http_prompt_tokens": http_prompt_tokens}}),
        "max_abs_logit_diff_vs_transformers": logits_diff,
        **results,
        "kv_cache_bytes_per_token": {"gqa_3_kv_heads": gqa, "without_gqa_9_kv_heads": mha, "ratio": gqa / mha},
        "load_average_before": list(load_before), "machine": machine_info(args.threads, "cpu"),
    }
    write_result(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
