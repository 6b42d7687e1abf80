"""Decode steps replayed from CUDA graphs, captured per bucket of (rows, attended length).

A small model's decode step on a GPU is a few hundred tiny kernels: launching them from Python costs far more
than running them. A CUDA graph replays the whole step with one launch, but only for fixed shapes and fixed
buffers. So a step runs over cache rows 0..B-1 (B: the smallest row bucket covering the highest decoding
slot; the scheduler hands out the lowest free slot, so running requests stay packed), attends to keys up to
a length bucket, and reads its tokens and positions from persistent device buffers. Rows that do not decode
this step compute a throwaway token at position `max_len - 1`: a key nobody attends to before writing it.

Graphs are captured lazily, the first time a bucket is needed. `use_graphs=False` runs the same static step
eagerly (on any device): tests use it on CPU to check the bucketing and padding against `forward_cached`.
If capturing fails, the decoder logs why and runs eagerly from then on.

On a CPU there are no graphs to replay, but the same static step can be compiled (`compiled=True`, the
server's `--compile`): torch.compile's C++ backend fuses the norms, RoPE and residual arithmetic between the
matrix products and, with its C++ wrapper, calls the kernels without Python in between. Rows and length are
dynamic, so one compilation serves every length bucket; batch 1 gets its own (a size of 1 is specialised).
`warm_up()` pays for both before the first request. Compilation needs a C++ compiler; if it fails the decoder
logs why and runs eagerly.
"""

from __future__ import annotations

import bisect
import logging

import torch

from pocketgpt.model.fastpath import FlatForward
from pocketgpt.model.gpt import GPT
from pocketgpt.model.kv_cache import KVCache, StaticBatch

log = logging.getLogger("pocketgpt.engine")

ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
LENGTH_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


def buckets_for(limit: int, candidates: tuple[int, ...]) -> list[int]:
    """The candidates below `limit`, then `limit` itself: every request size maps to one of these."""
    return [b for b in candidates if b < limit] + [limit]


class GraphDecoder:
    """Batched decode over `cache` with static shapes; `step()` has the contract of `forward_cached` for C=1."""

    def __init__(self, model: GPT, cache: KVCache, use_graphs: bool = True, compiled: bool = False) -> None:
        if cache.max_len > model.config.block_size:
            raise ValueError("the cache must not be longer than the context (padding rows use position max_len - 1)")
        self.model, self.cache = model, cache
        self.device = cache.k.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.row_buckets = buckets_for(cache.n_slots, ROW_BUCKETS)
        self.length_buckets = buckets_for(cache.max_len, LENGTH_BUCKETS)
        self.tokens = torch.zeros(cache.n_slots, 1, dtype=torch.long, device=self.device)
        self.positions = torch.full((cache.n_slots, 1), cache.max_len - 1, dtype=torch.long, device=self.device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.captures = 0
        self._compiled = None
        if compiled and not self.use_graphs:
            # Its own flat forward with plain F.linear throughout: inductor picks the kernels for the products
            # (oneDNN's private op, which FlatForward sends multi-row products to, has no dynamic-shape lowering).
            self._flat = FlatForward(model, onednn=False)
            # Per-call inductor options, not its global config: a process may compile other things its own way.
            self._compiled = torch.compile(self._static, dynamic=True, fullgraph=True,
                                           options={"cpp_wrapper": True, "freezing": True})

    def shape_for(self, slots: list[int], positions: list[int]) -> tuple[int, int]:
        """(rows, attended length) buckets for a step decoding `slots` at `positions`."""
        rows = self.row_buckets[bisect.bisect_left(self.row_buckets, max(slots) + 1)]
        length = self.length_buckets[bisect.bisect_left(self.length_buckets, max(positions) + 1)]
        return rows, length

    @torch.inference_mode()
    def step(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (len(slots), V) of feeding `tokens[i]` to slot `slots[i]` at position `positions[i]`."""
        rows, length = self.shape_for(slots, positions)
        tok = [0] * rows
        pos = [self.cache.max_len - 1] * rows
        for s, t, p in zip(slots, tokens, positions, strict=True):
            tok[s], pos[s] = t, p
        host = torch.tensor([tok, pos], dtype=torch.long)
        if self.device.type == "cuda":
            host = host.pin_memory()
        both = host.to(self.device, non_blocking=True)
        self.tokens[:rows, 0].copy_(both[0])
        self.positions[:rows, 0].copy_(both[1])
        logits = self._run(rows, length)
        index = torch.tensor(slots, device=self.device)
        return logits.index_select(0, index)

    def warm_up(self) -> None:
        """Compile (or capture) the batch-1 and batch-2 steps now rather than in the first requests."""
        for rows in range(1, min(2, self.cache.n_slots) + 1):
            self.step(list(range(rows)), [0] * rows, [0] * rows)

    def _eager(self, rows: int, length: int) -> torch.Tensor:
        batch = StaticBatch(self.cache, self.positions[:rows], length)
        return self.model.forward_batch(self.tokens[:rows], batch)

    def _static(self, rows: int, length: int) -> torch.Tensor:
        """The step, outside forward_batch's inference mode (inference tensors cannot be traced)."""
        with torch.inference_mode(False), torch.no_grad():
            batch = StaticBatch(self.cache, self.positions[:rows], length)
            return self._flat.logits(self._flat.hidden(self.tokens[:rows], batch)[:, -1])

    def _run(self, rows: int, length: int) -> torch.Tensor:
        if self._compiled is not None:
            try:
                return self._compiled(rows, length)
            except Exception as exc:  # no C++ compiler, an op inductor cannot lower, ...: eager from now on
                log.warning("compiling the decode step failed, decoding eagerly: %s", exc)
                self._compiled = None
        if not self.use_graphs:
            return self._eager(rows, length)
        key = (rows, length)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(rows, length)
            except Exception as exc:  # an op that cannot be captured, out of memory, ...: run eagerly from now on
                log.warning("CUDA graph capture failed for %s, decoding without graphs: %s", key, exc)
                self.use_graphs = False
                self._graphs.clear()
                return self._eager(rows, length)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _capture(self, rows: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up on a side stream (allocator, cuBLAS workspaces); the buffers hold this step's real inputs, and
        # the step is idempotent (it writes the same keys at the same positions), so running it again is harmless.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._eager(rows, length)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._eager(rows, length)
        self.captures += 1
        return graph, out
