"""Prefix caching: requests that share a prompt prefix reuse its keys and values instead of recomputing them.

Choice: block-granular, like vLLM's automatic prefix caching, but keyed exactly and held as a tree, like
SGLang's radix tree with fixed-size edges. A prompt is cut into blocks of `block` tokens from its start; a
cached block is found by (its parent block, its own tokens), so a match is exact (no hash can collide) and
a block's keys are only reused after the very same tokens at the very same positions. Fixed-size blocks fit
this engine's slot cache: a hit copies whole blocks from a preallocated pool into the request's slot (a
memory copy, far cheaper than the forward it saves) and prefill resumes at the first missing block; a radix
tree's token-granular matches would save at most a block's worth more.

Memory is bounded: the pool is allocated up front with the slots (its size is set in slots' worth of
tokens, so the KV memory is (slots + prefix slots) x context x bytes per token), and when it is full the
least recently used block with no cached continuation is evicted (a tree only ever loses leaves, so every
cached block stays reachable). The index lives in the scheduler and holds no tensors; the pool belongs to
the runner. Both belong to one engine, so one model: a hot swap starts with an empty cache.

At least one prompt token is always computed (its logits give the first output token): a match stops at
the last block boundary before the prompt's last token. A prompt's blocks are stored once it is prefilled,
and the blocks of prompt and output together when a request finishes (a chat's next turn starts with both).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from pocketgpt.model.kv_cache import KVCache


@dataclass(eq=False)
class Block:
    """One cached block: `tokens` at positions [depth * size, (depth + 1) * size) after `parent`'s."""

    id: int  # row of the pool
    tokens: tuple[int, ...]
    parent: Block | None
    children: dict[tuple[int, ...], Block] = field(default_factory=dict)


class PrefixIndex:
    """Which prompt prefixes are cached, in which pool blocks; least-recently-used eviction of leaves."""

    def __init__(self, n_blocks: int, block: int) -> None:
        self.n_blocks, self.block = n_blocks, block
        self._root: dict[tuple[int, ...], Block] = {}
        self._free = list(range(n_blocks - 1, -1, -1))
        self._lru: OrderedDict[Block, None] = OrderedDict()  # every cached block, oldest use first

    @property
    def used(self) -> int:
        return len(self._lru)

    def match(self, prompt: list[int]) -> list[int]:
        """Pool blocks holding the longest cached prefix of `prompt`, leaving at least its last token out."""
        blocks, children = [], self._root
        for start in range(0, len(prompt) - 1 - self.block + 1, self.block):
            node = children.get(tuple(prompt[start : start + self.block]))
            if node is None:
                break
            blocks.append(node)
            children = node.children
        self._touch(blocks)
        return [b.id for b in blocks]

    def insert(self, tokens: list[int]) -> list[tuple[int, int]]:
        """Make room for the full blocks of `tokens` not cached yet; return their (pool block, start position)
        for the caller to fill. Stops early when nothing can be evicted."""
        path: list[Block] = []
        new: list[tuple[int, int]] = []
        children, parent = self._root, None
        for start in range(0, len(tokens) - self.block + 1, self.block):
            key = tuple(tokens[start : start + self.block])
            node = children.get(key)
            if node is None:
                block_id = self._allocate(keep=set(path))
                if block_id is None:
                    break
                node = Block(block_id, key, parent)
                children[key] = node
                new.append((block_id, start))
            path.append(node)
            children, parent = node.children, node
        self._touch(path)
        return new

    def _touch(self, path: list[Block]) -> None:
        # Deepest last: a parent is never older than its child, so leaves go first.
        for node in reversed(path):
            self._lru[node] = None
            self._lru.move_to_end(node)

    def _allocate(self, keep: set[Block]) -> int | None:
        if self._free:
            return self._free.pop()
        victim = next((b for b in self._lru if not b.children and b not in keep), None)
        if victim is None:
            return None
        del self._lru[victim]
        siblings = victim.parent.children if victim.parent is not None else self._root
        del siblings[victim.tokens]
        return victim.id


class BlockPool:
    """The cached blocks' keys and values, shaped like the slot cache with blocks for slots."""

    def __init__(self, cache: KVCache, n_blocks: int, block: int) -> None:
        layers, _, heads, _, dim = cache.k.shape  # the cache's own layout, whatever its head count
        shape = (layers, n_blocks, heads, block, dim)
        self.cache, self.block = cache, block
        self.k = torch.zeros(shape, dtype=cache.k.dtype, device=cache.k.device)
        self.v = torch.zeros(shape, dtype=cache.v.dtype, device=cache.v.device)

    def load(self, slot: int, blocks: list[int]) -> None:
        """Copy `blocks` (in order) into `slot` from position 0."""
        n = len(blocks) * self.block
        index = torch.tensor(blocks, device=self.k.device)
        for pool, cache in ((self.k, self.cache.k), (self.v, self.cache.v)):
            picked = pool.index_select(1, index)  # (L, n_blocks, H, block, D)
            cache[:, slot, :, :n] = picked.transpose(1, 2).flatten(2, 3)

    def save(self, slot: int, blocks: list[tuple[int, int]]) -> None:
        """Copy positions [start, start + block) of `slot` into each pool block."""
        for block_id, start in blocks:
            self.k[:, block_id] = self.cache.k[:, slot, :, start : start + self.block]
            self.v[:, block_id] = self.cache.v[:, slot, :, start : start + self.block]
