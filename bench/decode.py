"""Section 1: one stream's decode speed, our engine against its peers on the same weights.

Every side decodes the same greedy continuation of the same 16-token prompt. Decode speed is (n - 1) tokens
over the time from the first new token to the n-th: from the engine's token timestamps, from the client's
arrival times over HTTP+SSE, and as T(n) - T(1) of whole calls for `generate()`-style peers, so prefill is
left out everywhere. Sides are measured in turn, round after round, so load from other processes spreads over
all of them; the figures are medians with min-max over rounds.
"""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Any

import torch

from bench.client import Server
from bench.common import cuda_sync, in_worker, memory_bandwidth, summary, weight_bytes_per_step
from bench.peers import BareDecoder, hf_generate, logits_max_diff, naive_generate, to_transformers
from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.types import GenRequest, TokenEvent
from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.model.sampling import SamplingParams

PROMPT_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."


def timing_dtype(device: str) -> torch.dtype:
    """fp32 on CPU; bf16 on a GPU (what the server runs there), for every side alike."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def prompt_ids(tokenizer, n: int = 16) -> list[int]:
    ids = tokenizer.encode(PROMPT_TEXT * 4)[:n]
    assert len(ids) == n, "prompt text too short for the tokenizer"
    return ids


def _timed(fn, device: str) -> float:
    cuda_sync(device)
    t0 = time.perf_counter()
    fn()
    cuda_sync(device)
    return time.perf_counter() - t0


def engine_rate(engine: Engine, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Decode tok/s of one greedy request through the engine (its decode thread), from its token timestamps."""

    async def one() -> tuple[float, list[int]]:
        ticket = engine.submit(GenRequest(prompt, n, SamplingParams(temperature=0.0), seed=0))
        times, ids = [], []
        while True:
            event = await ticket.queue.get()
            if not isinstance(event, TokenEvent):
                break
            times.append(event.t)
            ids.append(event.id)
        return (len(times) - 1) / (times[-1] - times[0]), ids

    return asyncio.run(one())


def http_rate(server: Server, prompt_text: str, n: int) -> float:
    body = {"prompt": prompt_text, "max_new_tokens": n, "temperature": 0.0, "seed": 0}
    r = asyncio.run(server.stream(body))
    if not r.ok or len(r.arrivals) < 2:
        raise RuntimeError(f"HTTP stream failed: {r.error}")
    return (len(r.arrivals) - 1) / (r.arrivals[-1] - r.arrivals[0])


def run(checkpoint: Path, server: Server | None, n: int, rounds: int, device: str, naive_n: int,
        with_hf: bool = True) -> dict[str, Any]:
    dtype = timing_dtype(device)
    ck = load_checkpoint(checkpoint, device=device)  # fp32 first: the logits check below is made in fp32
    model = ck.model  # module path, default layout: what the naive loop and transformers get
    cfg = ck.config
    prompt = prompt_ids(ck.tokenizer)
    prompt_text = ck.tokenizer.decode(prompt)
    prompt_t = torch.tensor([prompt], device=device)
    out: dict[str, Any] = {"n_new_tokens": n, "prompt_tokens": len(prompt), "naive_new_tokens": naive_n}

    hf = None
    if with_hf:
        try:
            hf = to_transformers(model)
        except ImportError:
            out["transformers"] = "not installed"
        else:
            check = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
            diff = in_worker(logits_max_diff, model, hf, check)
            out["transformers_logits_max_abs_diff"] = diff
            if diff > 1e-4:
                raise RuntimeError(f"transformers' logits differ from ours by {diff:g} (> 1e-4): weight mapping broken")
            hf = hf.to(dtype)
    model = model.to(dtype)
    out["dtype"] = str(dtype).removeprefix("torch.")

    bare = BareDecoder(model, 1, len(prompt) + n, )
    engine = Engine(load_checkpoint(checkpoint, device=device, dtype=dtype), max_running=16, max_queue=16).start()
    fast = copy.deepcopy(model).prepare_inference()  # what the engine runs, for the token check below

    def t_n_minus_1(gen, k: int) -> float:
        one = _timed(lambda: gen(1), device)
        full = _timed(lambda: gen(k), device)
        return (k - 1) / max(full - one, 1e-9)

    sides: dict[str, Any] = {
        "engine": lambda: engine_rate(engine, prompt, n)[0],
        "bare_static_kv": lambda: in_worker(t_n_minus_1, lambda k: bare.generate(prompt_t, k), n),
        "naive_recompute": lambda: in_worker(t_n_minus_1, lambda k: naive_generate(model, prompt_t, k), naive_n),
    }
    if hf is not None:
        sides["transformers"] = lambda: in_worker(t_n_minus_1, lambda k: hf_generate(hf, prompt_t, k), n)
    if server is not None:
        sides["http_sse"] = lambda: http_rate(server, prompt_text, n)
    try:
        for fn in sides.values():  # warm-up round
            fn()
        rates: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(rounds):
            for name, fn in sides.items():
                rates[name].append(fn())
        engine_ids = engine_rate(engine, prompt, n)[1]
    finally:
        engine.stop()
    out["tok_s"] = {k: summary(v) for k, v in rates.items()}
    # Ratios round by round (both sides of a pair measured moments apart), then their median and range.
    pairs = [("engine", "transformers"), ("engine", "bare_static_kv"), ("http_sse", "engine"),
             ("engine", "naive_recompute"), ("transformers", "bare_static_kv")]
    out["ratios"] = {f"{a}/{b}": summary([x / y for x, y in zip(rates[a], rates[b], strict=True)])
                     for a, b in pairs if a in rates and b in rates}

    # The same tokens everywhere (random weights: near-ties can legitimately flip late in a sequence).
    ref = in_worker(lambda: bare.generate(prompt_t, n)[0].tolist())
    agree = {"engine": engine_ids}
    if hf is not None:
        agree["transformers"] = in_worker(lambda: hf_generate(hf, prompt_t, n).tolist())
    agree["flat_path"] = in_worker(lambda: _cached_greedy(fast, prompt, n))
    out["tokens_agree_with_bare"] = {k: _prefix_agreement(v, ref) for k, v in agree.items()}

    bw = memory_bandwidth(device=device)
    wbytes = weight_bytes_per_step(model)
    kv_bytes = 2 * cfg.n_layer * cfg.n_embd * (len(prompt) + n // 2) * model.wte.weight.element_size()
    out["floor"] = {
        "weight_bytes_per_step": wbytes, "kv_bytes_per_step_mean": kv_bytes, "copy_bandwidth_gb_s": bw,
        "floor_tok_s": bw * 1e9 / (wbytes + kv_bytes) if bw else None,
    }
    return out


@torch.inference_mode()
def _cached_greedy(model, prompt: list[int], n: int) -> list[int]:
    from pocketgpt.model.kv_cache import KVCache

    cache = KVCache.for_model(model, 1, len(prompt) + n)
    dev = cache.k.device
    logits = model.forward_cached(torch.tensor([prompt], device=dev), cache, [0], [0])
    out = []
    for i in range(n):
        out.append(int(logits.argmax(-1)))
        if i < n - 1:
            logits = model.forward_cached(torch.tensor([[out[-1]]], device=dev), cache, [0], [len(prompt) + i])
    return out


def _prefix_agreement(a: list[int], b: list[int]) -> str:
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return "all" if same == len(b) == len(a) else f"first {same} of {len(b)}"
