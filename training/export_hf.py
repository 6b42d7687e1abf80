"""A checkpoint -> a Hugging Face model folder that `AutoModelForCausalLM.from_pretrained` loads (and vLLM, TGI
and llama.cpp's converter read): the inverse of import-hf.

    config.json               GPT2LMHeadModel (GPT-2 layout), LlamaForCausalLM (modern layout) or
                              Qwen2ForCausalLM (modern layout with q/k/v-only biases)
    model.safetensors         the weights under the transformers names
    tokenizer.json            as is
    tokenizer_config.json     bos/eos tokens and the chat template (ours rewritten as Jinja)
    generation_config.json    bos id and every end id
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pocketgpt.model.checkpoint import Checkpoint
from pocketgpt.model.config import ModelConfig
from pocketgpt.training.errors import UserError
from pocketgpt.training.hf_convert import CONV1D, LLAMA_GLOBAL, LLAMA_LAYER


def hf_layout(c: ModelConfig) -> str:
    """"gpt2" or "llama" (the two layouts transformers has a class for); UserError names a mixed layout."""
    gpt2 = (c.positions, c.norm, c.mlp, c.bias) == ("learned", "layernorm", "gelu", True)
    if gpt2 and c.kv_heads == c.n_head and c.mlp_hidden == 4 * c.n_embd and not c.qkv_bias:
        return "gpt2"
    if (c.positions, c.norm, c.mlp, c.bias) == ("rope", "rmsnorm", "swiglu", False):
        return "llama"
    raise UserError(f"this checkpoint mixes layouts (positions={c.positions}, norm={c.norm}, mlp={c.mlp}, "
                    f"bias={c.bias}, mlp width {c.mlp_hidden}) that no transformers architecture computes: only the "
                    "GPT-2 layout and the modern (Llama) layout export")


def _ids(tokens: tuple[int, ...]) -> int | list[int]:
    return tokens[0] if len(tokens) == 1 else list(tokens)


def hf_config(ckpt: Checkpoint) -> dict[str, Any]:
    """config.json for the checkpoint's layout."""
    c, tok = ckpt.config, ckpt.tokenizer
    dtype = str(next(ckpt.model.parameters()).dtype).removeprefix("torch.")
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "torch_dtype": dtype,
              "bos_token_id": tok.bos_id,
              "eos_token_id": _ids(tok.stop_ids)}
    if hf_layout(c) == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": c.n_layer, "n_head": c.n_head,
                "n_embd": c.n_embd, "n_positions": c.block_size, "n_inner": None, "activation_function": "gelu_new",
                "layer_norm_epsilon": c.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                **common}
    arch, kind = ("Qwen2ForCausalLM", "qwen2") if c.qkv_bias else ("LlamaForCausalLM", "llama")
    rope_scaling = None
    if c.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **vars(c.rope_scaling)}
    config = {"architectures": [arch], "model_type": kind, "hidden_size": c.n_embd, "intermediate_size": c.mlp_hidden,
              "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads,
              "head_dim": c.head_dim, "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps,
              "rope_theta": c.rope_theta, "rope_scaling": rope_scaling, "hidden_act": "silu", **common}
    if kind == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    return config


def hf_state_dict(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The weights under transformers' names (q/k/v split for the Llama layout, Conv1D transposed for GPT-2)."""
    c = ckpt.config
    state = {k: v.detach().cpu() for k, v in ckpt.model.state_dict().items()}
    if c.tie_embeddings:
        state.pop("lm_head.weight")
    out: dict[str, torch.Tensor] = {}
    if hf_layout(c) == "gpt2":
        for key, t in state.items():
            name = key if key == "lm_head.weight" else f"transformer.{key}"
            out[name] = t.t() if key.endswith(CONV1D) else t
    else:
        to_hf = {ours: theirs for theirs, ours in LLAMA_GLOBAL.items()}
        layer = {ours: theirs for theirs, ours in LLAMA_LAYER.items()}
        q, kv = c.n_embd, c.kv_heads * c.head_dim
        for key, t in state.items():
            if key in to_hf:
                out[to_hf[key]] = t
                continue
            _, i, rest = key.split(".", 2)
            if rest.startswith("attn.c_attn."):
                kind = rest.rsplit(".", 1)[1]
                for proj, part in zip("qkv", t.split((q, kv, kv)), strict=True):
                    out[f"model.layers.{i}.self_attn.{proj}_proj.{kind}"] = part
            else:
                out[f"model.layers.{i}.{layer[rest]}"] = t
    return {k: v.contiguous() for k, v in out.items()}


def tokenizer_files(ckpt: Checkpoint) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json and generation_config.json contents."""
    tok = ckpt.tokenizer
    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": ckpt.config.block_size,
        "bos_token": tok.settings.bos_token, "eos_token": tok.settings.eos_token,
        "add_bos_token": tok.settings.add_bos, "clean_up_tokenization_spaces": False,
    }
    if ckpt.chat_template is not None:
        tok_cfg["chat_template"] = ckpt.chat_template.to_jinja()
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": _ids(tok.stop_ids)}
    return {"tokenizer_config.json": tok_cfg, "generation_config.json": gen}


def export_hf(ckpt: Checkpoint, out: Path) -> Path:
    """Write the Hugging Face folder `out` (created; must not exist or be empty)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(ckpt), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(ckpt), indent=2) + "\n")
    ckpt.tokenizer.save(out / "tokenizer.json")
    for name, data in tokenizer_files(ckpt).items():  # replaces our own tokenizer_config.json, if save wrote one
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return out
