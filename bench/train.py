"""Section 3: training, our trainer (`python -m pocketgpt.training train`) against a nanoGPT-style loop, in one run.

The reference is nanoGPT's CPU "baby" Shakespeare run written out here on our GPT class in nanoGPT's layout
(learned positions, LayerNorm, GELU, no biases, tied head): characters as tokens, 4 layers, 4 heads, 128 wide,
context 64, batch 12, AdamW (lr 1e-3 -> 1e-4 cosine over 2000 steps, 100 warm-up, beta2 0.99, weight decay
0.1, clip 1.0). Both sides get the same wall-clock budget on the same threads, one after the other.

Figures:
- speed: steady-state training tokens/s on the 4/4/128 shape, context 64, batch 12 (our trainer with its
  smallest byte-level vocabulary, 260, the nearest to characters), and MFU = model FLOPs per second over the
  machine's measured fp32 matmul rate (a big sgemm at the same thread count);
- quality: bits per byte on the validation split (the last 10% of the bytes of Tiny Shakespeare, every token
  scored once in consecutive context-sized windows, the same scorer for both sides) after the budget, plus the
  curve of each side's own validation estimates against wall time.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import ROOT, SHAKESPEARE, cuda_sync, summary, thread_env
from pocketgpt.model.config import ModelConfig
from pocketgpt.model.gpt import GPT

SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12}

# Our trainer's settings for the 130-second quality run (the trainer's defaults otherwise). Bigger batches and
# a higher learning rate than the reference use the 2 cores better; a 1024-token BPE vocabulary carries ~2.3
# bytes per token, so each step sees more text for little more compute at this width.
QUALITY = {
    "preset": "small", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "batch_size": 16,
    "tokenizer_vocab": 1024, "lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 50, "dropout": 0.0, "weight_decay": 0.1,
}


# -- FLOPs and the machine's matmul rate ------------------------------------------------------------
def flops_per_token(n_params: int, n_layer: int, n_embd: int, block: int) -> float:
    """Training FLOPs per token: 6 N (forward + backward of the weights) + 12 L T C (attention), as in PaLM."""
    return 6 * n_params + 12 * n_layer * block * n_embd


def matmul_peak(threads: int, n: int = 1024, repeats: int = 5, device: str = "cpu") -> float:
    """Measured fp32 GEMM FLOP/s at `threads` threads (or on the GPU): the denominator of MFU."""
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        n *= 8
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = 0.0
    for _ in range(repeats):
        cuda_sync(device)
        t0 = time.perf_counter()
        a @ b
        cuda_sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


# -- the scorer both sides share ----------------------------------------------------------------------
@torch.inference_mode()
def bits_per_byte(model: GPT, ids: list[int], n_bytes: int, batch: int = 32) -> float:
    """Total cross-entropy of `ids` (every token after the first of each window) in bits, over `n_bytes`."""
    block = model.config.block_size
    windows = [ids[i : i + block + 1] for i in range(0, len(ids) - 1, block)]
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        width = max(len(w) for w in chunk)
        dev = model.wte.weight.device
        x = torch.tensor([w[:-1] + [0] * (width - len(w)) for w in chunk], device=dev)
        y = torch.tensor([w[1:] + [-1] * (width - len(w)) for w in chunk], device=dev)
        logits, _ = model(x)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum"))
    return total / math.log(2) / n_bytes


def split(text: str) -> tuple[str, str]:
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


# -- the nanoGPT-style reference ----------------------------------------------------------------------
def nanogpt_reference(seconds: float, threads: int, max_steps: int = 2000, eval_every: int = 100,
                      eval_batches: int = 20, seed: int = 1337, device: str = "cpu",
                      texts: tuple[str, str] | None = None) -> dict[str, Any]:
    """nanoGPT's CPU run on Tiny Shakespeare (90/10 by bytes), or on `texts` = (train, val) (bench.budget)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train_text, val_text = texts if texts is not None else split(SHAKESPEARE.read_text(encoding="utf-8"))
    chars = sorted(set(train_text + val_text))  # as nanoGPT's prepare.py: the alphabet of the whole file
    stoi = {c: i for i, c in enumerate(chars)}
    train = torch.tensor([stoi[c] for c in train_text], device=device)
    val_ids = [stoi[c] for c in val_text]
    val = torch.tensor(val_ids, device=device)
    block, bsz = SHAPE["block_size"], SHAPE["batch_size"]
    cfg = ModelConfig(vocab_size=len(chars), n_layer=4, n_head=4, n_embd=128, block_size=block, dropout=0.0,
                      positions="learned", norm="layernorm", mlp="gelu", bias=False, tie_embeddings=True)
    model = GPT(cfg).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)

    def batch(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - block, (bsz,), generator=gen).tolist()
        return torch.stack([data[i : i + block] for i in ix]), torch.stack([data[i + 1 : i + 1 + block] for i in ix])

    def lr_at(it: int) -> float:
        if it < 100:
            return 1e-3 * (it + 1) / 101
        ratio = min(1.0, (it - 100) / (max_steps - 100))
        return 1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    @torch.no_grad()
    def estimate() -> float:
        model.eval()
        losses = [float(model(*batch(val))[1]) for _ in range(eval_batches)]
        model.train()
        return sum(losses) / len(losses) / math.log(2)  # characters are bytes here

    curve, log = [], []
    t0 = time.perf_counter()
    steps = 0
    model.train()
    while steps < max_steps and time.perf_counter() - t0 < seconds:
        if steps % eval_every == 0:
            curve.append({"step": steps, "elapsed_s": time.perf_counter() - t0, "val_bpb": estimate()})
        for g in opt.param_groups:
            g["lr"] = lr_at(steps)
        x, y = batch(train)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps += 1
        if steps % 10 == 0:
            cuda_sync(device)
        if steps % 10 == 0:
            log.append((time.perf_counter() - t0, steps))
    wall = time.perf_counter() - t0
    curve.append({"step": steps, "elapsed_s": wall, "val_bpb": estimate()})
    model.eval()
    bpb = bits_per_byte(model, val_ids, len(val_text.encode()))
    # Steady state: steps 50 and on (warm-up, first allocations and the first evaluations left out).
    rate_steps = [(t, s) for t, s in log if s >= 50]
    tok_s = None
    if len(rate_steps) >= 2:
        (ta, sa), (tb, sb) = rate_steps[0], rate_steps[-1]
        tok_s = (sb - sa) * bsz * block / (tb - ta)
    n_params = model.num_params()
    return {"steps": steps, "wall_s": wall, "tokens_per_s": tok_s, "val_bpb": bpb, "curve": curve,
            "params": n_params, "vocab": len(chars), "bytes_per_token": 1.0,
            "flops_per_token": flops_per_token(n_params, 4, 128, block)}


