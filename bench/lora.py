"""LoRA against full fine-tuning on a SmolLM2-135M-shaped model: peak memory and step time (CPU, fp32).

    python -m bench.lora [--rounds 2] [--steps 3] [--batch 4] [--seq 128] [--out docs/benchmarks/lora.json]

Each measurement is a fresh process (peak RSS is per process): build the model (30 layers, width 576, 9 heads,
3 KV heads, MLP 1536, vocab 49152, random weights), optionally attach LoRA (r=8, alpha=16, on q,k,v,o), then one
warm-up and `--steps` timed optimizer steps (forward, backward, AdamW) on random tokens. Reported: median step
time, the process's peak RSS and its growth over the model alone, and the exact bytes of gradients and
optimizer state. Full and LoRA processes alternate, round by round, so load from other processes spreads over
both; ratios of medians are the result. Left out: data loading, evaluation, checkpoint writes, GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench.common import write_result

SHAPE = dict(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, mlp_width=1536, block_size=2048,
             rope_theta=100000.0, tie_embeddings=True)
LORA = dict(r=8, alpha=16.0, targets="q,k,v,o")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(mode: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    """One measurement in this process (called in a child)."""
    from pocketgpt.model.config import ModelConfig
    from pocketgpt.model.gpt import GPT
    from pocketgpt.training.lora import LoraSpec, attach
    from pocketgpt.training.optim import make_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SHAPE)).train()
    if mode == "lora":
        attach(model, LoraSpec.parse(LORA["r"], LORA["alpha"], LORA["targets"]))
    rss_model = _rss()
    optimizer = make_optimizer(model, 1e-4, 0.1, "cpu")
    x = torch.randint(0, SHAPE["vocab_size"], (batch, seq + 1))
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        _, loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated: they are part of the footprint
        times.append(time.perf_counter() - t0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "mode": mode, "step_s": times[1:], "trainable_params": sum(p.numel() for p in trainable),
        "grad_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state),
        "rss_model_bytes": rss_model, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _child(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "bench.lora", "--worker", mode, "--steps", str(args.steps), "--batch",
           str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default="docs/benchmarks/lora.json")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.seq, args.threads)))
        return 0
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(args.rounds):
        for mode in ("full", "lora"):
            runs[mode].append(_child(mode, args))
    summary = {}
    for mode, rs in runs.items():
        summary[mode] = {
            "step_s_median": round(statistics.median(t for r in rs for t in r["step_s"]), 3),
            "step_s": [round(t, 3) for r in rs for t in r["step_s"]],
            "peak_rss_mib": round(statistics.median(r["peak_rss_bytes"] for r in rs) / 2**20, 1),
            "peak_rss_over_model_mib": round(statistics.median(r["peak_rss_bytes"] - r["rss_model_bytes"]
                                                               for r in rs) / 2**20, 1),
            "trainable_params": rs[0]["trainable_params"],
            "grad_plus_optimizer_state_mib": round((rs[0]["grad_bytes"] + rs[0]["optimizer_state_bytes"]) / 2**20, 2),
        }
    full, lora = summary["full"], summary["lora"]
    record = {
        "benchmark": "bench.lora", "command": " ".join(["python -m bench.lora", *(sys.argv[1:] if argv is None
                                                                                   else argv)]),
        "model": {"shape": "SmolLM2-135M", **SHAPE}, "lora": LORA,
        "batch": args.batch, "seq": args.seq, "steps_per_process": args.steps, "rounds": args.rounds,
        "full": full, "lora_run": lora,
        "ratios_lora_over_full": {
            "step_time": round(lora["step_s_median"] / full["step_s_median"], 3),
            "peak_rss": round(lora["peak_rss_mib"] / full["peak_rss_mib"], 3),
            "peak_rss_over_model": round(lora["peak_rss_over_model_mib"] / full["peak_rss_over_model_mib"], 3),
            "trainable_params": round(lora["trainable_params"] / full["trainable_params"], 5),
        },
        "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
        "torch": torch.__version__, "threads": args.threads, "cores": os.cpu_count(),
    }
    write_result(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
