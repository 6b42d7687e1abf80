"""LoRA adapters in PEFT's file format, for the Llama layout (Llama, Qwen2, Mistral checkpoints).

`--save-adapter` writes what `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)`
loads, BASE being the checkpoint the run started from exported with `pocketgpt export --format hf`:

    adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules (q_proj, ...)
    adapter_model.safetensors   base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight (r x in), ...lora_B
                                .weight (out x r), as PEFT saves them (no adapter name in the keys)

PEFT scales B A by lora_alpha / r, as `training/lora.py` does, so the adapted model computes what the merged
checkpoint holds. Our fused q/k/v matrix carries one (A, B) pair per row slice; each becomes the pair of its
own projection (q_proj, k_proj, v_proj). The GPT-2 layout has no per-projection modules in transformers (its
Conv1D c_attn is fused), so its adapters keep pocketgpt's own names (`h.N.attn.c_attn.lora_a.0`, ...).
"""

from __future__ import annotations

from typing import Any

import torch

from pocketgpt.model.config import ModelConfig

# Our target names -> (PEFT module name, the module's path within model.layers.N)
PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
OURS = {"o": "attn.c_proj", "gate": "mlp.c_gate", "up": "mlp.c_fc", "down": "mlp.c_proj"}


def peft_layout(cfg: ModelConfig) -> bool:
    """Whether transformers' Llama/Qwen2 classes compute this model, so PEFT's module names exist for it."""
    return (cfg.positions, cfg.norm, cfg.mlp, cfg.bias) == ("rope", "rmsnorm", "swiglu", False)


def peft_state(state: dict[str, torch.Tensor], cfg: ModelConfig, targets: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Our adapter tensors (`lora.adapter_state`) under PEFT's names.

    The fused c_attn holds one pair per adapted slice, numbered in row order (q before k before v), so the j-th
    pair belongs to the j-th of the adapted q/k/v targets in that order.
    """
    fused = [t for t in ("q", "k", "v") if t in targets]
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layer):
        pairs = [(t, f"h.{i}.attn.c_attn", j) for j, t in enumerate(fused)]
        pairs += [(t, f"h.{i}.{OURS[t]}", 0) for t in targets if t in OURS]
        for target, ours, j in pairs:
            prefix = f"base_model.model.model.layers.{i}.{PEFT_MODULES[target]}"
            out[f"{prefix}.lora_A.weight"] = state[f"{ours}.lora_a.{j}"]
            out[f"{prefix}.lora_B.weight"] = state[f"{ours}.lora_b.{j}"]
    return out


def peft_config(r: int, alpha: float, targets: tuple[str, ...], base: str | None) -> dict[str, Any]:
    """adapter_config.json as PEFT's LoraConfig writes it (the fields this adapter sets; PEFT fills the rest)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
            "target_modules": sorted(PEFT_MODULES[t].rsplit(".", 1)[1] for t in targets), "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "base_model_name_or_path": base}
