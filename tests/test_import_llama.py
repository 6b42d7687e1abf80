"""`import-hf` of the Llama family: tiny random Llama (GQA, MQA, Llama 3 RoPE scaling), Qwen2 (q/k/v biases) and
Mistral (sliding window) models made locally with `transformers` import exactly: logits within 1e-4, greedy
generations token for token, tokenizers with their BOS and every end id; other architectures and downloads
without network are refused clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.model.generate import generate
from pocketgpt.model.sampling import SamplingParams
from pocketgpt.training.errors import UserError
from pocketgpt.training.import_hf import import_hf
from tests.hf_models import save_llama_family

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CASES = {
    "llama-gqa": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama-mqa": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(rope_theta=1000000.0)),
    "mistral": ("mistral", dict(sliding_window=48)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def imported(request, tmp_path_factory: pytest.TempPathFactory):
    """(case name, HF model, our checkpoint) for each case."""
    arch, overrides = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    src, model = save_llama_family(root / "hf", arch, **overrides)
    return request.param, model, load_checkpoint(import_hf(src, root / "ck"))


def test_logits_and_greedy_generations_equal_transformers(imported) -> None:
    name, model, ckpt = imported
    c = ckpt.config
    assert c.kv_heads == (1 if name == "llama-mqa" else 2) and c.n_head == 4 and c.mlp_width == 48
    assert c.qkv_bias == (name == "qwen2") and c.tie_embeddings == (name == "llama-mqa")
    assert (c.rope_scaling is not None) == (name == "llama-gqa")
    assert c.block_size == (48 if name == "mistral" else 64)  # Mistral: capped at its sliding window
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, c.vocab_size, (2, c.block_size), generator=gen)
    with torch.no_grad():
        ours, _ = ckpt.model(x)
        theirs = model(x).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
    end_ids = set(ckpt.tokenizer.stop_ids)
    for prompt in (x[0, :5].tolist(), x[1, :9].tolist()):
        mine = generate(ckpt.model, prompt, 24, params=SamplingParams(temperature=0.0))
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        reference = out[0, len(prompt):].tolist()
        assert mine == reference and len(set(mine)) > 2
    assert ckpt.tokenizer.eot_id in end_ids


def test_tokenizer_roles_follow_the_model_files(imported) -> None:
    name, _, ckpt = imported
    tok = ckpt.tokenizer
    if name == "qwen2":  # ChatML: no BOS, <|im_end|> ends text and <|endoftext|> too (generation_config list)
        assert tok.bos_id is None and not tok.settings.add_bos
        assert tok.settings.eos_token == "<|im_end|>" and tok.settings.stop_tokens == ("<|endoftext|>",)
        assert tok.encode_prompt("Hi") == tok.encode("Hi")
    else:  # Llama 2 style: <s> first, </s> ends
        assert (tok.bos_id, tok.eot_id, tok.settings.add_bos) == (1, 2, True)
        assert tok.encode_prompt("Hi") == [1, *tok.encode("Hi")]


def test_dtype_is_kept_or_cast(tmp_path: Path) -> None:
    src, model = save_llama_family(tmp_path / "hf", "llama")
    bf16 = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(bf16, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (bf16 / name).write_bytes((src / name).read_bytes())
    kept = load_checkpoint(import_hf(bf16, tmp_path / "kept"))
    assert kept.meta["source"]["dtype"] == "bfloat16"
    cast = load_checkpoint(import_hf(bf16, tmp_path / "cast", dtype="float32"))
    assert cast.meta["source"]["dtype"] == "float32"
    x = torch.arange(20).unsqueeze(0)
    with torch.no_grad():  # the same bf16 values either way
        assert torch.equal(kept.model(x)[0], cast.model(x)[0])


def test_sharded_llama_import(tmp_path: Path) -> None:
    src, model = save_llama_family(tmp_path / "hf", "llama")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (sharded / name).write_bytes((src / name).read_bytes())
    ckpt = load_checkpoint(import_hf(sharded, tmp_path / "ck"))
    assert len(ckpt.meta["source"]["weights"]) > 1
    x = torch.arange(30).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(ckpt.model(x)[0], model(x).logits, atol=1e-4, rtol=0)


def test_unsupported_architecture_and_variants_are_named(tmp_path: Path) -> None:
    src, _ = save_llama_family(tmp_path / "hf", "llama")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": ["GemmaForCausalLM"]}))
    with pytest.raises(UserError, match=r"GemmaForCausalLM is not supported.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        import_hf(src, tmp_path / "a")
    (src / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(UserError, match="hidden_act"):
        import_hf(src, tmp_path / "b")
    rope = {**config["rope_parameters"], "rope_type": "yarn"} if "rope_parameters" in config else None
    (src / "config.json").write_text(json.dumps({**config, "rope_parameters": rope, "rope_scaling": {"type": "yarn"}}))
    with pytest.raises(UserError, match="'yarn' is not supported"):
        import_hf(src, tmp_path / "c")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_hub_id_offline_is_a_clear_error(tmp_path: Path) -> None:
    """ORG/NAME with the Hub unreachable (HF_HUB_OFFLINE, an empty cache: no request is made) says how to
    download by hand."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run(
        [sys.executable, "-m", "pocketgpt.app.cli", "import-hf", "HuggingFaceTB/SmolLM2-135M@main", "--out",
         str(tmp_path / "ck")], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "cannot download 'HuggingFaceTB/SmolLM2-135M@main'" in proc.stderr
    assert "huggingface-cli download HuggingFaceTB/SmolLM2-135M --revision main" in proc.stderr
    assert not (tmp_path / "ck").exists()


def test_hub_download_asks_only_for_json_and_safetensors(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub

    from pocketgpt.training import hf_hub

    calls = []
    src, _ = save_llama_family(tmp_path / "hf", "qwen2")

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ckpt = load_checkpoint(import_hf("Org/tiny-qwen@abc123", tmp_path / "ck"))
    assert calls == [{"repo_id": "Org/tiny-qwen", "revision": "abc123", "allow_patterns": hf_hub.ALLOW_PATTERNS}]
    assert not any(p.endswith((".bin", ".pt", ".pth", ".pkl")) or p == "*" for p in hf_hub.ALLOW_PATTERNS)
    assert ckpt.meta["source"]["origin"] == "Org/tiny-qwen@abc123"
