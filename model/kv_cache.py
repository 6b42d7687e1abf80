"""Slot KV cache: the memory that continuous batching runs on.

The cache holds `n_slots` independent sequences, each up to `max_len` tokens. A forward pass over the cache
is described by a `CacheBatch`: which slots take part and where each row's new tokens start. The same
mechanism serves prefill (one slot, a chunk of C tokens at any offset) and batched decode (many slots, one
token each, every row at its own position).

A decode step is dozens of small operations, so the batch takes the cheapest form its rows allow: rows that
all start at the same position share one (1, C) position row, write their keys with a plain slice copy and
need no attention mask at all (C = 1) or only a causal one; a contiguous run of slots is read as a view, not
gathered. Only rows at different positions pay for index writes and an explicit (B, 1, C, L) mask.
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right


class KVCache:
    """Preallocated keys and values, shaped (layers, slots, kv_heads, max_len, head_dim).

    With grouped-query attention only the key/value heads are stored: n_head / n_kv_head times less memory.
    """

    def __init__(
        self,
        n_layer: int,
        n_slots: int,
        max_len: int,
        n_head: int,  # the heads stored: the model's key/value heads (kv_heads)
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, n_slots, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_slots = n_slots
        self.max_len = max_len
        self.arange = torch.arange(max_len, device=device)  # positions 0..max_len-1, sliced by every batch
        self.layers = list(zip(self.k, self.v, strict=True))  # per-layer views, made once

    @classmethod
    def for_model(cls, model: torch.nn.Module, n_slots: int, max_len: int | None = None) -> KVCache:
        """A cache matching `model`'s shape, device and dtype."""
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.n_layer, n_slots, max_len or cfg.block_size, cfg.kv_heads, cfg.head_dim,
                   param.device, param.dtype)

    def copy_prefix(self, src: int, dst: list[int], length: int) -> None:
        """Copy positions [0, length) of slot `src` into each slot of `dst` (n choices of one prompt)."""
        for cache in (self.k, self.v):
            cache[:, dst, :, :length] = cache[:, src : src + 1, :, :length]

    def batch(self, slots: list[int], starts: list[int], n_new: int) -> CacheBatch:
        """Describe a forward pass writing `n_new` tokens per row into `slots`, starting at `starts`."""
        return CacheBatch(self, slots, starts, n_new)


class CacheBatch:
    """One forward pass's view of the cache: positions, the attention mask, and how to read/write keys.

    `mask` and `is_causal` are what scaled_dot_product_attention needs: None/False when every query may see
    every key up to `length` (single-token decode with all rows at one position), is_causal for a first chunk,
    otherwise a mask (a lower-right causal bias for a later chunk, a boolean (B, 1, C, L) tensor for rows at
    different positions).
    """

    def __init__(self, cache: KVCache, slots: list[int], starts: list[int], n_new: int) -> None:
        if len(slots) != len(starts):
            raise ValueError("slots and starts must have the same length")
        start, end = min(starts), max(starts) + n_new
        if end > cache.max_len:
            raise ValueError(f"sequence would reach {end} tokens, cache holds {cache.max_len}")
        device = cache.k.device
        self.cache = cache
        self.length = end  # keys beyond this are never attended to, so reads stop here
        n = len(slots)
        first = slots[0]
        contiguous = slots == list(range(first, first + n))
        # A contiguous run of slots is read (and written) through a view instead of a gather copy.
        self._rows: slice | torch.Tensor = slice(first, first + n) if contiguous else torch.tensor(slots, device=device)
        self.mask: torch.Tensor | object | None = None
        self.is_causal = False
        if start + n_new == end:  # every row starts at the same position
            self.positions = cache.arange[start:end].unsqueeze(0)  # (1, C), broadcast over the rows
            self._cols: slice | torch.Tensor = slice(start, end)
            if n_new > 1 and start == 0:
                self.is_causal = True
            elif n_new > 1:
                self.mask = causal_lower_right(n_new, end)  # query i sits at key start + i
        else:
            starts_t = torch.tensor(starts, device=device).unsqueeze(1)
            self.positions = starts_t + cache.arange[:n_new]  # (B, C)
            self._cols = self.positions
            if contiguous:
                self._rows = cache.arange[first : first + n]
            # (B, 1, C, L): row b's query i may see key j when j <= its absolute position.
            self.mask = (cache.arange[:end].view(1, 1, end) <= self.positions.unsqueeze(-1)).unsqueeze(1)
        self._read = slice(first, first + n) if contiguous else self._rows

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's keys/values (B, Hkv, C, D) and return all keys/values the rows can see."""
        ck, cv = self.cache.layers[layer]
        if k.dtype != ck.dtype:
            k, v = k.to(ck.dtype), v.to(cv.dtype)
        if isinstance(self._cols, slice):
            ck[self._rows, :, self._cols] = k
            cv[self._rows, :, self._cols] = v
        else:
            rows = self._rows.unsqueeze(1)  # (B, 1) broadcasts against positions (B, C)
            # Advanced indices split by a slice put their dims first: the target is (B, C, H, D).
            ck[rows, :, self._cols] = k.transpose(1, 2)
            cv[rows, :, self._cols] = v.transpose(1, 2)
        return ck[self._read, :, : self.length], cv[self._read, :, : self.length]


class StaticBatch:
    """A decode step over cache rows 0..B-1 with shapes fixed by (B, `length`): what a CUDA graph can replay.

    `positions` (B, 1) is a persistent device buffer the caller fills before each step; rows that are not
    decoding get position `max_len - 1`, a key no sequence attends to before writing it itself. Keys are read
    up to `length` (a bucket at or above every real row's position + 1) under a (B, 1, 1, length) mask built
    from `positions` on the device, so nothing here needs the host.
    """

    is_causal = False

    def __init__(self, cache: KVCache, positions: torch.Tensor, length: int) -> None:
        n = positions.size(0)
        self.cache = cache
        self.length = length
        self.positions = positions
        self._rows = cache.arange[:n].unsqueeze(1)  # (B, 1)
        self.mask = (cache.arange[:length].view(1, 1, length) <= positions.unsqueeze(-1)).unsqueeze(1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.cache.layers[layer]
        ck[self._rows, :, self.positions] = k.transpose(1, 2).to(ck.dtype)
        cv[self._rows, :, self.positions] = v.transpose(1, 2).to(cv.dtype)
        n = self.positions.size(0)
        return ck[:n, :, : self.length], cv[:n, :, : self.length]
