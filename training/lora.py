"""LoRA: fine-tune low-rank adapters on a frozen model (`--lora-r R --lora-alpha A --lora-targets q,k,v,o`).

Each targeted projection W gets W x + (alpha / r) B A x, with A (r x in) random and B (out x r) zero, so
training starts from the model as it is; only A and B train (the optimizer holds state for nothing else).
Checkpoints store the merged weights W + (alpha / r) B A, a normal checkpoint that serves as is; with
`--save-adapter` A and B are also written beside the weights (adapter_model.safetensors, adapter_config.json),
in PEFT's format for the Llama layout (lora_peft.py).

A small module rather than the `peft` library for training: our attention computes q, k and v with one fused
matrix (c_attn), which peft can only adapt as a whole, so targets q, k and v could not be chosen separately;
here each target is a slice of the fused matrix's rows with its own A and B, which is exactly PEFT's q_proj,
k_proj and v_proj adapters once written out. It also keeps `accelerate` and peft's transformers dependency out
of the trainer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pocketgpt.model.gpt import GPT
from pocketgpt.training.lora_peft import peft_config, peft_layout, peft_state

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @classmethod
    def parse(cls, r: int, alpha: float | None, targets: str) -> LoraSpec:
        """From the flags; ValueError names an unknown target."""
        names = tuple(t.strip() for t in targets.split(",") if t.strip())
        unknown = sorted(set(names) - set(TARGETS))
        if unknown or not names:
            raise ValueError(f"unknown LoRA target(s) {unknown or [targets]}: choose from {', '.join(TARGETS)}")
        return cls(r=r, alpha=float(alpha if alpha is not None else 2 * r), targets=names)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus one low-rank update per row slice (the fused q/k/v matrix has three)."""

    def __init__(self, base: nn.Linear, slices: list[tuple[int, int]], r: int, scale: float) -> None:
        super().__init__()
        self.base, self.slices, self.scale = base, slices, scale
        w = base.weight
        self.lora_a = nn.ParameterList(nn.Parameter(torch.empty(r, w.size(1), device=w.device, dtype=w.dtype))
                                       for _ in slices)
        self.lora_b = nn.ParameterList(nn.Parameter(torch.zeros(hi - lo, r, device=w.device, dtype=w.dtype))
                                       for lo, hi in slices)
        for a in self.lora_a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's own init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        out = y.size(-1)
        for (lo, hi), a, b in zip(self.slices, self.lora_a, self.lora_b, strict=True):
            delta = F.linear(F.linear(x, a), b) * self.scale
            y = y + (delta if (lo, hi) == (0, out) else F.pad(delta, (lo, out - hi)))
        return y

    def delta_weight(self) -> torch.Tensor:
        """scale * B A placed in each slice's rows: what merging adds to the base weight."""
        delta = torch.zeros_like(self.base.weight)
        for (lo, hi), a, b in zip(self.slices, self.lora_a, self.lora_b, strict=True):
            delta[lo:hi] += (b @ a) * self.scale
        return delta


def _plan(model: GPT, targets: tuple[str, ...]) -> dict[str, list[tuple[int, int]]]:
    """Module path -> row slices to adapt, for every layer."""
    c = model.config
    q, kv = c.n_embd, c.kv_heads * c.head_dim
    rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    where = {"o": "attn.c_proj", "gate": "mlp.c_gate", "up": "mlp.c_fc", "down": "mlp.c_proj"}
    if "gate" in targets and c.mlp != "swiglu":
        raise ValueError("LoRA target 'gate' needs a SwiGLU MLP; this model's MLP has no gate")
    plan: dict[str, list[tuple[int, int]]] = {}
    for i in range(c.n_layer):
        for t in targets:
            if t in rows:
                plan.setdefault(f"h.{i}.attn.c_attn", []).append(rows[t])
            else:
                path = f"h.{i}.{where[t]}"
                plan[path] = [(0, model.get_submodule(path).out_features)]
    return plan


def attach(model: GPT, spec: LoraSpec) -> list[str]:
    """Freeze `model` and wrap the targeted projections in LoRALinear (in place); returns the wrapped paths."""
    for p in model.parameters():
        p.requires_grad_(False)
    plan = _plan(model, spec.targets)
    for path, slices in plan.items():
        parent, name = path.rsplit(".", 1)
        owner = model.get_submodule(parent)
        setattr(owner, name, LoRALinear(getattr(owner, name), sorted(slices), spec.r, spec.scale))
    return list(plan)


def _wrapped(model: GPT) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merged(model: GPT) -> GPT:
    """A plain GPT (no adapters) with every update merged into its weights: a normal, servable model."""
    plain = GPT(model.config).to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    deltas = {f"{name}.weight": m.delta_weight() for name, m in _wrapped(model).items()}
    state = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base.", ".")
        state[key] = value + deltas[key] if key in deltas else value
    plain.load_state_dict(state)
    plain.train(model.training)
    return plain


def adapter_state(model: GPT) -> dict[str, torch.Tensor]:
    """The adapters' tensors by parameter name (what --save-adapter writes and resume restores)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


@torch.no_grad()
def restore(model: GPT, state: dict[str, torch.Tensor]) -> None:
    """Load saved adapters into an attached model whose weights are the merged ones, and take the merged update
    back out of the base weights, so base + update is again the saved model."""
    model.load_state_dict(state, strict=False)
    for m in _wrapped(model).values():
        m.base.weight -= m.delta_weight()


def adapter_files(model: GPT, spec: LoraSpec, base: str | None) -> dict[str, bytes]:
    """adapter_model.safetensors and adapter_config.json, as bytes for the checkpoint writer: PEFT's format for
    the Llama layout (see lora_peft.py), pocketgpt's own names for the GPT-2 layout."""
    from safetensors.torch import save

    state = adapter_state(model)
    if peft_layout(model.config):
        tensors, config = peft_state(state, model.config, spec.targets), peft_config(spec.r, spec.alpha,
                                                                                    spec.targets, base)
    else:
        tensors = state
        config = {"format": "pocketgpt-lora/1", "r": spec.r, "alpha": spec.alpha, "targets": list(spec.targets),
                  "base_checkpoint": base, "modules": list(_wrapped(model))}
    return {ADAPTER_WEIGHTS: save(tensors), ADAPTER_CONFIG: (json.dumps(config, indent=2) + "\n").encode()}
