"""Optimizers: AdamW with weight decay on 2-D weight matrices only, or Muon for the blocks' matrices.

Muon (torch.optim.Muon) orthogonalises the momentum of each hidden weight matrix; the embeddings, the LM head
and the 1-D gains stay on AdamW, as Muon's authors prescribe. With Moonshot's learning-rate adjustment
("match_rms_adamw") its updates have AdamW's RMS, so one schedule and one peak learning rate drive both.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

OptimizerName = Literal["adamw", "muon"]


def _adamw(params: list[nn.Parameter], lr: float, weight_decay: float, device_type: str) -> torch.optim.AdamW:
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = True if device_type == "cuda" else None
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


class MuonAdamW:
    """Muon over the hidden matrices and AdamW over the rest, stepped as one optimizer.

    `param_groups` lists both optimizers' groups (the schedule sets `lr` on each); the state dict holds both.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("the checkpoint's optimizer state is not Muon's (resume with the run's --optimizer)")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device_type: str,
                   kind: OptimizerName = "adamw") -> torch.optim.AdamW | MuonAdamW:
    """The optimizer over `model`'s trainable parameters; 1-D parameters (norms, biases) are never decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        return _adamw(params, lr, weight_decay, device_type)
    blocks = getattr(model, "h", None)
    hidden = {id(p) for p in blocks.parameters() if p.requires_grad and p.dim() == 2} if blocks is not None else set()
    if not hidden:
        raise ValueError("--optimizer muon needs a model with transformer blocks (model.h) to train")
    muon = torch.optim.Muon([p for p in params if id(p) in hidden], lr=lr, weight_decay=weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, _adamw([p for p in params if id(p) not in hidden], lr, weight_decay, device_type))
