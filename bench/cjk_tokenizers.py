"""Tokenizer choices on Chinese: byte-level BPE as it was, against CJK characters kept whole, by vocabulary size.

    python -m bench.cjk_tokenizers [--vocabs 1024 4096 8192]

On the Tang poems (train on the first 90% of the poems, measure on the last 10%, the split of bench.budget):
the tokenizer's training time, held-out bytes per token (more text per step of the model), the vocabulary
actually reached, and the share of held-out CJK characters that are one token each (a character split into
byte pieces costs the model several predictions). Results: docs/benchmarks/cjk_tokenizers.json. The models'
bits per byte for the vocabulary sizes are bench.budget's job (`--set "--tokenizer-vocab N"`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.budget import split_corpus  # noqa: E402
from pocketgpt.model.tokenizer import CJK_CHARS, train_tokenizer  # noqa: E402

RESULT = ROOT / "docs" / "benchmarks" / "cjk_tokenizers.json"


def measure(train: str, val: str, vocab: int, cjk_whole: bool) -> dict:
    t0 = time.perf_counter()
    tok = train_tokenizer([train], vocab_size=vocab, cjk_whole=cjk_whole)
    train_s = time.perf_counter() - t0
    ids = tok.encode(val)
    cjk = re.compile(f"[{CJK_CHARS}]")
    pieces = [tok.token_bytes(i).decode("utf-8", "ignore") for i in range(tok.vocab_size)]
    whole = {p for p in pieces if len(p) == 1 and cjk.match(p)}
    chars = cjk.findall(val)
    return {"vocab_requested": vocab, "cjk_whole": cjk_whole, "vocab": tok.vocab_size, "train_s": train_s,
            "bytes_per_token": len(val.encode()) / len(ids),
            "cjk_chars_single_token": sum(c in whole for c in chars) / max(1, len(chars)),
            "multi_char_tokens": sum(len(cjk.findall(p)) > 1 for p in pieces)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cjk_tokenizers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabs", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "budget")
    p.add_argument("--json", type=Path, default=RESULT)
    args = p.parse_args(argv)
    train_path, val_path = split_corpus("tang", args.work)
    train, val = train_path.read_text(encoding="utf-8"), val_path.read_text(encoding="utf-8")
    rows = []
    for vocab in args.vocabs:
        for whole in (False, True):
            rows.append(measure(train, val, vocab, whole))
            r = rows[-1]
            kind = "whole CJK" if whole else "byte BPE"
            print(f"vocab {vocab:5d} {kind:9s}: {r['bytes_per_token']:.2f} bytes/token, "
                  f"{r['cjk_chars_single_token']:.1%} of characters one token, trained in {r['train_s']:.1f} s",
                  flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                     "load_average": os.getloadavg(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
