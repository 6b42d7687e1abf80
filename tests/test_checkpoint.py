"""Checkpoint directory: round trip, atomic writes, clear errors, and no unpickling."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pocketgpt.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_train_state,
    resolve_checkpoint,
    save_checkpoint,
)
from pocketgpt.model.generate import generate
from pocketgpt.model.sampling import SamplingParams
from tests.conftest import make_tiny_checkpoint


def test_round_trip_same_logits(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "ck")
    a = load_checkpoint(path)
    idx = torch.tensor([a.tokenizer.encode("def add(a, b):")])
    b = load_checkpoint(path)
    assert torch.equal(a.model(idx)[0], b.model(idx)[0])
    assert a.meta["format_version"] == 2 and a.meta["step"] == 0
    # Tied embeddings survive the file format (lm_head is not stored separately).
    assert b.model.lm_head.weight.data_ptr() == b.model.wte.weight.data_ptr()


def test_format_1_checkpoint_loads_unchanged(tmp_path: Path) -> None:
    """A checkpoint written before format 2 (no n_kv_head/qkv_bias/mlp_width/rope_scaling) loads as the same
    model; a format newer than this code is refused by name."""
    path = make_tiny_checkpoint(tmp_path / "ck")
    want = load_checkpoint(path)
    cfg = json.loads((path / "config.json").read_text())
    for key in ("n_kv_head", "qkv_bias", "mlp_width", "rope_scaling"):
        del cfg[key]
    (path / "config.json").write_text(json.dumps(cfg))
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    old = load_checkpoint(path)
    assert old.config == want.config.with_overrides(n_kv_head=2) and old.config.kv_heads == 2
    idx = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(old.model(idx)[0], want.model(idx)[0])
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(CheckpointError, match="format 3 is newer"):
        load_checkpoint(path)


def test_untied_gpt2_layout_round_trip(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(
        tmp_path / "ck", positions="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False
    )
    ck = load_checkpoint(path)
    ck2 = load_checkpoint(path)
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(ck.model(idx)[0], ck2.model(idx)[0])


def test_save_replaces_previous_and_train_state_round_trips(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "ck")
    ck = load_checkpoint(path)
    state = {"step": 7, "rng": torch.get_rng_state(), "opt": {"lr": 0.1, "m": torch.ones(3)}}
    save_checkpoint(path, ck.model, ck.tokenizer, meta={"step": 7}, train_state=state)
    assert load_checkpoint(path).meta["step"] == 7
    loaded = load_train_state(path)
    assert loaded["step"] == 7 and torch.equal(loaded["opt"]["m"], torch.ones(3))
    assert not list(tmp_path.glob(".ck.*"))  # no temp or old dirs left behind


def test_crash_between_renames_recovers_previous(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "ck")
    path.rename(tmp_path / ".ck.old")  # the state a crash after the first rename leaves
    assert resolve_checkpoint(path) == tmp_path / ".ck.old"
    assert load_checkpoint(path).meta["step"] == 0


def test_missing_and_truncated_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    path = make_tiny_checkpoint(tmp_path / "ck")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(path)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"missing .*model\.safetensors"):
        load_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_checkpoint(path)


def test_mismatched_config_names_the_tensor(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "ck")
    cfg = json.loads((path / "config.json").read_text())
    cfg["n_embd"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor '.*' has shape"):
        load_checkpoint(path)
    cfg["n_embd"], cfg["n_layer"] = 32, 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensors \['h\.2\."):
        load_checkpoint(path)


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


def test_pickle_payload_is_refused_without_running(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "ck")
    marker = tmp_path / "pwned"
    _Boom.marker = marker
    payload = pickle.dumps({"x": _Boom()})
    (path / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    (path / "train_state.pt").write_bytes(payload)
    with pytest.raises(CheckpointError, match="refused"):
        load_train_state(path)
    torch.save({"x": _Boom()}, path / "train_state.pt")  # a real torch zip holding a malicious object
    with pytest.raises(CheckpointError, match="refused"):
        load_train_state(path)
    assert not marker.exists()


def test_generate_reference(tmp_path: Path) -> None:
    ck = load_checkpoint(make_tiny_checkpoint(tmp_path / "ck"))
    prompt = ck.tokenizer.encode("def add")
    greedy = generate(ck.model, prompt, 20, params=SamplingParams(temperature=0))
    seq = list(prompt)
    for _ in range(20):
        seq.append(int(ck.model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert greedy == seq[len(prompt) :]
    p = SamplingParams(temperature=1.0)
    assert generate(ck.model, prompt, 20, params=p, seed=3) == generate(ck.model, prompt, 20, params=p, seed=3)
    with pytest.raises(ValueError, match="exceeds context"):
        generate(ck.model, prompt, 200)
    shutil.rmtree(ck.path)


def test_save_removes_temp_dirs_of_a_killed_save(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "ck")
    stale = tmp_path / ".ck.tmp-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    ck = load_checkpoint(path)
    save_checkpoint(path, ck.model, ck.tokenizer, meta={"step": 1})
    assert not stale.exists() and load_checkpoint(path).meta["step"] == 1
