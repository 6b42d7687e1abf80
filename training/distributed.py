"""torchrun / DistributedDataParallel glue.

`torchrun --nproc_per_node=N -m pocketgpt.training train ...` sets RANK, LOCAL_RANK and WORLD_SIZE; without them
everything here is a no-op for one process. NCCL on GPUs, gloo on CPUs. Only rank 0 writes files: it prepares
the data while the others wait at a barrier, then they read what it wrote (a multi-node run needs the run
directory on a shared filesystem). See training.sampler for how the data is split across ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, ctx: DistContext) -> torch.device:
    """`auto` means this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and ctx.enabled:
        name = f"cuda:{ctx.local_rank}"
    return torch.device(name)


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment, if any (`device` picks the backend)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
        if cuda:
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return ctx


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    if not ctx.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on accumulation micro-steps; only the last one syncs."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def any_true(flags: list[bool], ctx: DistContext, device: torch.device) -> list[bool]:
    """Element-wise OR of `flags` over all ranks, so every rank takes the same stop decision."""
    if not ctx.enabled:
        return flags
    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def max_over_ranks(value: float, ctx: DistContext, device: torch.device) -> float:
    """The largest of a float over all ranks (rank 0's clock may be ahead: every rank then uses the same)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def mean_over_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks (the global batch's loss for logging)."""
    if not ctx.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world_size


def main_then_others(ctx: DistContext, device: torch.device, on_main: Callable[[], T], on_others: Callable[[], T]) -> T:
    """Run `on_main` on rank 0 (it writes), then `on_others` on the other ranks (they read what it wrote).

    A failure on rank 0 is shared, so the other ranks stop too instead of waiting at a barrier forever.
    """
    result, error = None, None
    if ctx.is_main:
        try:
            result = on_main()
        except Exception as e:
            error = e
    failed = any_true([error is not None], ctx, device)[0]  # doubles as the barrier
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank {ctx.rank}: rank 0 failed (see its message)")
    return result if ctx.is_main else on_others()
