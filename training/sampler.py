"""Training batches: random windows of block_size + 1 tokens from the train memmap.

Every process draws the same global batch of window starts from one generator seeded with the seed, and
rank r keeps rows r::world. So a run on N processes sees exactly the rows a single process would (only the
gradient reduction order differs), each rank reads only its own rows, and the sampler state to resume from is
the same on every rank, whatever the world size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class WindowSampler:
    """Draws (x, y) batches; y is x shifted by one token. `batch_size` (global) must divide by `world_size`."""

    def __init__(
        self, data: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the next global batch, as int64 (rows, block_size) tensors."""
        starts = torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=self.generator)
        return windows_at(self.data, starts[self.rank :: self.world_size].tolist(), self.block_size)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def windows_at(data: np.ndarray, starts: list[int], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of the windows of `block_size` + 1 tokens at `starts`."""
    windows = torch.from_numpy(np.stack([data[s : s + block_size + 1] for s in starts]).astype(np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def eval_windows(data: np.ndarray, block_size: int, count: int) -> list[int]:
    """`count` window starts spread evenly over `data`: the same windows at every evaluation."""
    last = len(data) - block_size - 1
    return np.linspace(0, last, num=count).round().astype(np.int64).tolist()
