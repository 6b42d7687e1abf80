"""Hugging Face weights -> pocketgpt state dicts (GPT-2 and the Llama layout), and GPT-2's config and tokenizer.

GPT-2 is our GPT with the layout switches learned positions, LayerNorm, GELU (tanh), biases and tied embeddings;
the parameter names are the same (`h.N.attn.c_attn`, `h.N.mlp.c_fc`, ...) except for the `transformer.` prefix.
The one real difference: GPT-2's Conv1D stores weights as [in, out] where nn.Linear wants [out, in], so every
Conv1D weight is transposed.

The Llama layout (Llama, Mistral, Qwen2) renames every tensor and keeps q, k and v apart, where our attention
holds them in one matrix (q rows, then k, then v): they are concatenated. Its RoPE already rotates half-split
pairs, as ours does, so no rows are permuted.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from pocketgpt.model.config import ModelConfig
from pocketgpt.model.gpt import GPT
from pocketgpt.model.tokenizer import EOT, Tokenizer
from pocketgpt.training.errors import UserError

# HF names of GELU with the tanh approximation (what our MLP computes); exact erf GELU would differ slightly.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(masked_)?bias")  # causal-mask buffers older transformers saved
LLAMA_GLOBAL = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "ln_f.weight",
                "lm_head.weight": "lm_head.weight"}
LLAMA_LAYER = {  # within model.layers.N -> within h.N
    "input_layernorm.weight": "ln_1.weight", "post_attention_layernorm.weight": "ln_2.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight", "mlp.gate_proj.weight": "mlp.c_gate.weight",
    "mlp.up_proj.weight": "mlp.c_fc.weight", "mlp.down_proj.weight": "mlp.c_proj.weight",
}
LLAMA_QKV = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
LLAMA_OTHER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def gpt2_model_config(hf: dict[str, Any], where: str) -> ModelConfig:
    """The ModelConfig for a GPT-2 config.json; refuses variants our GPT does not compute the same way."""
    kind = hf.get("model_type")
    if kind != "gpt2":
        raise UserError(f"{where}: model_type is {kind!r}; only GPT-2-format models (model_type 'gpt2') import")
    n_embd = hf.get("n_embd", 768)
    problems = {
        "activation_function": hf.get("activation_function", "gelu_new") not in TANH_GELUS,
        "n_inner": hf.get("n_inner") not in (None, 4 * n_embd),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
        "add_cross_attention": bool(hf.get("add_cross_attention", False)),
    }
    bad = {k: hf.get(k) for k, is_bad in problems.items() if is_bad}
    if bad:
        raise UserError(f"{where}: unsupported GPT-2 variant {bad}; pocketgpt's GPT-2 layout needs a tanh GELU, "
                        "a 4x MLP, 1/sqrt(head_dim) attention scaling and no cross-attention")
    try:
        return ModelConfig(
            vocab_size=hf.get("vocab_size", 50257), n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12),
            n_embd=n_embd, block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), dropout=0.0,
            positions="learned", norm="layernorm", mlp="gelu", bias=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None


def read_weights(files: list[Path], is_pickle: bool) -> dict[str, torch.Tensor]:
    """All tensors of the weight files (shards merged). Pickle files load with weights_only=True only."""
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if is_pickle:
                part = torch.load(f, map_location="cpu", weights_only=True)
            else:
                part = load_file(str(f))
        except (SafetensorError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
            raise UserError(f"cannot read weights {f}: {e}") from None
        if not isinstance(part, dict):
            raise UserError(f"{f} does not hold a state dict of tensors")
        tensors.update(part)
    return tensors


def _checked(ours: dict[str, torch.Tensor], model: GPT, kind: str) -> dict[str, torch.Tensor]:
    """`ours` with every shape checked against `model`, nothing missing, cast to the model's dtype."""
    expected = model.state_dict()
    tied = model.config.tie_embeddings
    if tied:
        ours.pop("lm_head.weight", None)  # tied to wte (often stored as a copy, or not at all)
    for key, tensor in ours.items():
        if key not in expected:
            raise UserError(f"unexpected tensor {key!r}: not part of a {kind} LM")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(f"tensor {key!r} has shape {tuple(tensor.shape)}, the config implies "
                            f"{tuple(expected[key].shape)}")
    missing = sorted(set(expected) - set(ours) - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise UserError(f"the weights lack {len(missing)} tensor(s) of a {kind} LM, e.g. {missing[:5]}")
    dtype = next(model.parameters()).dtype
    ours = {k: v.to(dtype).contiguous() for k, v in ours.items()}
    if tied:
        ours["lm_head.weight"] = ours["wte.weight"]
    return ours


def gpt2_state_dict(hf: dict[str, torch.Tensor], model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict from GPT-2 tensors: prefix stripped, Conv1D weights transposed, every shape checked."""
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        key = name.removeprefix("transformer.")
        if not MASK_BUFFER.fullmatch(key):
            ours[key] = tensor.t() if key.endswith(CONV1D) else tensor
    return _checked(ours, model, "GPT-2")


def llama_state_dict(hf: dict[str, torch.Tensor], model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict from Llama-layout tensors: renamed, q/k/v (and Qwen2's q/k/v biases) fused."""
    ours: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in hf.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer derived from the config, saved by old transformers versions
        if (m := LLAMA_QKV.fullmatch(name)) is not None:
            qkv.setdefault(f"h.{m[1]}.attn.c_attn.{m[3]}", {})[m[2]] = tensor
        elif name in LLAMA_GLOBAL:
            ours[LLAMA_GLOBAL[name]] = tensor
        elif (m := LLAMA_OTHER.fullmatch(name)) is not None and m[2] in LLAMA_LAYER:
            ours[f"h.{m[1]}.{LLAMA_LAYER[m[2]]}"] = tensor
        else:
            raise UserError(f"unexpected tensor {name!r}: not part of a Llama-layout LM")
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"{key}: the weights hold only {sorted(parts)} of q, k and v")
        ours[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return _checked(ours, model, "Llama-layout")


def gpt2_tokenizer(tokenizer_json: Path | None, vocab_merges: tuple[Path, Path] | None) -> Tokenizer:
    """Our Tokenizer from tokenizer.json, or a byte-level BPE built from GPT-2's vocab.json + merges.txt."""
    if tokenizer_json is None and vocab_merges is None:
        raise UserError("no tokenizer: need tokenizer.json, or vocab.json and merges.txt")
    try:
        if tokenizer_json is not None:
            hf = HFTokenizer.from_file(str(tokenizer_json))
        else:
            vocab, merges = vocab_merges  # type: ignore[misc]  # not None: checked above
            hf = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            hf.decoder = decoders.ByteLevel()
    except Exception as e:  # the tokenizers library raises its own exception types
        raise UserError(f"cannot read the tokenizer: {e}") from None
    source = tokenizer_json or vocab_merges[0]  # type: ignore[index]
    if hf.token_to_id(EOT) is None:
        raise UserError(f"{source}: the tokenizer has no {EOT!r} token (pocketgpt needs it to end texts)")
    # vocab.json lists EOT as an ordinary entry; mark it special (same id) so it decodes to nothing and a
    # literal "<|endoftext|>" in text encodes to it, as with GPT-2's own tokenizer.
    hf.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    try:
        return Tokenizer(hf)
    except ValueError as e:
        raise UserError(f"{source}: not a byte-level BPE tokenizer: {e}") from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data
