"""The Hugging Face model families `import-hf` accepts: config.json -> ModelConfig, per architecture.

Each family's `model_config` refuses what pocketgpt's GPT would not compute the same way (another activation,
biases it has no place for, a RoPE variant it does not implement), naming the field, so an import either
reproduces the model's logits or stops with a reason. Weight names are mapped in hf_convert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pocketgpt.model.config import ModelConfig, RopeScaling
from pocketgpt.training.errors import UserError

DEFAULT_MAX_CONTEXT = 8192  # the KV cache is sized by the context: 128k-token models would not fit in memory


@dataclass(frozen=True)
class Family:
    """How one architecture maps onto pocketgpt: its config conversion and its weight layout."""

    layout: str  # "gpt2" or "llama": the weight-name mapping hf_convert applies
    model_config: Callable[[dict[str, Any], str, int], ModelConfig]


def _rope(hf: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """rope_theta and Llama 3 scaling, from transformers 5's `rope_parameters` or 4's `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise UserError(f"{where}: RoPE scaling {kind!r} is not supported (only Llama 3's 'llama3' is)")
    try:
        return theta, RopeScaling(
            factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: incomplete llama3 rope scaling {scaling}: {e}") from None


def _sliding_window(hf: dict[str, Any], arch: str) -> int | None:
    """The attention window, when the model has one (Mistral v0.1, Qwen2 with use_sliding_window)."""
    if arch == "qwen2" and not hf.get("use_sliding_window", False) and "sliding_attention" not in (
            hf.get("layer_types") or []):
        return None
    window = hf.get("sliding_window")
    return int(window) if window else None


def llama_model_config(hf: dict[str, Any], where: str, max_context: int) -> ModelConfig:
    """Llama, Mistral and Qwen2 (model_type llama/mistral/qwen2): RMSNorm, SwiGLU, RoPE, optional GQA.

    The context is capped at `max_context` and at a sliding attention window: within its window, sliding
    attention is plain causal attention, so the capped model computes exactly what the original does.
    """
    arch = hf.get("model_type")
    n_embd, n_head = hf.get("hidden_size"), hf.get("num_attention_heads")
    problems = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(hf.get("attention_bias", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "head_dim": hf.get("head_dim") not in (None, (n_embd or 0) // (n_head or 1)),
        "pretraining_tp": hf.get("pretraining_tp", 1) != 1,
    }
    bad = {k: hf.get(k) for k, is_bad in problems.items() if is_bad}
    if bad:
        raise UserError(f"{where}: unsupported {arch} variant {bad}; pocketgpt computes a SiLU-gated MLP without "
                        "biases, no output-projection bias and head_dim = hidden_size / num_attention_heads")
    theta, scaling = _rope(hf, where)
    context = min(int(hf.get("max_position_embeddings", 2048)), max_context)
    window = _sliding_window(hf, arch)
    if window is not None:
        context = min(context, window)
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd, block_size=context, dropout=0.0,
            positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=arch == "qwen2",
            mlp_width=hf["intermediate_size"], tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_theta=theta, rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        )
    except KeyError as e:
        raise UserError(f"{where}: missing field {e}") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None


def gpt2_model_config(hf: dict[str, Any], where: str, max_context: int) -> ModelConfig:
    """GPT-2 (learned positions, LayerNorm, tanh GELU, biases); its context is already small."""
    from pocketgpt.training.hf_convert import gpt2_model_config as convert

    config = convert(hf, where)
    return config.with_overrides(block_size=min(config.block_size, max_context))


FAMILIES: dict[str, Family] = {
    "GPT2LMHeadModel": Family("gpt2", gpt2_model_config),
    "LlamaForCausalLM": Family("llama", llama_model_config),
    "MistralForCausalLM": Family("llama", llama_model_config),
    "Qwen2ForCausalLM": Family("llama", llama_model_config),
}


def family_for(hf: dict[str, Any], where: str) -> Family:
    """The family of a config.json by its `architectures`; refuses others, listing what is supported."""
    archs = hf.get("architectures") or []
    if not archs and hf.get("model_type") == "gpt2":
        archs = ["GPT2LMHeadModel"]  # old GPT-2 configs name no architecture
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    named = ", ".join(map(str, archs)) or f"none (model_type {hf.get('model_type')!r})"
    raise UserError(f"{where}: architecture {named} is not supported; pocketgpt imports {', '.join(FAMILIES)}")
