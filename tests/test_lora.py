"""Fine-tuning imported models: full SFT and LoRA on a tiny imported Qwen2 (its own chat template) lower the held-out
loss; LoRA trains adapters only (base frozen, optimizer state for adapters only), saves merged weights that load as a
normal checkpoint, writes the adapter beside them, and resumes exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pocketgpt.model.checkpoint import load_checkpoint, load_train_state
from pocketgpt.training.config import TrainConfig
from pocketgpt.training.errors import UserError
from pocketgpt.training.export_hf import export_hf
from pocketgpt.training.import_hf import import_hf
from pocketgpt.training.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSpec, attach, merged
from pocketgpt.training.metrics import read_metrics
from pocketgpt.training.progress import Progress
from pocketgpt.training.trainer import Trainer
from tests.hf_models import save_llama_family

pytest.importorskip("transformers")
WORDS = ["red", "blue", "green", "gold", "pink", "gray"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(an imported tiny Qwen2 checkpoint with a ChatML template, a JSONL of conversations)."""
    root = tmp_path_factory.mktemp("lora")
    src, _ = save_llama_family(root / "hf", "qwen2")
    rng = random.Random(0)
    lines = []
    for _ in range(80):
        words = rng.sample(WORDS, 3)
        lines.append(json.dumps({"messages": [{"role": "user", "content": " ".join(words)},
                                              {"role": "assistant", "content": " ".join(reversed(words))}]}))
    data = root / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return import_hf(src, root / "base"), data


def _train(base: Path, data: Path, out: Path, steps: int, **extra) -> TrainConfig:
    settings = dict(task="sft", init_from=str(base), data=[str(data)], out=str(out), device="cpu", max_steps=steps,
                    eval_every=steps, log_every=5, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=0,
                    val_fraction=0.1, seed=0, sample_tokens=4)
    cfg = TrainConfig(**{**settings, **extra})
    Trainer(cfg, progress=Progress(interactive=False)).run()
    return cfg


def _val_losses(out: Path) -> list[float]:
    return [r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "eval"]


def test_full_sft_and_lora_lower_the_loss(setup, tmp_path: Path) -> None:
    base, data = setup
    before = _train(base, data, tmp_path / "zero", 1, lr=0.0, min_lr=0.0)  # the untuned loss, same held-out set
    start = _val_losses(Path(before.out))[0]
    _train(base, data, tmp_path / "full", 20)
    _train(base, data, tmp_path / "lora", 20, lora_r=4, lora_targets="q,k,v,o,up,down,gate", lr=3e-2)
    assert _val_losses(tmp_path / "full")[-1] < start - 0.5
    assert _val_losses(tmp_path / "lora")[-1] < start - 0.5


def test_lora_trains_adapters_only_and_saves_merged_and_adapter(setup, tmp_path: Path) -> None:
    base, data = setup
    _train(base, data, tmp_path / "run", 6, lora_r=2, lora_alpha=8.0, lora_targets="q,v", save_adapter=True)
    before, after = load_checkpoint(base), load_checkpoint(tmp_path / "run" / "last")  # loads as a normal checkpoint
    b, a = before.model.state_dict(), after.model.state_dict()
    assert set(a) == set(b)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed == {f"h.{i}.attn.c_attn.weight" for i in range(2)}
    c = after.config
    q, kv = c.n_embd, c.kv_heads * c.head_dim
    w_new, w_old = a["h.0.attn.c_attn.weight"], b["h.0.attn.c_attn.weight"]
    assert torch.equal(w_new[q : q + kv], w_old[q : q + kv])  # k untouched: only q and v are targets
    assert not torch.equal(w_new[:q], w_old[:q]) and not torch.equal(w_new[q + kv :], w_old[q + kv :])
    assert torch.equal(a["h.0.attn.c_attn.bias"], b["h.0.attn.c_attn.bias"])
    # The adapter beside the weights reproduces the merged update.
    folder = tmp_path / "run" / "last"
    adapter = load_file(str(folder / ADAPTER_WEIGHTS))
    config = json.loads((folder / ADAPTER_CONFIG).read_text())  # PEFT's format (the Llama layout)
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2, 8.0)
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["base_model_name_or_path"] == str(base)
    assert len(adapter) == 2 * 2 * 2  # layers x targets x (A, B)
    prefix = "base_model.model.model.layers.0.self_attn"
    a0, b0 = adapter[f"{prefix}.q_proj.lora_A.weight"], adapter[f"{prefix}.q_proj.lora_B.weight"]
    assert a0.shape == (2, c.n_embd) and b0.shape == (q, 2)
    torch.testing.assert_close(w_new[:q] - w_old[:q], (b0 @ a0) * 4.0, atol=1e-5, rtol=1e-4)
    a1, b1 = adapter[f"{prefix}.v_proj.lora_A.weight"], adapter[f"{prefix}.v_proj.lora_B.weight"]
    torch.testing.assert_close(w_new[q + kv :] - w_old[q + kv :], (b1 @ a1) * 4.0, atol=1e-5, rtol=1e-4)
    # Optimizer state exists for the adapters only: 2 layers x 2 targets x (A, B).
    state = load_train_state(folder)
    assert len(state["optimizer"]["state"]) == 8 and len(state["lora"]) == 8


