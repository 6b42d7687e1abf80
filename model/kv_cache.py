"""Slot KV cache: the memory that continuous batching runs on.

The cache holds `n_slots` independent sequences, each up to `max_len` tokens. A forward pass over the cache
is described by a `CacheBatch`: which slots take part and where each row's new tokens start. The same
mechanism serves prefill (one slot, a chunk of C tokens at any offset) and batched decode (many slots, one
token each, every row at its own position).
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values, shaped (layers, slots, heads, max_len, head_dim)."""

    def __init__(
        self,
        n_layer: int,
        n_slots: int,
        max_len: int,
        n_head: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, n_slots, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_slots = n_slots
        self.max_len = max_len

    @classmethod
    def for_model(cls, model: torch.nn.Module, n_slots: int, max_len: int | None = None) -> KVCache:
        """A cache matching `model`'s shape, device and dtype."""
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.n_layer, n_slots, max_len or cfg.block_size, cfg.n_head, cfg.head_dim,
                   param.device, param.dtype)

    def batch(self, slots: list[int], starts: list[int], n_new: int) -> CacheBatch:
        """Describe a forward pass writing `n_new` tokens per row into `slots`, starting at `starts`."""
        return CacheBatch(self, slots, starts, n_new)


class CacheBatch:
    """One forward pass's view of the cache: positions, the attention mask, and how to read/write keys."""

    def __init__(self, cache: KVCache, slots: list[int], starts: list[int], n_new: int) -> None:
        if len(slots) != len(starts):
            raise ValueError("slots and starts must have the same length")
        end = max(starts) + n_new
        if end > cache.max_len:
            raise ValueError(f"sequence would reach {end} tokens, cache holds {cache.max_len}")
        device = cache.k.device
        self.cache = cache
        self.length = end  # keys beyond this are never attended to, so reads stop here
        starts_t = torch.tensor(starts, device=device).unsqueeze(1)
        self.positions = starts_t + torch.arange(n_new, device=device)  # (B, C)
        self.slots = torch.tensor(slots, device=device)
        # A contiguous run of slots can be read as a view instead of a gather copy.
        first = slots[0]
        self._slice = slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else None
        keys = torch.arange(end, device=device)
        # (B, 1, C, L): row b's query i may see key j when j <= its absolute position.
        self.mask = (keys.view(1, 1, end) <= self.positions.unsqueeze(-1)).unsqueeze(1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's keys/values (B, H, C, D) and return all keys/values the rows can see."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        rows = self.slots.unsqueeze(1)  # (B, 1) broadcasts against positions (B, C)
        # Advanced indices split by a slice put their dims first: the target is (B, C, H, D).
        ck[rows, :, self.positions] = k.transpose(1, 2).to(ck.dtype)
        cv[rows, :, self.positions] = v.transpose(1, 2).to(cv.dtype)
        if self._slice is not None:
            return ck[self._slice, :, : self.length], cv[self._slice, :, : self.length]
        return ck[self.slots, :, : self.length], cv[self.slots, :, : self.length]
