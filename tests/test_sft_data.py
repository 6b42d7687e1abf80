"""Fine-tuning data: encoding and loss masks, padding, the split, the sampler, config and job plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pocketgpt.app.jobs.schemas import ConfigProblem, JobRequest
from pocketgpt.model.chat import ChatTemplate
from pocketgpt.model.tokenizer import Tokenizer
from pocketgpt.training.config import TrainConfig, validate_config
from pocketgpt.training.errors import DataError, UserError
from pocketgpt.training.sft_data import encode_record, prepare_sft
from pocketgpt.training.sft_sampler import IGNORE, SFTSampler, collate


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_prompt_completion_is_prompt_completion_eot_with_loss_on_completion_and_eot(tokenizer: Tokenizer) -> None:
    ex = encode_record("f:1", {"prompt": "What is 2 plus 3?", "completion": " 5"}, tokenizer, None)
    p, c = tokenizer.encode("What is 2 plus 3?"), tokenizer.encode(" 5")
    assert ex.ids == [*p, *c, tokenizer.eot_id]
    assert ex.mask == [False] * len(p) + [True] * (len(c) + 1)
    assert (ex.prompt_len, ex.reference, ex.stop_ids, ex.answer_len) == (len(p), " 5", (tokenizer.eot_id,), len(c) + 1)
    x, y = collate([ex], pad_id=tokenizer.eot_id)
    assert x[0].tolist() == ex.ids[:-1]
    assert y[0].tolist() == [IGNORE] * (len(p) - 1) + [*c, tokenizer.eot_id]


def test_messages_example_targets_every_assistant_turn_and_prompts_the_last(tokenizer: Tokenizer) -> None:
    template = ChatTemplate()
    tok = tokenizer.with_special_tokens(template.special_tokens)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ex = encode_record("f:1", {"messages": msgs}, tok, template)
    full = template.render(tok, msgs)
    assert (ex.ids, ex.mask) == (full.ids, full.mask)
    assert ex.ids[: ex.prompt_len] == template.render(tok, msgs[:3], add_generation_prompt=True).ids
    assert ex.reference == "d" and ex.stop_ids[0] == tok.token_id("<|end|>") and tok.eot_id in ex.stop_ids
    trained = [i for i, m in zip(ex.ids, ex.mask, strict=True) if m]
    assert trained == [*tok.encode("b"), tok.token_id("<|end|>"), *tok.encode("d"), tok.token_id("<|end|>")]


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "a"}, "expected"),
    ({"prompt": "", "completion": "b"}, "prompt is empty"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}, "role must be"),
    ({"messages": "hi"}, "must be a list"),
    ([1, 2], "expected"),
])
def test_bad_examples_name_the_line(tokenizer: Tokenizer, record, message: str) -> None:
    tok = tokenizer.with_special_tokens(ChatTemplate().special_tokens)
    with pytest.raises(DataError, match=f"data.jsonl:7: .*{message}"):
        encode_record("data.jsonl:7", record, tok, ChatTemplate())


def test_prepare_adds_markers_drops_long_examples_and_splits_by_seed(tokenizer: Tokenizer, tmp_path: Path) -> None:
    recs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(20)]
    recs.append({"prompt": "long " * 100, "completion": "x"})
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    logs: list[str] = []
    data = prepare_sft([str(path)], tokenizer, None, block_size=32, val_fraction=0.25, seed=1, log=logs.append)
    assert data.template == ChatTemplate() and data.tokenizer.vocab_size == tokenizer.vocab_size + 4
    assert (len(data.train), len(data.val), data.meta["dropped_too_long"]) == (15, 5, 1)
    assert any("dropped 1 example" in line for line in logs)
    again = prepare_sft([str(path)], tokenizer, None, block_size=32, val_fraction=0.25, seed=1, log=logs.append)
    other = prepare_sft([str(path)], tokenizer, None, block_size=32, val_fraction=0.25, seed=2, log=logs.append)
    assert [e.reference for e in again.val] == [e.reference for e in data.val] != [e.reference for e in other.val]
    assert again.meta["fingerprint"] == data.meta["fingerprint"] != other.meta["fingerprint"]
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    plain = prepare_sft([str(pairs)], tokenizer, None, block_size=32, val_fraction=0.3, seed=1, log=logs.append)
    assert plain.template is None and plain.tokenizer.vocab_size == tokenizer.vocab_size
    with pytest.raises(DataError, match="need at least 2"):
        prepare_sft([str(write_jsonl(tmp_path / "one.jsonl", recs[:1]))], tokenizer, None, block_size=32,
                    val_fraction=0.1, seed=1, log=logs.append)
    with pytest.raises(DataError, match="not the 'stdlib' corpus"):
        prepare_sft(["stdlib"], tokenizer, None, block_size=32, val_fraction=0.1, seed=1)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        prepare_sft([str(tmp_path / "bad.jsonl")], tokenizer, None, block_size=32, val_fraction=0.1, seed=1)


def test_sampler_pads_right_walks_epochs_and_resumes_exactly(tokenizer: Tokenizer) -> None:
    exs = [encode_record(f"f:{i}", {"prompt": "p" * (i + 1), "completion": "c"}, tokenizer, None) for i in range(5)]
    x, y = collate(exs[:2], pad_id=tokenizer.eot_id)
    n0 = len(exs[0].ids) - 1
    assert x.shape == (2, len(exs[1].ids) - 1)
    assert (x[0, n0:] == tokenizer.eot_id).all() and (y[0, n0:] == IGNORE).all()
    sampler = SFTSampler(exs, batch_size=2, seed=0, pad_id=tokenizer.eot_id)
    for _ in range(4):  # into the second epoch: 8 of 5 examples drawn, an epoch boundary inside a batch
        sampler.next_batch()
    state = sampler.state_dict()
    follow = [sampler.next_batch() for _ in range(3)]
    other = SFTSampler(exs, batch_size=2, seed=99, pad_id=tokenizer.eot_id)
    other.load_state_dict(state)
    for (a, b), (c, d) in zip(follow, [other.next_batch() for _ in range(3)], strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    first_epoch = SFTSampler(exs, batch_size=5, seed=0, pad_id=tokenizer.eot_id)
    first_epoch.next_batch()
    assert sorted(first_epoch.order.tolist()) == list(range(5))  # an epoch is a permutation: each example once
    rank1 = SFTSampler(exs, batch_size=4, seed=0, pad_id=tokenizer.eot_id, rank=1, world_size=2)
    assert rank1.next_batch()[0].shape[0] == 2


def test_config_task_sft_needs_a_checkpoint_and_round_trips_to_argv() -> None:
    with pytest.raises(UserError, match="task sft fine-tunes a checkpoint"):
        validate_config({"task": "sft", "data": ["d.jsonl"]})
    cfg = TrainConfig(task="sft", init_from="ck", data=["d.jsonl"])
    argv = cfg.to_argv()
    assert argv[:2] == ["--task", "sft"] and "--init-from" in argv
    assert TrainConfig().task == "pretrain" and "--task" not in TrainConfig().to_argv()


def test_admin_job_request_passes_the_task_through() -> None:
    args = JobRequest(data=["pairs.jsonl"], task="sft", init_from="base").trainer_args(["/d/pairs.jsonl"], "/ck/b")
    assert args[:2] == ["--task", "sft"] and args[args.index("--init-from") + 1] == "/ck/b"
    with pytest.raises(ConfigProblem, match="task sft fine-tunes a checkpoint"):
        JobRequest(data=["pairs.jsonl"], task="sft").trainer_args(["/d/pairs.jsonl"], None)
