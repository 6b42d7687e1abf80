"""A modern-layout checkpoint -> one GGUF file for llama.cpp and Ollama (the `gguf` package: pip install gguf).

Architecture "llama" (or "qwen2" for q/k/v biases), its hyperparameters, the tokenizer (byte-level BPE as
"gpt2" with merges; SentencePiece-style as "llama" with scores and byte tokens), the role token ids and the chat
template, then the tensors under llama.cpp's names in f32, f16 or q8_0 (norms and biases stay f32, as
llama.cpp's own converter keeps them).

Two layout details: llama.cpp's "llama" RoPE rotates adjacent pairs where ours (and transformers') rotates
the two halves of a head, so q and k rows are permuted into its order ("qwen2" uses halves: no permutation);
Llama 3's RoPE scaling becomes the `rope_freqs.weight` tensor of per-frequency divisors.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from pocketgpt.model.checkpoint import Checkpoint
from pocketgpt.model.gpt import rope_frequencies
from pocketgpt.model.tokenizer import BYTE_TOKEN
from pocketgpt.training.errors import UserError
from pocketgpt.training.export_hf import hf_layout

OUTTYPES = ("f32", "f16", "q8_0")
TENSOR_NAMES = {  # ours (within h.N) -> llama.cpp's (within blk.N)
    "ln_1.weight": "attn_norm.weight", "attn.c_proj.weight": "attn_output.weight", "ln_2.weight": "ffn_norm.weight",
    "mlp.c_gate.weight": "ffn_gate.weight", "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {"wte.weight": "token_embd.weight", "ln_f.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def interleave_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q or k (weight or bias) from half-split rotation pairs to adjacent pairs, per head."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(ckpt: Checkpoint, arch: str) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names -> float32 tensors."""
    c = ckpt.config
    state = {k: v.detach().float().cpu() for k, v in ckpt.model.state_dict().items()}
    if c.tie_embeddings:
        state.pop("lm_head.weight")
    out: dict[str, torch.Tensor] = {}
    q, kv = c.n_embd, c.kv_heads * c.head_dim
    for key, t in state.items():
        if key in GLOBAL_NAMES:
            out[GLOBAL_NAMES[key]] = t
            continue
        _, i, rest = key.split(".", 2)
        if rest.startswith("attn.c_attn."):
            kind = rest.rsplit(".", 1)[1]
            wq, wk, wv = t.split((q, kv, kv))
            if arch == "llama":
                wq, wk = interleave_rope_rows(wq, c.n_head), interleave_rope_rows(wk, c.kv_heads)
            for name, part in (("attn_q", wq), ("attn_k", wk), ("attn_v", wv)):
                out[f"blk.{i}.{name}.{kind}"] = part
        else:
            out[f"blk.{i}.{TENSOR_NAMES[rest]}"] = t
    if c.rope_scaling is not None:
        plain = rope_frequencies(dataclasses.replace(c, rope_scaling=None))
        out["rope_freqs.weight"] = plain / rope_frequencies(c)
    return out


def _add_tokenizer(writer, ckpt: Checkpoint) -> None:
    tok = ckpt.tokenizer
    spec = json.loads(tok.to_str())
    hf = tok._hf  # the library tokenizer: GGUF needs the raw token strings and merges
    n = tok.vocab_size
    tokens = [hf.id_to_token(i) for i in range(n)]
    added = hf.get_added_tokens_decoder()
    types = [3 if i in added and added[i].special else 4 if i in added else 1 for i in range(n)]
    if tok.kind == "metaspace":
        writer.add_tokenizer_model("llama")
        types = [6 if BYTE_TOKEN.fullmatch(t) and types[i] == 1 else types[i] for i, t in enumerate(tokens)]
        writer.add_token_scores([-float(i) for i in range(n)])  # earlier ids are earlier (preferred) merges
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
    merges = spec.get("model", {}).get("merges") or []
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_eos_token_id(tok.eot_id)
    writer.add_bos_token_id(tok.bos_id if tok.bos_id is not None else tok.eot_id)
    writer.add_add_bos_token(tok.settings.add_bos)
    if len(tok.stop_ids) > 1:
        writer.add_eot_token_id(tok.stop_ids[1])
    if ckpt.chat_template is not None:
        writer.add_chat_template(ckpt.chat_template.to_jinja())


def export_gguf(ckpt: Checkpoint, out: Path, outtype: str = "f16") -> Path:
    """Write `out` (a .gguf file); UserError for a layout llama.cpp's llama/qwen2 graphs do not compute."""
    import gguf

    c = ckpt.config
    if hf_layout(c) != "llama":
        raise UserError("GGUF export takes the modern (Llama) layout; for a GPT-2-layout checkpoint export "
                        "--format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {list(OUTTYPES)}")
    arch = "qwen2" if c.qkv_bias else "llama"
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(ckpt.path.name)
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.mlp_hidden)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_file_type(file_type)
    _add_tokenizer(writer, ckpt)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, t in gguf_tensors(ckpt, arch).items():
        data = t.numpy().astype(np.float32)
        if data.ndim == 1 or outtype == "f32":  # norms, biases, rope factors: f32 as llama.cpp keeps them
            writer.add_tensor(name, data)
        elif outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q8][0] == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:  # f16 (and q8_0's fallback for rows that are not whole 32-value blocks)
            writer.add_tensor(name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