# -- our trainer ----------------------------------------------------------------------------------------
def trainer_run(out: Path, settings: dict[str, Any], threads: int, seconds: float | None, max_steps: int,
                eval_every: int, data_dir: Path, device: str = "cpu") -> tuple[list[dict], float]:
    """`python -m pocketgpt.training train` with `settings`; returns its metrics records and the process wall time."""
    args = [sys.executable, "-m", "pocketgpt.training", "train", "--data", str(SHAKESPEARE), "--out", str(out),
            "--overwrite", "--device", device, "--max-steps", str(max_steps), "--eval-every", str(eval_every),
            "--log-every", "10", "--data-dir", str(data_dir), "--sample-tokens", "0"]
    if seconds is not None:
        args += ["--max-time", str(seconds)]
    for key, value in settings.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    env = {**os.environ, **thread_env(threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"trainer failed ({proc.returncode}): {proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return records, wall


def steady_tokens_per_s(records: list[dict]) -> float | None:
    train = [r for r in records if r["type"] == "train" and r["step"] >= 50]
    if len(train) < 2:
        return None
    a, b = train[0], train[-1]
    return (b["tokens_seen"] - a["tokens_seen"]) / (b["elapsed_s"] - a["elapsed_s"])


def eval_curve(records: list[dict]) -> list[dict]:
    """(step, elapsed_s, val_bpb) of the trainer's evaluations; elapsed from the nearest logged step."""
    times = {r["step"]: r["elapsed_s"] for r in records if r["type"] == "train"}
    steps = sorted(times)
    curve = []
    for r in records:
        if r["type"] == "eval" and r.get("val_bpb") is not None:
            near = min(steps, key=lambda s: abs(s - r["step"])) if steps else None
            curve.append({"step": r["step"], "elapsed_s": times.get(near, 0.0), "val_bpb": r["val_bpb"]})
    return curve


def score_checkpoint(path: Path) -> dict[str, Any]:
    from pocketgpt.model.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    _, val_text = split(SHAKESPEARE.read_text(encoding="utf-8"))
    ids = ck.tokenizer.encode(val_text)
    n_bytes = len(val_text.encode())
    return {"val_bpb": bits_per_byte(ck.model, ids, n_bytes), "bytes_per_token": n_bytes / len(ids),
            "params": ck.model.num_params(), "vocab": ck.config.vocab_size}


def run(work: Path, seconds: float, threads: int, quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    if not SHAKESPEARE.is_file():
        return {"skipped": f"{SHAKESPEARE} not found (it comes with ../shared)"}
    work.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak(threads, device=device)
    out: dict[str, Any] = {"budget_s": seconds, "threads": threads, "matmul_peak_gflops": peak / 1e9,
                           "shape": SHAPE, "quality_settings": QUALITY}

    # Speed, the same shape on both sides, alternating, over a few short runs.
    speed_steps = 120 if quick else 400
    rounds = 1 if quick else 3
    ours_speed, ref_speed = [], []
    speed_settings = {"preset": "small", **{k: v for k, v in SHAPE.items()}, "tokenizer_vocab": 260,
                      "dropout": 0.0, "eval_batches": 1}
    trainer_run(work / "speed", speed_settings, threads, None, 1, 10**6, work / "data-260")  # data prep
    for _ in range(rounds):
        ref = nanogpt_reference(seconds=1e9, threads=threads, max_steps=speed_steps, eval_every=10**9,
                                device=device)
        ref_speed.append(ref["tokens_per_s"])
        records, _ = trainer_run(work / "speed", speed_settings, threads, None, speed_steps, 10**6,
                                 work / "data-260", device)
        ours_speed.append(steady_tokens_per_s(records))
    start = next(r for r in records if r["type"] == "start")
    ours_fpt = flops_per_token(start["params"], SHAPE["n_layer"], SHAPE["n_embd"], SHAPE["block_size"])
    out["speed"] = {
        "ours_tokens_per_s": summary(ours_speed), "nanogpt_tokens_per_s": summary(ref_speed),
        "ours_params": start["params"], "nanogpt_params": ref["params"],
        "ours_mfu": summary([t * ours_fpt / peak for t in ours_speed]),
        "nanogpt_mfu": summary([t * ref["flops_per_token"] / peak for t in ref_speed]),
    }

    # Quality: the same wall-clock budget each.
    ref = nanogpt_reference(seconds=seconds, threads=threads, max_steps=2000, eval_every=100 if not quick else 50,
                            device=device)
    q_steps = 4000
    trainer_run(work / "prepare", QUALITY, threads, None, 1, 10**6, work / "data-quality")  # data prep, untimed
    records, wall = trainer_run(work / "quality", QUALITY, threads, seconds, q_steps,
                                100 if not quick else 50, work / "data-quality", device)
    end = next((r for r in records if r["type"] == "end"), {})
    ours_last = work / "quality" / "last"
    scored = score_checkpoint(ours_last) if ours_last.is_dir() else {}
    train_records = [r for r in records if r["type"] == "train"]
    out["quality"] = {
        "nanogpt": {k: ref[k] for k in ("steps", "wall_s", "val_bpb", "curve", "params")},
        "ours": {"steps": end.get("step"), "reason": end.get("reason"),
                 "wall_s": train_records[-1]["elapsed_s"] if train_records else wall, "process_wall_s": wall,
                 "curve": eval_curve(records), **scored},
    }
    return out
