"""Checkpoint directory -> running Engine, with the device and dtype chosen from settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pocketgpt.app.engine.engine import Engine
from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.model.quantize import apply_quantization

if TYPE_CHECKING:
    from pocketgpt.app.metrics import Metrics
    from pocketgpt.app.settings import Settings

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` means CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` means bf16 on CUDA (fast, and as stable as fp32 for inference), fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_threads(threads: int | None, device: torch.device) -> int:
    """Intra-op threads for the model: as given, else on a CPU one per core the process may use less one.

    The spare core is the event loop's: it streams every token, and when it preempts one of the model's
    threads mid-operation the whole step waits for that thread's next time slice. Measured on 2 cores
    (`python -m bench.int8`, docs/benchmarks/int8.json, `threads_vs_all_cores_fp32`): 1 thread decoded one
    stream faster than 2.
    """
    if threads is not None:
        return threads
    return max(1, available_cores() - 1) if device.type == "cpu" else torch.get_num_threads()


def load_engine(path: str | Path, settings: Settings, metrics: Metrics | None = None, **engine_kwargs: Any) -> Engine:
    """Load a checkpoint onto the configured device (quantized as configured) and start its decode thread.

    Raises model.checkpoint.CheckpointError (its message names the file and the problem) when the directory
    is missing or damaged. `engine_kwargs` override Engine arguments (tests pass `runner`, a test double).
    """
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    torch.set_num_threads(resolve_threads(settings.threads, device))  # the process's pool, before any work
    checkpoint = load_checkpoint(path, device=device, dtype=dtype)
    apply_quantization(checkpoint.model, settings.quantize)  # in place, before the runner prepares the model
    kwargs: dict[str, Any] = {
        "max_running": settings.max_running,
        "max_queue": settings.max_queue,
        "prefill_chunk": settings.prefill_chunk,
        "prefix_cache_slots": settings.prefix_cache_slots,
        "spec_tokens": settings.speculative_tokens,
        "compile_decode": settings.compile,
        "name": settings.model_name,
        "metrics": metrics,
        **engine_kwargs,
    }
    return Engine(checkpoint, **kwargs).start()