def test_peft_loads_the_adapter_onto_the_exported_base_model(setup, tmp_path: Path) -> None:
    """--save-adapter's folder is a PEFT adapter: PeftModel on `pocketgpt export`'s base model computes the
    logits of pocketgpt's merged checkpoint."""
    import peft
    import transformers

    base, data = setup
    _train(base, data, tmp_path / "run", 4, lora_r=2, lora_targets="q,k,v,o,gate,up,down", save_adapter=True)
    export_hf(load_checkpoint(base), tmp_path / "base-hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf", dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "run" / "last").eval()
    x = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = load_checkpoint(tmp_path / "run" / "last").model.eval()
    with torch.no_grad():
        theirs, want = adapted(x).logits, ours(x)[0]
        with adapted.disable_adapter():
            base_logits = adapted(x).logits
    torch.testing.assert_close(theirs, want, atol=1e-4, rtol=1e-4)
    assert (base_logits - want).abs().max() > 1e-3  # the adapter is what makes them equal


def test_lora_resume_continues_exactly(setup, tmp_path: Path) -> None:
    """8 steps in one go == 4 steps, then resume for 4 (a constant learning rate: the schedule is the same)."""
    base, data = setup
    common = dict(task="sft", data=[str(data)], device="cpu", eval_every=4, log_every=1, batch_size=8, lr=1e-2,
                  min_lr=1e-2, warmup_steps=0, val_fraction=0.1, seed=0, sample_tokens=4, lora_r=2)
    for out, steps in (("whole", 8), ("split", 4)):
        Trainer(TrainConfig(init_from=str(base), out=str(tmp_path / out), max_steps=steps, **common),
                progress=Progress(interactive=False)).run()
    Trainer(TrainConfig(resume=str(tmp_path / "split"), out=str(tmp_path / "split"), max_steps=8, **common),
            progress=Progress(interactive=False)).run()
    a = load_checkpoint(tmp_path / "whole" / "last").model.state_dict()
    b = load_checkpoint(tmp_path / "split" / "last").model.state_dict()
    assert any(not torch.equal(a[k], load_checkpoint(base).model.state_dict()[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_bad_lora_settings_are_clear() -> None:
    with pytest.raises(ValueError, match="lora_r fine-tunes a checkpoint"):
        TrainConfig(lora_r=4)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoraSpec.parse(4, None, "q,attn")
    from pocketgpt.model.config import ModelConfig
    from pocketgpt.model.gpt import GPT

    gpt2 = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, positions="learned", norm="layernorm",
                           mlp="gelu", bias=True))
    with pytest.raises(ValueError, match="no gate"):
        attach(gpt2, LoraSpec.parse(2, None, "gate"))
    model = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    attach(model, LoraSpec.parse(2, None, "q,up"))
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    x = torch.randint(0, 50, (1, 8))
    with torch.no_grad():  # B starts at zero: the adapted model is the model
        assert torch.equal(model(x)[0], merged(model)(x)[0])
    assert UserError  # the trainer turns these ValueErrors into UserErrors (exit code 2)
