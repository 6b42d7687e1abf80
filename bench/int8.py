"""Weight-only int8 (`--quantize int8`) against fp32: decode speed, held-out loss, and llama.cpp beside them.

    python -m bench.int8 [--rounds 3] [--new-tokens 128] [--train-steps 300] [--out docs/benchmarks/int8.json]

1. Batch-1 greedy decode, in-process engine, on a random 6x384 model in the modern (Llama) layout, vocab 8192
   (this project's GGUF export takes only that layout): pocketgpt fp32 and int8, each eager and with
   `--compile`, transformers `generate()` on the same weights (exported with `export --format hf`), and, when
   `llama-cpp-python` is installed (`pip install 'pocketgpt[bench-llamacpp]'`), llama.cpp in-process with a
   thread per core on the same weights exported with `export --format gguf` as f32 and q8_0. 16-token prompt,
   `--new-tokens` greedy tokens, medians of `--rounds`; each side alone in its own process, one after the
   other. pocketgpt and transformers run `--threads` model threads (default: what the server picks, the
   cores less one: the engine's event loop needs the other); `pocketgpt_fp32_all_cores` runs one per core.
2. The SmolLM2-135M-shaped model (bench.gqa builds it): engine tokens/s at batch 1 and 32, fp32 against int8.
3. Quality: a small model trained `--train-steps` steps on Tiny Shakespeare; mean loss on the held-out tail,
   fp32 against int8, and the perplexity ratio exp(loss_int8 - loss_fp32).

The machine is shared: ratios within one run are the result, and the load average is recorded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import ROOT, SHAKESPEARE, bench_tokenizer, machine_info, write_result
from bench.gqa import build as build_smollm2
from bench.gqa import engine_run
from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.loader import available_cores, resolve_threads
from pocketgpt.model.checkpoint import load_checkpoint, save_checkpoint
from pocketgpt.model.config import ModelConfig
from pocketgpt.model.gpt import GPT
from pocketgpt.model.quantize import quantize_int8

PROMPT_LEN = 16
# Figures from issue 16 (same machine class, GPT-2-layout 6x384 weights): used only when llama.cpp is absent.
ISSUE_LLAMACPP = {"llamacpp_q8_0_tok_s": 377.0, "llamacpp_f32_tok_s": 174.0,
                  "note": "not re-measured: recorded in issue 16 (GPT-2-layout weights, llama.cpp's converter)"}


def modern_6x384(vocab: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, n_layer=6, n_head=6, n_embd=384, block_size=1024, tie_embeddings=True)


def engine_for(path: Path, quantize: bool, slots: int, compiled: bool = False) -> Engine:
    ckpt = load_checkpoint(path)
    if quantize:
        quantize_int8(ckpt.model)
    return Engine(ckpt, max_running=slots, compile_decode=compiled).start()


def llamacpp_runner(gguf: Path, n: int, repack: bool = True):
    """A callable timing one greedy `n`-token generation in llama.cpp (llama-cpp-python, in-process).

    `repack=False` turns off llama.cpp's extra buffer types (weights repacked for AMX/AVX-512 kernels): on the
    development VM its q8_0 repacked path crashes (SIGSEGV), while f32 runs faster with them on.
    """
    from unittest import mock

    import llama_cpp
    from llama_cpp import Llama

    defaults = llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = repack
        return p

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", params):
        cores = available_cores()
        llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=cores, n_threads_batch=cores, verbose=False)
    prompt = list(range(100, 100 + PROMPT_LEN))

    def run() -> float:
        llm.reset()
        t0 = time.perf_counter()
        for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True)):
            if i + 1 == n:
                break
        return time.perf_counter() - t0

    return run


def hf_runner(path: Path, work: Path, n: int):
    """transformers `generate()` on the checkpoint exported as HF files (same weights)."""
    import transformers

    from pocketgpt.training.export import export

    hf = transformers.AutoModelForCausalLM.from_pretrained(export(path, "hf", work / "hf")).eval()
    x = torch.arange(100, 100 + PROMPT_LEN).unsqueeze(0)

    @torch.inference_mode()
    def run() -> float:
        t0 = time.perf_counter()
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    use_cache=True, pad_token_id=0)
        return time.perf_counter() - t0

    return run


DECODE_SIDES = ("pocketgpt_fp32", "pocketgpt_fp32_all_cores", "pocketgpt_fp32_compiled", "pocketgpt_int8",
                "pocketgpt_int8_compiled", "transformers", "llamacpp_f32", "llamacpp_q8_0")


def side_runner(side: str, work: Path, n: int):
    """The timing callable of one decode side over the weights in `work` (see decode_section)."""
    path = work / "m6x384"
    if side.startswith("pocketgpt_"):
        engine = engine_for(path, "int8" in side, 1, side.endswith("_compiled"))
        return lambda: engine_run(engine, 1, n)[0], engine.stop
    if side == "transformers":
        return hf_runner(path, work, n), None
    outtype = side.removeprefix("llamacpp_")
    return llamacpp_runner(work / f"m.{outtype}.gguf", n, repack=outtype == "f32"), None


def time_side(side: str, work: Path, rounds: int, n: int) -> list[float]:
    """In a child process: warm `side` up, then time `rounds` generations."""
    run, stop = side_runner(side, work, n)
    try:
        run()
        return [run() for _ in range(rounds)]
    finally:
        if stop is not None:
            stop()


def decode_section(work: Path, rounds: int, n: int, threads: int) -> dict[str, Any]:
    """Batch-1 greedy tokens/s of every decoder on the 6x384 weights (medians of `rounds`).

    Each side runs alone in its own process, one after the other: in one process llama.cpp's and torch's
    thread pools spin against each other on 2 cores (every side measured 2-5x slower that way).
    """
    from pocketgpt.training.export import export

    tok = bench_tokenizer(8192)
    torch.manual_seed(0)
    path = save_checkpoint(work / "m6x384", GPT(modern_6x384(tok.vocab_size)), tok, meta={"step": 0})
    sides = [s for s in DECODE_SIDES if not s.startswith("llamacpp") or importlib.util.find_spec("llama_cpp")]
    for outtype in ("f32", "q8_0") if "llamacpp_f32" in sides else ():
        export(path, "gguf", work / f"m.{outtype}.gguf", outtype)
    times: dict[str, list[float]] = {}
    for side in sides:
        side_threads = available_cores() if side.endswith("_all_cores") else threads
        cmd = [sys.executable, "-m", "bench.int8", "--side", side, "--work", str(work), "--rounds", str(rounds),
               "--new-tokens", str(n), "--threads", str(side_threads)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"decode side {side} failed ({done.returncode}): {done.stderr[-2000:]}")
        times[side] = json.loads(done.stdout.strip().splitlines()[-1])
    out: dict[str, Any] = {f"{k}_tok_s": round(n / statistics.median(v), 1) for k, v in times.items()}
    out["seconds"] = {k: [round(t, 3) for t in v] for k, v in times.items()}
    if "llamacpp_f32" not in sides:
        out["llamacpp"] = ISSUE_LLAMACPP
    ref = out.get("llamacpp_f32_tok_s", ISSUE_LLAMACPP["llamacpp_f32_tok_s"])
    ref_q8 = out.get("llamacpp_q8_0_tok_s", ISSUE_LLAMACPP["llamacpp_q8_0_tok_s"])
    for kind, base in (("fp32", ref), ("int8", ref_q8)):
        for variant in ("", "_compiled"):
            name = f"{kind}{variant}_vs_llamacpp_{'f32' if kind == 'fp32' else 'q8_0'}"
            out[name] = round(out[f"pocketgpt_{kind}{variant}_tok_s"] / base, 3)
    out["int8_vs_fp32"] = round(out["pocketgpt_int8_tok_s"] / out["pocketgpt_fp32_tok_s"], 3)
    out["compiled_vs_eager_fp32"] = round(out["pocketgpt_fp32_compiled_tok_s"] / out["pocketgpt_fp32_tok_s"], 3)
    out["threads_vs_all_cores_fp32"] = round(out["pocketgpt_fp32_tok_s"] / out["pocketgpt_fp32_all_cores_tok_s"], 3)
    out["all_cores"] = available_cores()
    return out


def smollm2_section(work: Path, rounds: int, n: int) -> dict[str, Any]:
    """Engine tokens/s at batch 1 and 32 on the SmolLM2-135M shape, fp32 against int8 (interleaved)."""
    path, _ = build_smollm2(work / "smol")
    engines = {"fp32": engine_for(path, False, 32), "int8": engine_for(path, True, 32)}
    times: dict[str, list[float]] = {}
    try:
        for engine in engines.values():
            engine_run(engine, 1, 4)
        for _ in range(rounds):
            for batch in (1, 32):
                for name, engine in engines.items():
                    times.setdefault(f"{name}_b{batch}", []).append(engine_run(engine, batch, n)[0])
    finally:
        for engine in engines.values():
            engine.stop()
    out: dict[str, Any] = {}
    for batch in (1, 32):
        rate = {k: batch * n / statistics.median(times[f"{k}_b{batch}"]) for k in engines}
        out[f"batch_{batch}"] = {"fp32_tok_s": round(rate["fp32"], 1), "int8_tok_s": round(rate["int8"], 1),
                                 "ratio": round(rate["int8"] / rate["fp32"], 3)}
    return out


@torch.no_grad()
def mean_loss(model: GPT, data: torch.Tensor, block: int) -> float:
    losses = [model(data[None, i : i + block], data[None, i + 1 : i + 1 + block])[1].item()
              for i in range(0, data.numel() - block - 1, block)]
    return sum(losses) / len(losses)


def quality_section(steps: int) -> dict[str, Any]:
    """Held-out loss of a briefly trained model, fp32 against int8."""
    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else None
    if text is None:
        return {"skipped": f"{SHAKESPEARE} not found"}
    tok = bench_tokenizer(2048)
    ids = torch.tensor(tok.encode(text))
    split = int(ids.numel() * 0.9)
    train, held = ids[:split], ids[split:][:20_000]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_embd=128, block_size=128)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, train.numel() - cfg.block_size - 1, (16,), generator=gen)
        x = torch.stack([train[s : s + cfg.block_size] for s in starts])
        y = torch.stack([train[s + 1 : s + 1 + cfg.block_size] for s in starts])
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    fp32 = mean_loss(model, held, cfg.block_size)
    int8 = mean_loss(quantize_int8(model), held, cfg.block_size)
    return {"train_steps": steps, "model": "4x128 modern layout, vocab 2048", "held_out_tokens": held.numel(),
            "loss_fp32": round(fp32, 4), "loss_int8": round(int8, 4),
            "perplexity_ratio": round(math.exp(int8 - fp32), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--smol-tokens", type=int, default=32, help="new tokens per request on the 135M model")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=resolve_threads(None, torch.device("cpu")),
                        help="model threads for pocketgpt and transformers (default: the server's choice)")
    parser.add_argument("--out", default="docs/benchmarks/int8.json")
    parser.add_argument("--side", choices=DECODE_SIDES, help=argparse.SUPPRESS)  # a decode side's child process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps(time_side(args.side, args.work, args.rounds, args.new_tokens)))
        return 0
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        record: dict[str, Any] = {
            "benchmark": "bench.int8",
            "command": " ".join(["python -m bench.int8", *(sys.argv[1:] if argv is None else argv)]),
            "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_LEN, "rounds": args.rounds,
            "decode_6x384_batch1": decode_section(work, args.rounds, args.new_tokens, args.threads),
            "smollm2_135m_shape": smollm2_section(work, args.rounds, args.smol_tokens),
            "quality": quality_section(args.train_steps),
        }
    record["load_average_before"] = list(load_before)
    record["load_average_after"] = list(os.getloadavg())
    record["machine"] = machine_info(args.threads, "cpu")
    write_result(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
