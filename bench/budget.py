"""Train the best model a time budget allows: held-out bits per byte at fixed wall-clock budgets.

    python -m bench.budget                                   # 60, 130 and 600 s; Shakespeare and Tang poems
    python -m bench.budget --budgets 60 130 --corpora tang   # a subset
    python -m bench.budget --configs new --set "--lr 4e-3"   # a variant of the new defaults (a trial)
    python -m bench.budget --threads 1 --jobs 2              # both corpora at once, one core each

For each corpus, budget and contender, one after the other on the same threads:
- `new`: `pocketgpt train --data train.txt --max-time T` and nothing else (the planner, the time schedule);
- `previous`: the trainer's defaults before the planner, as explicit flags (`--preset small`, BPE 8,192,
  batch 16, lr 1e-3 -> 1e-4 cosine over 2,000 steps, 100 warm-up steps), with the same `--max-time T`;
- `nanogpt`: the nanoGPT-style character-level loop of bench/train.py with nanoGPT's README CPU settings, for T s.
Both trainer runs include their data preparation in T (as a user's run does); the nanoGPT loop's character
table takes no time. Every side is scored the same way: `pocketgpt eval --checkpoint RUN/best --data val.txt`
(every held-out byte, consecutive context-sized windows), and bench.train.bits_per_byte for the nanoGPT model.

Splits: Tiny Shakespeare, the first 90% of the bytes / the last 10%; Tang poems, the first 90% of the poems
(blank-line separated) / the last 10%. tokens/s is the mean over the training loop; MFU = tokens/s x training
FLOPs per token (6 N + 12 L T C) / the machine's measured fp32 matmul rate at the same thread count.

A budget is wall time, so on a shared machine it buys what the neighbours leave. Every contender (and the matmul
probe) therefore runs as a child at niceness -20 in its own scheduling group (bench/child.py), and each row records
the niceness, the load average and the child's CPU time over its wall time (getrusage): about 1.0 per thread means
it had its cores; the table flags rows below 0.9. `--jobs 2` runs the corpora side by side (2 cores, 1 thread each).
Results: docs/benchmarks/budget.json and a section of docs/benchmarks.md (bench/report.py keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.budget_report import write_markdown  # noqa: E402
from bench.child import run_child  # noqa: E402
from bench.common import thread_env  # noqa: E402

DATA = Path(os.environ.get("POCKETGPT_BENCH_DATA", ROOT.parent / "shared" / "data"))  # where ../shared lives
CORPORA = {"shakespeare": DATA / "tinyshakespeare.txt", "tang": DATA / "tang-poems.txt"}
CONFIGS = ("new", "previous", "nanogpt")
PREVIOUS = ["--preset", "small", "--tokenizer-vocab", "8192", "--batch-size", "16", "--lr", "1e-3",
            "--min-lr", "1e-4", "--warmup-steps", "100", "--max-steps", "2000"]
RESULT = ROOT / "docs" / "benchmarks" / "budget.json"
MARKDOWN = ROOT / "docs" / "benchmarks.md"


def split_corpus(name: str, work: Path) -> tuple[Path, Path]:
    """train.txt and val.txt of a corpus: bytes 90/10 (Shakespeare), poems 90/10 (Tang)."""
    text = CORPORA[name].read_text(encoding="utf-8")
    if name == "tang":
        poems = [p for p in text.split("\n\n") if p.strip()]
        cut = int(0.9 * len(poems))
        train, val = "\n\n".join(poems[:cut]) + "\n\n", "\n\n".join(poems[cut:]) + "\n"
    else:
        raw = text.encode("utf-8")
        cut = int(0.9 * len(raw))
        train, val = raw[:cut].decode("utf-8", "ignore"), raw[cut:].decode("utf-8", "ignore")
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text(train, encoding="utf-8")
    (folder / "val.txt").write_text(val, encoding="utf-8")
    return folder / "train.txt", folder / "val.txt"


def _env(threads: int) -> dict[str, str]:
    env = {**os.environ, **thread_env(threads), "PYTHONPATH": str(ROOT)}
    if threads == 1:  # the tokenizer library's own thread pool too (a busy machine: see --threads)
        env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def trainer_row(args: list[str], train: Path, val: Path, out: Path, budget: float, threads: int,
                peak: float) -> dict[str, Any]:
    """One `pocketgpt train` run and its `pocketgpt eval` score."""
    cmd = [sys.executable, "-m", "pocketgpt.training", "train", "--data", str(train), "--max-time", str(budget),
           "--out", str(out), "--overwrite", "--device", "cpu", *args]
    proc = run_child(cmd, _env(threads), ROOT)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"trainer failed ({proc.returncode}): {proc.stderr[-3000:]}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ev = run_child([sys.executable, "-m", "pocketgpt.training", "eval", "--checkpoint", str(out / "best"),
                    "--data", str(val), "--json", "--max-tokens", str(10**9), "--n-prompts", "0",
                    "--device", "cpu", "--batch-size", "16"], _env(threads), ROOT)
    if ev.returncode != 0:
        raise RuntimeError(f"eval failed: {ev.stderr[-2000:]}")
    score = json.loads(ev.stdout)
    train_recs = [r for r in records if r["type"] == "train"]
    start = next(r for r in records if r["type"] == "start")
    end = next(r for r in records if r["type"] == "end")
    plan = next((r["rows"] for r in records if r["type"] == "plan"), None)
    from pocketgpt.model.checkpoint import read_meta

    cfg = read_meta(out / "best")["config"]
    first, last = (train_recs[0], train_recs[-1]) if train_recs else ({}, {})
    tok_s = (last["tokens_seen"] - first["tokens_seen"]) / max(last["elapsed_s"] - first["elapsed_s"], 1e-9) \
        if len(train_recs) >= 2 else None
    from bench.train import flops_per_token
    from pocketgpt.model.config import preset

    m = preset(cfg["preset"] or "small", **{k: cfg[k] for k in ("n_layer", "n_embd", "block_size") if cfg[k]})
    fpt = flops_per_token(start["params"], m.n_layer, m.n_embd, m.block_size)
    prep = _prep_seconds(proc.stderr)
    return {**proc.record(threads), "bpb": score["bits_per_byte"], "val_bytes": score["bytes"], "steps": end["step"],
            "reason": end["reason"], "process_wall_s": proc.wall_s, "prep_s": prep, "tokens_per_s": tok_s,
            "mfu": tok_s * fpt / peak if tok_s else None,
            "params": start["params"], "tokens_seen": last.get("tokens_seen", 0), "plan": plan,
            "shape": {"n_layer": m.n_layer, "n_embd": m.n_embd, "block_size": m.block_size,
                      "vocab": cfg["tokenizer_vocab"], "batch_size": cfg["batch_size"],
                      "lr": cfg["lr"], "dropout": cfg["dropout"]}}


def _prep_seconds(stderr: str) -> float | None:
    for line in stderr.splitlines():
        if line.startswith("planning and data preparation took "):
            return float(line.split()[5])
    return None


def nanogpt_row(train: Path, val: Path, out: Path, budget: float, threads: int, peak: float) -> dict[str, Any]:
    result = out / "nanogpt.json"
    out.mkdir(parents=True, exist_ok=True)
    proc = run_child([sys.executable, "-m", "bench.child", "nanogpt", str(train), str(val), str(budget), str(threads),
                      str(result)], _env(threads), ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"nanoGPT loop failed ({proc.returncode}): {proc.stderr[-3000:]}")
    ref = json.loads(result.read_text())
    tok_s = ref["tokens_per_s"]
    return {**proc.record(threads), "bpb": ref["val_bpb"], "steps": ref["steps"], "process_wall_s": ref["wall_s"],
            "tokens_per_s": tok_s,
            "mfu": tok_s * ref["flops_per_token"] / peak if tok_s else None, "params": ref["params"],
            "shape": {"n_layer": 4, "n_embd": 128, "block_size": 64, "vocab": ref["vocab"], "batch_size": 12}}


def one_row(args: argparse.Namespace, corpus: str, config: str, budget: float, train: Path, val: Path,
            peak: float) -> dict[str, Any]:
    """One contender on one corpus at one budget, with the load and the share of a core it got."""
    load_before = os.getloadavg()
    out = args.work / f"{corpus}-{budget:g}-{config}"
    if config == "nanogpt":
        row = nanogpt_row(train, val, out, budget, args.threads, peak)
    else:
        flags = PREVIOUS if config == "previous" else args.set
        row = trainer_row(flags, train, val, out, budget, args.threads, peak)
    row.update(corpus=corpus, budget_s=budget, config=config, load_before=load_before, load_after=os.getloadavg(),
               parallel_jobs=args.jobs)
    print(f"{corpus:12s} {budget:5g} s {config:9s} {row['bpb']:.3f} bpb  {row['tokens_per_s'] or 0:8,.0f} tok/s  "
          f"cpu/wall {row['cpu_per_wall']:.2f}  nice {row['niceness']}  load {load_before[0]:.1f}", flush=True)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    # the machine's fp32 matmul rate, measured at the same priority and threads as the contenders
    code = f"from bench.train import matmul_peak; print(matmul_peak({args.threads}))"
    probe = run_child([sys.executable, "-c", code], _env(args.threads), ROOT)
    if probe.returncode != 0:
        raise RuntimeError(f"matmul probe failed: {probe.stderr[-2000:]}")
    peak = float(probe.stdout.split()[-1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "commit": commit.stdout.strip(),
        "threads": args.threads, "cores": os.cpu_count(), "matmul_peak_gflops": peak / 1e9,
        "load_average_start": os.getloadavg(), "extra_flags": args.set, "rows": [],
    }
    lock = threading.Lock()

    def one_corpus(corpus: str) -> None:
        train, val = split_corpus(corpus, args.work)
        for budget in args.budgets:
            for config in args.configs:
                row = one_row(args, corpus, config, budget, train, val, peak)
                with lock:
                    results["rows"].append(row)
                    results["rows"].sort(key=lambda r: (args.corpora.index(r["corpus"]), r["budget_s"],
                                                        CONFIGS.index(r["config"])))
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a stop

    # --jobs 2: the corpora side by side, each child on its own core (its cpu/wall in the row shows it did)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one_corpus, args.corpora))
    results["load_average_end"] = os.getloadavg()
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[60, 130, 600])
    p.add_argument("--corpora", nargs="+", choices=sorted(CORPORA), default=["shakespeare", "tang"])
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--set", nargs="*", default=[], metavar="FLAG", help="extra trainer flags for `new` (trials)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads of every contender (2; on a machine other jobs keep busy, 1 is faster)")
    p.add_argument("--jobs", type=int, default=1, choices=(1, 2),
                   help="corpora run side by side (2: one child per core; check each row's cpu/wall)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "budget")
    p.add_argument("--json", type=Path, default=RESULT)
    p.add_argument("--markdown", type=Path, default=MARKDOWN)
    p.add_argument("--no-markdown", action="store_true", help="write the JSON only (trials)")
    args = p.parse_args(argv)
    args.set = [x for item in args.set for x in item.split()]
    missing = [str(CORPORA[c]) for c in args.corpora if not CORPORA[c].is_file()]
    if missing:
        print(f"bench.budget: {', '.join(missing)} not found (they come with ../shared)", file=sys.stderr)
        return 2
    results = run(args)
    if not args.no_markdown:
        write_markdown(results, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
