"""A stand-in for `python -m pocketgpt.training train` that follows the trainer's contract without any torch.

    python tests/fake_trainer.py train --data SRC... --max-steps N --out RUN_DIR [--resume RUN_DIR] ...

Writes `RUN_DIR/metrics.jsonl` (start / train / eval / checkpoint / end records) and `last/`, `best/`
checkpoint directories with a real safetensors header; SIGTERM saves `last/`, writes end/cancelled, exits 143.
Knobs (environment): FAKE_STEP_S seconds per step (default 0.02); FAKE_FAIL_AT step at which to fail (exit 1,
error record); FAKE_IGNORE_TERM=1 ignores SIGTERM. A data file whose text starts with "FAIL" fails at step 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sys
import time
from pathlib import Path

stop: dict[str, int] = {}


def record(out: Path, **rec) -> None:
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"time": time.time(), **rec}) + "\n")


def save(out: Path, kind: str, step: int, val_loss: float | None) -> Path:
    path = out / kind
    path.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"wte.weight": {"dtype": "F32", "shape": [10, 4], "data_offsets": [0, 160]},
                         "ln.weight": {"dtype": "F32", "shape": [4], "data_offsets": [160, 176]}}).encode()
    header += b" " * (-len(header) % 8)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(176))
    (path / "config.json").write_text(json.dumps({"vocab_size": 10, "n_layer": 1, "n_head": 1, "n_embd": 4,
                                                  "block_size": 8}))
    (path / "meta.json").write_text(json.dumps({"step": step, "val_loss": val_loss, "created": time.time()}))
    record(out, type="checkpoint", step=step, path=str(path), kind=kind)
    return path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("command")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--resume")
    args, _unknown = p.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    step_s = float(os.environ.get("FAKE_STEP_S", "0.02"))
    fail_at = int(os.environ.get("FAKE_FAIL_AT", "0"))
    for src in args.data:
        if src != "stdlib" and Path(src).is_file() and Path(src).read_bytes().startswith(b"FAIL"):
            fail_at = 1
    if os.environ.get("FAKE_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.setdefault("code", 143))
    signal.signal(signal.SIGINT, lambda *_: stop.setdefault("code", 130))

    start = 0
    if args.resume:
        start = json.loads((Path(args.resume) / "last" / "meta.json").read_text())["step"]
    record(out, type="start", total_steps=args.max_steps, params=56, tokens_per_step=64,
           resumed_from_step=start if args.resume else None, preset="tiny", run_dir=str(out))
    print(f"fake trainer: steps {start}..{args.max_steps}", flush=True)
    best = None
    done = start
    for step in range(start + 1, args.max_steps + 1):
        if "code" in stop:
            break
        time.sleep(step_s)
        if step == fail_at:
            print("Traceback (most recent call last):\nValueError: fake failure: data too short", file=sys.stderr)
            record(out, type="error", message="ValueError: fake failure: data too short")
            return 1
        loss = 5.0 / step
        record(out, type="train", step=step, total_steps=args.max_steps, loss=loss, lr=1e-3, tokens_per_s=1000.0,
               elapsed_s=step * step_s, eta_s=(args.max_steps - step) * step_s, tokens_seen=step * 64)
        if step % args.eval_every == 0 or step == args.max_steps:
            val = loss + 0.1
            is_best = best is None or val < best
            record(out, type="eval", step=step, val_loss=val, val_ppl=2.0, val_bpb=1.0, sample="hi", best=is_best)
            if is_best:
                best = val
                save(out, "best", step, val)
            save(out, "last", step, val)
        done = step
    if "code" in stop:
        last = save(out, "last", done, None)
        record(out, type="end", status="cancelled", step=done, reason="signal", best_val_loss=best,
               best_path=str(out / "best"), last_path=str(last))
        return stop["code"]
    record(out, type="end", status="succeeded", step=done, reason="max_steps", best_val_loss=best,
           best_path=str(out / "best"), last_path=str(out / "last"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
