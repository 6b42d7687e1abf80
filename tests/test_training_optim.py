"""`--optimizer muon`: Muon for the blocks' matrices, AdamW for the rest, one schedule, resumable."""

from __future__ import annotations

import pytest
import torch

from pocketgpt.model.config import ModelConfig
from pocketgpt.model.gpt import GPT
from pocketgpt.training.optim import MuonAdamW, make_optimizer


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16))


def test_muon_takes_the_block_matrices_and_adamw_the_rest() -> None:
    model = tiny()
    opt = make_optimizer(model, 1e-3, 0.1, "cpu", "muon")
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == {id(p) for p in model.h.parameters() if p.dim() == 2}
    assert muon.isdisjoint(adamw) and muon | adamw == {id(p) for p in model.parameters()}
    assert id(model.wte.weight) in adamw  # embeddings (and the tied head) stay on AdamW
    for group in opt.param_groups:  # the schedule reaches both optimizers' groups
        group["lr"] = 5e-4
    assert {g["lr"] for g in opt.muon.param_groups + opt.adamw.param_groups} == {5e-4}


def test_muon_lowers_the_loss_and_its_state_round_trips() -> None:
    model, data = tiny(), torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    opt = make_optimizer(model, 3e-3, 0.1, "cpu", "muon")
    losses = []
    for _ in range(20):
        _, loss = model(data[:, :-1].contiguous(), data[:, 1:].contiguous())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    again = make_optimizer(model, 3e-3, 0.1, "cpu", "muon")
    again.load_state_dict(opt.state_dict())
    assert again.state_dict()["muon"]["state"].keys() == opt.state_dict()["muon"]["state"].keys()
    with pytest.raises(ValueError, match="--optimizer"):
        again.load_state_dict(make_optimizer(model, 3e-3, 0.1, "cpu").state_dict())
