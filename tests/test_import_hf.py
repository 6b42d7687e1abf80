"""`import-hf`: a small random GPT-2 made locally with `transformers` imports exactly (logits, greedy text,
tokenizer), from tokenizer.json or vocab.json + merges.txt; pickle-only weights are refused unless allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pocketgpt.app.cli import TRAINING_COMMANDS
from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.model.generate import generate
from pocketgpt.model.sampling import SamplingParams
from pocketgpt.model.tokenizer import EOT
from pocketgpt.training.cli import main as training_main
from pocketgpt.training.errors import UserError
from pocketgpt.training.import_hf import import_hf
from tests.conftest import small_corpus

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog. 床前明月光 🚀 def add(a, b):\n    return a + b"


def gpt2_style_tokenizer(vocab_size: int = 300) -> HFTokenizer:
    """A byte-level BPE laid out like GPT-2's: merges first, <|endoftext|> as the last id (not 0)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(small_corpus(), trainer=trainer)
    hf.add_special_tokens([EOT])
    return hf


def save_vocab_merges(hf: HFTokenizer, folder: Path) -> None:
    """vocab.json (EOT included, as GPT-2 ships it) and merges.txt, with no tokenizer.json."""
    hf.model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab[EOT] = hf.token_to_id(EOT)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory):
    """(folder with tokenizer.json, folder with vocab.json + merges.txt, the HF model, the HF tokenizer)."""
    root = tmp_path_factory.mktemp("hf")
    hf_tok = gpt2_style_tokenizer()
    eot = hf_tok.token_to_id(EOT)
    assert eot == hf_tok.get_vocab_size() - 1 and eot > 0
    torch.manual_seed(0)
    # A wider init than GPT-2's 0.02 gives clear argmax margins, so greedy decoding compares token for token.
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=hf_tok.get_vocab_size(),
                                     n_positions=64, bos_token_id=eot, eos_token_id=eot, initializer_range=0.3)
    model = transformers.GPT2LMHeadModel(config).eval()
    with_json, with_merges = root / "with-json", root / "with-merges"
    for folder in (with_json, with_merges):
        model.save_pretrained(folder, safe_serialization=True)
    hf_tok.save(str(with_json / "tokenizer.json"))
    save_vocab_merges(hf_tok, with_merges)
    return with_json, with_merges, model, hf_tok


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab.json+merges.txt"])
def test_import_matches_transformers_logits_and_greedy_text(hf_model, tmp_path: Path, layout: str) -> None:
    with_json, with_merges, model, hf_tok = hf_model
    src = with_json if layout == "tokenizer.json" else with_merges
    ckpt = load_checkpoint(import_hf(src, tmp_path / "ck"))
    c = ckpt.config
    assert (c.positions, c.norm, c.mlp, c.bias, c.tie_embeddings) == ("learned", "layernorm", "gelu", True, True)
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (2, 2, 32, 64, hf_tok.get_vocab_size())
    assert ckpt.meta["source"]["tokenizer"] == layout

    tok = ckpt.tokenizer
    assert tok.eot_id == hf_tok.token_to_id(EOT) == tok.vocab_size - 1  # found by token, not assumed to be 0
    ids = tok.encode(TEXT)
    assert ids == hf_tok.encode(TEXT).ids
    assert tok.decode(ids) == TEXT and tok.decode([tok.eot_id]) == ""
    assert tok.encode(f"a{EOT}b") == [*tok.encode("a"), tok.eot_id, *tok.encode("b")]

    x = torch.tensor([ids[:40], ids[10:50]])
    with torch.no_grad():
        ours, _ = ckpt.model(x)
        theirs = model(x).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()

    for prompt in (ids[:5], ids[20:23], [tok.eot_id]):
        mine = generate(ckpt.model, prompt, 30, params=SamplingParams(temperature=0.0), eos_id=tok.eot_id)
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                                 pad_token_id=tok.eot_id, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        reference = out[0, len(prompt):].tolist()
        if tok.eot_id in reference:  # HF includes the end token it stopped at; our generate stops before it
            reference = reference[: reference.index(tok.eot_id)]
        assert mine == reference and len(mine) > 3


def test_transformers_own_slow_tokenizer_agrees_with_the_vocab_merges_import(hf_model, tmp_path: Path) -> None:
    _, with_merges, _, _ = hf_model
    ours = load_checkpoint(import_hf(with_merges, tmp_path / "ck")).tokenizer
    theirs = transformers.GPT2Tokenizer(str(with_merges / "vocab.json"), str(with_merges / "merges.txt"))
    assert ours.encode(TEXT) == theirs.encode(TEXT)
    assert ours.eot_id == theirs.convert_tokens_to_ids(EOT)


def test_pickle_only_weights_are_refused_unless_allowed(hf_model, tmp_path: Path) -> None:
    with_json, _, model, _ = hf_model
    src = tmp_path / "pickled"
    src.mkdir()
    # What save_pretrained(safe_serialization=False) wrote before transformers 5 (which always writes safetensors).
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json"):
        (src / name).write_bytes((with_json / name).read_bytes())
    with pytest.raises(UserError, match=r"pickle.*arbitrary code.*--allow-pickle"):
        import_hf(src, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    ckpt = load_checkpoint(import_hf(src, tmp_path / "allowed", allow_pickle=True))
    x = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(ckpt.model(x)[0], model(x).logits, atol=1e-4, rtol=0)


def test_bad_directories_are_clear_errors(hf_model, tmp_path: Path, capsys) -> None:
    with_json, _, _, _ = hf_model
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((with_json / name).read_bytes())
    with pytest.raises(UserError, match="no tokenizer"):
        import_hf(no_tok, tmp_path / "a")
    other = tmp_path / "bert"
    other.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (other / name).write_bytes((with_json / name).read_bytes())
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    assert training_main(["import-hf", str(other), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "architecture BertForMaskedLM is not supported" in err and "GPT2LMHeadModel, LlamaForCausalLM" in err
    assert training_main(["import-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_pocketgpt_import_hf_command(hf_model, tmp_path: Path) -> None:
    """The console entry point dispatches import-hf to `python -m pocketgpt.training` like train and eval."""
    assert "import-hf" in TRAINING_COMMANDS
    with_json = hf_model[0]
    out = tmp_path / "imported"
    proc = subprocess.run([sys.executable, "-m", "pocketgpt.app.cli", "import-hf", str(with_json), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert f"{out}:" in proc.stdout and "end-of-text id 299" in proc.stdout
    again = subprocess.run([sys.executable, "-m", "pocketgpt.app.cli", "import-hf", str(with_json), "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 2 and "already exists" in again.stderr


def test_sharded_safetensors_import(hf_model, tmp_path: Path) -> None:
    with_json, _, model, _ = hf_model
    src = tmp_path / "sharded"
    model.save_pretrained(src, max_shard_size="40KB")
    (src / "tokenizer.json").write_bytes((with_json / "tokenizer.json").read_bytes())
    assert (src / "model.safetensors.index.json").is_file() and not (src / "model.safetensors").exists()
    ckpt = load_checkpoint(import_hf(src, tmp_path / "ck"))
    assert len(ckpt.meta["source"]["weights"]) > 1
    x = torch.arange(30).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(ckpt.model(x)[0], model(x).logits, atol=1e-4, rtol=0)
