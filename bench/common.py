"""What every benchmark section shares: the headline model, thread settings, statistics, the worker thread."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from pocketgpt.model.checkpoint import save_checkpoint
from pocketgpt.model.config import ModelConfig
from pocketgpt.model.gpt import GPT
from pocketgpt.model.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
T = TypeVar("T")

# Fallback text for the tokenizer when ../shared is absent (a fresh clone): any text works, the weights are random.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. ",
    "To be, or not to be, that is the question. All that glitters is not gold. ",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
]


def headline_config(block_size: int = 1024, vocab_size: int = 8192) -> ModelConfig:
    """6 layers, 6 heads, 384 wide, vocab 8192 in the GPT-2 layout, so `transformers` can hold the same weights."""
    return ModelConfig(
        vocab_size=vocab_size, n_layer=6, n_head=6, n_embd=384, block_size=block_size,
        positions="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True,
    )


def bench_tokenizer(vocab_size: int = 8192) -> Tokenizer:
    """A BPE tokenizer for the benchmark model: Tiny Shakespeare when present, else a small built-in text."""
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")
        return train_tokenizer([text[i : i + 4096] for i in range(0, len(text), 4096)], vocab_size=vocab_size)
    return train_tokenizer(CORPUS * 200, vocab_size=vocab_size)


def cached_bench_tokenizer(work: Path, vocab_size: int = 8192) -> Tokenizer:
    """`bench_tokenizer(vocab_size)`, trained once and kept in `work` for later runs."""
    path = work / f"tokenizer-{vocab_size}.json"
    if path.is_file():
        return Tokenizer.from_file(path)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = bench_tokenizer(vocab_size)
    tokenizer.save(path)
    return tokenizer


def make_checkpoint(path: Path, cfg: ModelConfig, tokenizer: Tokenizer, seed: int = 0) -> Path:
    """Random weights, with end-of-text never the greedy choice, so every side generates the full length."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        # Tied head: a zero embedding row gives end-of-text logit 0, below the maximum of 8191 random logits.
        model.wte.weight[tokenizer.eot_id].zero_()
    return save_checkpoint(path, model, tokenizer, meta={"step": 0, "tokens_seen": 0, "note": "random weights"})


# -- statistics ------------------------------------------------------------------------------------
def summary(values: list[float]) -> dict[str, Any]:
    """Median with min-max over repeats (and the raw values)."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`; NaN when empty."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def fmt(s: dict[str, Any] | None, digits: int = 0) -> str:
    """`median (min–max)` of a summary."""
    if not s:
        return "–"
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}–{s['max']:,.{digits}f})"


# -- threads ---------------------------------------------------------------------------------------
_worker: ThreadPoolExecutor | None = None


def in_worker(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on the one bench worker thread.

    Every in-process side (our engine's decode thread aside, which is a thread of its own) runs on a non-main
    thread, so no side gets a different kind of OpenMP team than another (see `thread_probe`).
    """
    global _worker
    if _worker is None:
        _worker = ThreadPoolExecutor(1, thread_name_prefix="bench-worker")
    return _worker.submit(fn, *args, **kwargs).result()


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a server subprocess that should use `threads` intra-op threads."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def thread_probe(repeats: int = 5, n: int = 2000) -> dict[str, Any]:
    """Time a tiny matrix-vector product on the main thread and on a worker thread (same settings).

    On some machines torch's OpenMP team of the main thread was reported several times slower for such tiny
    operations than a fresh thread's; the bench runs every side on a worker thread either way.
    """
    x, w = torch.randn(1, 384), torch.randn(384, 1152)

    def run() -> float:
        x @ w
        t0 = time.perf_counter()
        for _ in range(n):
            x @ w
        return (time.perf_counter() - t0) / n * 1e6

    main, worker = [], []
    for _ in range(repeats):
        main.append(run())
        worker.append(in_worker(run))
    return {"main_thread_us": summary(main), "worker_thread_us": summary(worker)}


# -- machine ---------------------------------------------------------------------------------------
def memory_bandwidth(mib: int = 256, repeats: int = 7, device: str = "cpu") -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written per second) of a `mib` MiB tensor copy."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        cuda_sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        cuda_sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def machine_info(threads: int, device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
        "python": platform.python_version(), "device": device, "load_average": os.getloadavg(),
    }
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    """`with timer() as t: ...` then t[0] is the elapsed seconds."""
    out: list[float] = []
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - t0)


def weight_bytes_per_step(model: GPT) -> int:
    """Bytes of weights one decode step reads: every parameter once, embedding tables by one row each.

    With tied embeddings the LM head reads the whole token table; the position table contributes one row.
    """
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name == "wpe.weight" or (name == "wte.weight" and not model.config.tie_embeddings):
            total += p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def cuda_sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def thread_name() -> str:
    return threading.current_thread().name


def write_result(path: str | Path, record: dict[str, Any]) -> None:
    """Write a bench's result file (JSON, parents created) and echo it, so a run's figures are on screen too."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=str) + "\n"
    out.write_text(text)
    print(text, end="")
