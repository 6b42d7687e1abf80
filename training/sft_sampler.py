"""Fine-tuning batches: examples padded to the longest in the batch, targets -1 wherever there is no loss.

Batches walk through the training examples in epochs, each a fresh permutation from a generator seeded with
the seed. As with training.sampler, every process draws the same global batch and keeps rows rank::world, and
the state to resume from (generator, permutation, position) is the same on every rank.
"""

from __future__ import annotations

from typing import Any

import torch

from pocketgpt.training.sft_data import SFTExample

IGNORE = -1  # the GPT's cross-entropy ignore_index


def collate(examples: list[SFTExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, longest - 1): y[t] = ids[t+1] where that token is a target, else -1.

    Padding goes on the right, so causal attention never lets a real token see a pad; pads have no target.
    """
    width = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        ids = torch.tensor(e.ids, dtype=torch.long)
        x[row, :n] = ids[:-1]
        y[row, :n] = torch.where(torch.tensor(e.mask[1:]), ids[1:], IGNORE)
    return x, y


class SFTSampler:
    """Draws padded (x, y) batches of examples; `batch_size` (global) must divide by `world_size`."""

    def __init__(self, examples: list[SFTExample], batch_size: int, seed: int, pad_id: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the next global batch (an epoch boundary may fall inside a batch)."""
        picked: list[int] = []
        while len(picked) < self.batch_size:
            if self.pos >= len(self.order):
                self.order, self.pos = torch.randperm(len(self.examples), generator=self.generator), 0
            take = min(self.batch_size - len(picked), len(self.order) - self.pos)
            picked += self.order[self.pos : self.pos + take].tolist()
            self.pos += take
        return collate([self.examples[i] for i in picked[self.rank :: self.world_size]], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.pos = state["order"], int(state["pos"])
