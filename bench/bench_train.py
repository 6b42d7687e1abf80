"""Training figures on this machine (a benchmark, not a test).

1. Throughput: tokens/s of the `small` preset (4 layers, 4 heads, 256 wide, context 256, vocab 8192) at batch
   16, measured over `--speed-seconds` of training after a warm-up.
2. Quality: validation bits per byte on ../shared/data/tinyshakespeare.txt (last 10% held out) after
   `--minutes` of training (data preparation included). The step count is sized from a short calibration so
   the cosine schedule ends at the deadline; bits per byte is then measured on the whole validation split.
   Reference: nanoGPT's CPU "baby" character model reaches 1.88 nats/char = 2.71 bits per byte in ~3 minutes.

usage: python bench/bench_train.py [--minutes 10] [--speed-seconds 30] [--skip-speed] [--skip-quality]
Results are printed and written to OUT/bench.json. CPU load from other processes skews both figures, so the
load average is reported with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pocketgpt.training.config import TrainConfig  # noqa: E402
from pocketgpt.training.data import token_byte_lengths  # noqa: E402
from pocketgpt.training.evaluate import score_tokens  # noqa: E402
from pocketgpt.training.metrics import read_metrics  # noqa: E402
from pocketgpt.training.progress import Progress  # noqa: E402
from pocketgpt.training.trainer import Trainer  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# Chosen for bits per byte in ~10 minutes of 2 CPU cores on 1 MB of text. The budget (~1e13 FLOP) is
# compute-optimal for a model of about a million parameters, so: the `small` layout at half width (4 layers,
# 128 wide), a small BPE vocabulary (1024: ~2.4 bytes per token while the embedding still sees every token
# often), a short context, small batches for more updates, and no dropout (only a few passes over the data).
QUALITY = {
    "preset": "small", "n_embd": 128, "tokenizer_vocab": 1024, "block_size": 128, "batch_size": 16, "lr": 2e-3,
    "min_lr": 1e-4, "warmup_steps": 50, "dropout": 0.0, "weight_decay": 0.1, "eval_batches": 8,
}


def train(cfg: TrainConfig) -> list[dict]:
    Trainer(cfg, progress=Progress(interactive=False)).run()
    return read_metrics(Path(cfg.out) / "metrics.jsonl")


def measure_speed(out: Path, seconds: float) -> dict:
    """Steady-state tokens/s of the small preset (the first logged interval, with start-up costs, is dropped)."""
    cfg = TrainConfig(data=[str(SHAKESPEARE)], out=str(out / "speed"), preset="small", batch_size=16,
                      max_time=seconds, max_steps=100_000, eval_every=100_000, log_every=1, overwrite=True,
                      data_dir=str(out / "data-8192"))
    train_records = [r for r in train(cfg) if r["type"] == "train"]
    if len(train_records) < 3:
        raise SystemExit(f"bench: only {len(train_records)} steps in {seconds:.0f} s; raise --speed-seconds")
    first, last = train_records[0], train_records[-1]
    tokens = last["tokens_seen"] - first["tokens_seen"]
    return {"preset": "small", "batch_size": 16, "block_size": 256, "vocab": 8192, "steps": last["step"],
            "tokens_per_s": tokens / (last["elapsed_s"] - first["elapsed_s"])}


def calibrate_steps(out: Path, settings: dict, seconds: float) -> int:
    """How many steps of `settings` fit in `seconds` (after the data is prepared)."""
    probe = TrainConfig(data=[str(SHAKESPEARE)], out=str(out / "probe"), max_steps=30, eval_every=100_000,
                        log_every=10, overwrite=True, data_dir=str(out / "data-quality"), **settings)
    records = [r for r in train(probe) if r["type"] == "train"]
    step_s = (records[-1]["elapsed_s"] - records[0]["elapsed_s"]) / (records[-1]["step"] - records[0]["step"])
    # Leave room for periodic evaluations and checkpoints (~5%).
    return max(100, int(seconds * 0.95 / step_s))


def measure_quality(out: Path, minutes: float, settings: dict) -> dict:
    budget = minutes * 60
    steps = calibrate_steps(out, settings, budget)
    cfg = TrainConfig(data=[str(SHAKESPEARE)], out=str(out / "quality"), max_steps=steps, max_time=budget,
                      eval_every=max(steps // 10, 1), log_every=25, overwrite=True,
                      data_dir=str(out / "data-quality"), **settings)
    t0 = time.monotonic()
    trainer = Trainer(cfg, progress=Progress(interactive=False))
    result = trainer.run()
    wall = time.monotonic() - t0
    r = trainer.run_state
    r.model.eval()
    with torch.no_grad():
        full = score_tokens(r.model, np.asarray(r.data.val, dtype=np.int64), token_byte_lengths(r.tokenizer),
                            16, r.device)
    return {"settings": settings, "planned_steps": steps, "steps": result.step, "reason": result.reason,
            "wall_s": wall, "params": r.model.num_params(), "tokens_seen": r.tokens_seen,
            "best_val_loss_sampled": result.best_val_loss, "val_tokens": full["tokens"], "val_bytes": full["bytes"],
            "val_loss": full["loss"], "val_bpb": full["bits_per_byte"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="training budget of the quality run (10)")
    p.add_argument("--speed-seconds", type=float, default=30.0, help="length of the throughput run (30)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a quality setting")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads (all cores)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not SHAKESPEARE.is_file():
        print(f"bench: {SHAKESPEARE} not found (it comes with ../shared)", file=sys.stderr)
        return 2
    out = Path(args.out)
    settings = dict(QUALITY)
    for item in args.set:
        key, value = item.split("=", 1)
        settings[key] = type(settings[key])(value) if key in settings else json.loads(value)
    report = {"cpu_threads": torch.get_num_threads(), "load_average_before": os.getloadavg()}
    if not args.skip_speed:
        report["speed"] = measure_speed(out, args.speed_seconds)
        print(f"throughput: {report['speed']['tokens_per_s']:,.0f} tokens/s (small preset, batch 16 x 256)")
    if not args.skip_quality:
        report["quality"] = q = measure_quality(out, args.minutes, settings)
        print(f"quality: {q['val_bpb']:.3f} bits per byte (val loss {q['val_loss']:.3f} nats/token) after "
              f"{q['wall_s'] / 60:.1f} min, {q['steps']} steps, {q['params']:,} parameters")
    report["load_average_after"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
