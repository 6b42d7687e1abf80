"""pocketgpt benchmark suite: our decode engine, server and trainer against their peers, in one run.

    python -m bench                      # everything, CPU, 2 threads; writes docs/benchmarks.md + plots
    python -m bench --quick              # a smoke run (~2 min): fewer tokens, rounds and levels
    python -m bench --only decode serve  # some sections
    python -m bench --device cuda        # on a GPU (bf16 for the server)
    make bench                           # = python bench/run.py

Sections: `decode` (one stream: engine in-process, HTTP+SSE, transformers generate(), nanoGPT-style recompute,
a bare static-KV loop, and the memory-bandwidth floor), `serve` (1..64 concurrent HTTP streams against the bare
loop at the same batch; a 512-token prompt arriving during 16 streams) and `train` (the trainer against a
nanoGPT-style loop on the same shape; bits per byte on Tiny Shakespeare against wall time).
Results go to docs/benchmarks/results.json (or --json), the table to docs/benchmarks.md (or --markdown),
plots to docs/benchmarks/*.png; the figures README.md quotes are then regenerated (bench/figures.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/run.py` as well as `python -m bench`
    sys.path.insert(0, str(ROOT))

SECTIONS = ("decode", "serve", "train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke-test sizes: a couple of minutes in all")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads, every side (default 2)")
    p.add_argument("--rounds", type=int, help="repeats of the decode measurements (default 5; quick 2)")
    p.add_argument("--serve-rounds", type=int, help="repeats of the serving measurements (default 3; quick 1)")
    p.add_argument("--new-tokens", type=int, help="tokens per stream (default 128; quick 32)")
    p.add_argument("--levels", type=int, nargs="+", help="concurrent streams (default 1 4 16 32 64)")
    p.add_argument("--train-seconds", type=float, help="training budget of the quality run (default 130)")
    p.add_argument("--no-hf", action="store_true", help="leave out transformers")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench", help="scratch directory")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks" / "results.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--plots", type=Path, default=ROOT / "docs" / "benchmarks", help="folder for the PNG plots")
    p.add_argument("--no-report", action="store_true", help="write the JSON only")
    args = p.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 5)
    args.serve_rounds = args.serve_rounds or (1 if quick else 3)
    args.new_tokens = args.new_tokens or (32 if quick else 128)
    args.levels = args.levels or ([1, 4, 16] if quick else [1, 4, 16, 32, 64])
    args.train_seconds = args.train_seconds or (20.0 if quick else 130.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Thread settings first: the OpenMP pool is sized when torch first runs an op.
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)

    from bench import decode, figures, report, serve, train
    from bench.client import Server
    from bench.common import cached_bench_tokenizer, headline_config, machine_info, make_checkpoint, thread_probe

    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick, "rounds": args.rounds,
        "serve_rounds": args.serve_rounds,
        "machine": machine_info(args.threads, args.device), "sections": {},
    }
    t_start = time.perf_counter()
    if {"decode", "serve"} & set(args.only):
        tokenizer = cached_bench_tokenizer(args.work)
        cfg = headline_config(vocab_size=max(8192, tokenizer.vocab_size))
        checkpoint = make_checkpoint(args.work / "headline-random", cfg, tokenizer)
        results["model"] = cfg.to_dict()
        results["thread_probe"] = thread_probe()
        # No prefix cache: the interference rounds send the same long prompt each round, and a cache hit would
        # skip the very prefill they measure (`python -m bench.engine` measures the prefix cache).
        server_env = {"POCKETGPT_DB": str(args.work / "server.db"), "POCKETGPT_DATA_DIR": str(args.work / "data"),
                      "POCKETGPT_CHECKPOINT_DIR": str(args.work / "checkpoints"), "POCKETGPT_PREFIX_CACHE_SLOTS": "0"}
        with Server(checkpoint, args.threads, max_running=max([*args.levels, 16]), device=args.device,
                    extra_env=server_env) as server:
            if "decode" in args.only:
                print("== decode: one stream", flush=True)
                naive_n = min(args.new_tokens, 16) if args.quick else args.new_tokens
                results["sections"]["decode"] = decode.run(checkpoint, server, args.new_tokens, args.rounds,
                                                           args.device, naive_n, with_hf=not args.no_hf)
                print(json.dumps(results["sections"]["decode"]["tok_s"], default=_short), flush=True)
            if "serve" in args.only:
                print("== serve: concurrent HTTP streams", flush=True)
                results["sections"]["serve"] = serve.run(checkpoint, server, args.levels, args.new_tokens,
                                                         args.serve_rounds, device=args.device)
    if "train" in args.only:
        print("== train", flush=True)
        results["sections"]["train"] = train.run(args.work / "train", args.train_seconds, args.threads,
                                                 quick=args.quick, device=args.device)
    results["elapsed_s"] = time.perf_counter() - t_start
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results: {args.json}")
    if not args.no_report:
        report.write(results, args.markdown, args.plots, args.json)
        print(f"report: {args.markdown}")
        if args.json.resolve() == figures.RESULTS.resolve():  # the file README.md and docs/ quote
            figures.main([])
    return 0


def _short(obj):
    return str(obj)


if __name__ == "__main__":
    sys.exit(main())
