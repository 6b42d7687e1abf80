"""`pocketgpt export`: to a Hugging Face folder that transformers loads with equal logits (GPT-2, Llama, Qwen2
layouts, tokenizer and chat template included), and to GGUF read back with the `gguf` package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketgpt.model.chat import ChatTemplate
from pocketgpt.model.checkpoint import load_checkpoint, save_checkpoint
from pocketgpt.model.vocab import add_token_rows
from pocketgpt.training.errors import UserError
from pocketgpt.training.export import export
from pocketgpt.training.export_gguf import interleave_rope_rows
from pocketgpt.training.import_hf import import_hf
from tests.conftest import make_tiny_checkpoint
from tests.hf_models import save_llama_family

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def _logits_match(ckpt_path: Path, hf_dir: Path) -> None:
    ckpt = load_checkpoint(ckpt_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    x = torch.randint(0, ckpt.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ckpt.model(x)[0], theirs(x).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("layout", ["modern-gqa", "gpt2"])
def test_pocketgpt_checkpoints_export_to_transformers(tmp_path: Path, layout: str) -> None:
    if layout == "gpt2":
        overrides = dict(positions="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False)
    else:
        overrides = dict(n_head=4, n_kv_head=2, mlp_width=80, rope_theta=50000.0)
    plain = load_checkpoint(make_tiny_checkpoint(tmp_path / "plain", **overrides))
    template = ChatTemplate()  # a chat model: the template travels as Jinja
    tok = plain.tokenizer.with_special_tokens(template.special_tokens)
    model = add_token_rows(plain.model, plain.tokenizer.vocab_size, tok.vocab_size)
    path = save_checkpoint(tmp_path / "ck", model, tok, {"step": 0}, chat_template=template)
    out = export(path, "hf", tmp_path / "hf")
    _logits_match(path, out)
    arch = transformers.AutoConfig.from_pretrained(str(out)).architectures
    assert arch == (["GPT2LMHeadModel"] if layout == "gpt2" else ["LlamaForCausalLM"])
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "def add(a, b): 床前 🚀"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    want = template.render(tok, msgs, add_generation_prompt=True).ids
    assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False) == want


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_imported_models_round_trip_through_export(tmp_path: Path, arch: str) -> None:
    rope = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16}} if arch == "llama" else {}
    src, _ = save_llama_family(tmp_path / "src", arch, **rope)
    path = import_hf(src, tmp_path / "ck")
    out = export(path, "hf", tmp_path / "hf")
    _logits_match(path, out)
    again = load_checkpoint(import_hf(out, tmp_path / "again"))  # and back: the same model and roles
    first = load_checkpoint(path)
    assert again.config == first.config
    assert again.tokenizer.stop_ids == first.tokenizer.stop_ids and again.tokenizer.bos_id == first.tokenizer.bos_id
    assert again.chat_template == first.chat_template


def test_mixed_layouts_and_existing_out_are_refused(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "ck", mlp="gelu")  # RoPE + RMSNorm + GELU: no transformers class
    with pytest.raises(UserError, match="mixes layouts"):
        export(path, "hf", tmp_path / "hf")
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        export(path, "hf", tmp_path / "taken")


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    src, _ = save_llama_family(root / "src", "llama")
    return import_hf(src, root / "ck")


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_gguf_reads_back_with_the_gguf_package(llama_checkpoint: Path, tmp_path: Path, outtype: str) -> None:
    gguf = pytest.importorskip("gguf")
    ckpt = load_checkpoint(llama_checkpoint)
    c, tok = ckpt.config, ckpt.tokenizer
    out = export(llama_checkpoint, "gguf", tmp_path / "m.gguf", outtype=outtype)
    reader = gguf.GGUFReader(str(out))

    def field(name: str):
        f = reader.fields[name]
        return f.contents()

    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length")) == (
        c.n_layer, c.n_embd, c.mlp_hidden)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (c.n_head, c.kv_heads)
    assert field("llama.context_length") == c.block_size
    assert field("tokenizer.ggml.model") == "llama"  # SentencePiece-style: byte tokens typed as bytes
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size and tokens[tok.eot_id] == "</s>" and tokens[3] == "<0x00>"
    assert field("tokenizer.ggml.token_type")[3] == 6
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (tok.bos_id, tok.eot_id)
    assert "[INST]" in field("tokenizer.chat_template")
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * c.n_layer + (0 if c.tie_embeddings else 1)
    state = ckpt.model.state_dict()
    q_rows = c.n_embd
    want = {
        "token_embd.weight": state["wte.weight"],
        "blk.1.ffn_down.weight": state["h.1.mlp.c_proj.weight"],
        "blk.0.attn_norm.weight": state["h.0.ln_1.weight"],
        # llama.cpp rotates adjacent pairs: q and k rows are permuted into that order.
        "blk.0.attn_q.weight": interleave_rope_rows(state["h.0.attn.c_attn.weight"][:q_rows], c.n_head),
        "blk.0.attn_v.weight": state["h.0.attn.c_attn.weight"][q_rows + c.kv_heads * c.head_dim:],
    }
    tolerance = {"f32": 0.0, "f16": 2e-3, "q8_0": 2e-2}[outtype]
    for name, expected in want.items():
        t = tensors[name]
        assert tuple(reversed([int(d) for d in t.shape])) == tuple(expected.shape), name  # GGUF lists dims inner first
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        scale = expected.abs().max().item()
        err = np.abs(values - expected.numpy()).max() / scale
        assert err <= (0.0 if expected.ndim == 1 else tolerance), (name, err)
    kinds = {t.tensor_type.name for n, t in tensors.items() if n.endswith("attn_q.weight")}
    assert kinds == {outtype.upper()}


def test_gguf_byte_level_qwen2(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    src, _ = save_llama_family(tmp_path / "src", "qwen2")
    ckpt = load_checkpoint(import_hf(src, tmp_path / "ck"))
    reader = gguf.GGUFReader(str(export(ckpt.path, "gguf", tmp_path / "q.gguf", outtype="f32")))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.architecture"] == "qwen2" and fields["tokenizer.ggml.model"] == "gpt2"
    assert len(fields["tokenizer.ggml.merges"]) > 10 and fields["tokenizer.ggml.eot_token_id"] == 0
    tensors = {t.name: t for t in reader.tensors}
    bias = ckpt.model.state_dict()["h.0.attn.c_attn.bias"][: ckpt.config.n_embd]  # qwen2 rotates halves: as is
    assert np.array_equal(tensors["blk.0.attn_q.bias"].data, bias.numpy())


def test_q_permutation_is_llama_cpp_order() -> None:
    """Head 0 of a 2-head, head_dim-4 q: half-split pairs (0,2), (1,3) become adjacent rows (0,1), (2,3)."""
    w = torch.arange(8).unsqueeze(1).float()
    assert interleave_rope_rows(w, 2).squeeze(1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_pocketgpt_export_command(llama_checkpoint: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pocketgpt.app.cli", "export", str(llama_checkpoint), "--format",
                           "hf", "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "generation_config.json").is_file()
