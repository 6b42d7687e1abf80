"""Supervised fine-tuning end to end: a tiny model learns a task it could not do (measured on held-out
examples), and the result serves /v1/chat/completions to the official `openai` client over real HTTP."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import openai
import pytest
import torch

from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import running_server
from pocketgpt.model.chat import ChatTemplate
from pocketgpt.model.checkpoint import load_checkpoint, save_checkpoint
from pocketgpt.model.config import preset
from pocketgpt.model.gpt import GPT
from pocketgpt.model.tokenizer import train_tokenizer
from pocketgpt.model.vocab import add_token_rows
from pocketgpt.training.cli import main as training_main
from pocketgpt.training.config import TrainConfig
from pocketgpt.training.metrics import RECORD_FIELDS, read_metrics
from pocketgpt.training.progress import Progress
from pocketgpt.training.sft_data import prepare_sft
from pocketgpt.training.sft_eval import answer_scores, greedy_answer
from pocketgpt.training.trainer import Trainer
from tests.sse import read_events

WORDS = ["red", "blue", "green", "gold", "pink", "gray", "black", "white"]
STEPS = 300


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def reversal_task(n: int, seed: int = 0) -> list[list[str]]:
    """`n` distinct lists of four colour words (from 8**4 = 4096): the task is to say them backwards."""
    combos = [[a, b, c, d] for a in WORDS for b in WORDS for c in WORDS for d in WORDS]
    random.Random(seed).shuffle(combos)
    return combos[:n]


def as_messages(words: list[str]) -> dict:
    return {"messages": [{"role": "user", "content": "reverse: " + " ".join(words)},
                         {"role": "assistant", "content": " ".join(reversed(words))}]}


def base_checkpoint(path: Path, texts: list[str]) -> Path:
    """A randomly initialised `tiny` model (no pretraining) with a BPE tokenizer trained on the task's words."""
    tok = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    return save_checkpoint(path, GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=64)), tok, {"step": 0})


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fine-tune on 400 reversal conversations; score 100 held-out ones before and after."""
    root = tmp_path_factory.mktemp("sft")
    lists = reversal_task(500)
    data = root / "reverse.jsonl"
    data.write_text("".join(json.dumps(as_messages(w)) + "\n" for w in lists))
    base = base_checkpoint(root / "base", ["reverse: " + " ".join(w) for w in lists])
    cfg = TrainConfig(task="sft", init_from=str(base), data=[str(data)], out=str(root / "run"), device="cpu",
                      max_steps=STEPS, eval_every=STEPS, log_every=50, batch_size=32, lr=3e-3, min_lr=3e-4,
                      warmup_steps=20, weight_decay=0.0, val_fraction=0.2, seed=1337)
    # The untuned model as the trainer starts it: base weights plus mean-initialised rows for the chat markers.
    init = load_checkpoint(base)
    held_out = prepare_sft(cfg.data, init.tokenizer, None, block_size=64, val_fraction=cfg.val_fraction,
                           seed=cfg.seed, log=lambda _: None)
    untuned = add_token_rows(init.model, init.tokenizer.vocab_size, held_out.tokenizer.vocab_size).eval()
    before = answer_scores(untuned, held_out.tokenizer, held_out.val, limit=len(held_out.val))
    result = Trainer(cfg, progress=Progress(interactive=False)).run()
    assert (result.status, result.step) == ("succeeded", STEPS)
    tuned = load_checkpoint(result.best_path)
    after = answer_scores(tuned.model, tuned.tokenizer, held_out.val, limit=len(held_out.val))
    return {"root": root, "run": root / "run", "best": Path(result.best_path), "data": data, "held_out": held_out,
            "before": before, "after": after, "tuned": tuned}


def test_finetuning_learns_the_task_on_held_out_examples(finetuned: dict) -> None:
    before, after = finetuned["before"]["exact_match"], finetuned["after"]["exact_match"]
    print(f"held-out exact match: untuned {before:.1f}% -> fine-tuned {after:.1f}% "
          f"(BLEU {finetuned['before']['bleu']:.1f} -> {finetuned['after']['bleu']:.1f})")
    assert len(finetuned["held_out"].val) == 100
    assert before <= 5.0
    assert after >= 80.0
    assert finetuned["after"]["bleu"] > finetuned["before"]["bleu"] + 50


def test_finetuned_checkpoint_carries_template_and_grown_vocab(finetuned: dict) -> None:
    tuned = finetuned["tuned"]
    assert tuned.chat_template == ChatTemplate()
    assert tuned.tokenizer.vocab_size == tuned.config.vocab_size == finetuned["held_out"].tokenizer.vocab_size
    assert tuned.meta["config"]["task"] == "sft" and tuned.meta["data_fingerprint"]
    records = read_metrics(finetuned["run"] / "metrics.jsonl")
    for r in records:
        assert tuple(r) == RECORD_FIELDS[r["type"]], r
    scores = [r for r in records if r["type"] == "sft_eval"]
    assert [r["step"] for r in scores] == [STEPS] and scores[0]["exact_match"] >= 80.0
    train = [r["loss"] for r in records if r["type"] == "train"]
    assert train[-1] < train[0] / 10


def test_openai_chat_client_over_http(finetuned: dict) -> None:
    tuned, held_out = finetuned["tuned"], finetuned["held_out"]
    with running_server(create_app(Settings(checkpoint=finetuned["best"], model_name="reverser"))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
        right = 0
        for example in held_out.val[:6]:
            question = tuned.tokenizer.decode(example.ids[: example.prompt_len])
            offline = tuned.tokenizer.decode(greedy_answer(tuned.model, example))
            reply = client.chat.completions.create(
                model="reverser", messages=[{"role": "user", "content": question}], temperature=0)
            choice = reply.choices[0]
            assert (reply.object, reply.model, choice.message.role) == ("chat.completion", "reverser", "assistant")
            assert reply.id.startswith("chatcmpl-")
            assert choice.message.content == offline and choice.finish_reason == "stop"
            # the answer's tokens plus the end marker that stopped it; the prompt is the rendered conversation
            assert reply.usage.completion_tokens == len(tuned.tokenizer.encode(offline)) + 1
            assert reply.usage.prompt_tokens == example.prompt_len
            right += offline == example.reference
        assert right >= 4

        question = [{"role": "system", "content": ""}, {"role": "user", "content": "reverse: red red blue gold"}]
        full = client.chat.completions.create(model="reverser", messages=question[1:], temperature=0)
        chunks = list(client.chat.completions.create(model="reverser", messages=question[1:], temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == full.choices[0].message.content == "gold blue red red"
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=30,
                          json={"messages": question, "stream": True, "temperature": 0}) as r:
            events = read_events(r)
        assert events[-1] == ("message", "[DONE]")
        assert json.loads(events[0][1])["object"] == "chat.completion.chunk"


def test_eval_cli_scores_held_out_examples(finetuned: dict, tmp_path: Path, capsys) -> None:
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(as_messages(w)) + "\n" for w in reversal_task(4096)[-30:]))
    assert training_main(["eval", "--checkpoint", str(finetuned["best"]), "--sft", str(held), "--json",
                          "--device", "cpu"]) == 0
    sft = json.loads(capsys.readouterr().out)["sft"]
    assert sft["examples"] == 30 and sft["exact_match"] >= 80.0 and sft["loss"] < 0.5
    assert len(sft["samples"]) == 3 and sft["samples"][0]["reference"]


def test_train_cli_prompt_completion_pairs(tmp_path: Path) -> None:
    """`train --task sft` from the command line on prompt/completion pairs: no template, answers scored."""
    lists = reversal_task(60)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": "reverse: " + " ".join(w) + " =>",
                                        "completion": " " + " ".join(reversed(w))}) + "\n" for w in lists))
    base = base_checkpoint(tmp_path / "base", ["reverse: " + " ".join(w) for w in lists])
    rc = training_main(["train", "--task", "sft", "--init-from", str(base), "--data", str(data), "--out",
                        str(tmp_path / "run"), "--max-steps", "20", "--eval-every", "10", "--batch-size", "8",
                        "--device", "cpu", "--warmup-steps", "2"])
    assert rc == 0
    last = load_checkpoint(tmp_path / "run" / "last")
    assert last.chat_template is None and last.tokenizer.vocab_size == load_checkpoint(base).tokenizer.vocab_size
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if r["type"] == "sft_eval"] == [10, 20]
    evals = [r for r in records if r["type"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and "=>" in evals[0]["sample"]


def test_sft_resume_continues_exactly(tmp_path: Path) -> None:
    """Stopped at step 8 and resumed, an sft run (markers added, epochs of examples) matches one run straight."""
    lists = reversal_task(40)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(as_messages(w)) + "\n" for w in lists))
    base = base_checkpoint(tmp_path / "base", ["reverse: " + " ".join(w) for w in lists])
    settings = {"task": "sft", "init_from": str(base), "data": [str(data)], "device": "cpu", "max_steps": 16,
                "eval_every": 8, "log_every": 1, "batch_size": 12, "warmup_steps": 2, "dropout": 0.1}
    Trainer(TrainConfig(**settings, out=str(tmp_path / "a")), progress=Progress(interactive=False)).run()

    class StopAfter(Progress):  # stands in for a SIGTERM arriving during step 8
        def step(self) -> None:
            self.count = getattr(self, "count", 0) + 1
            if self.count == 8:
                trainer.request_stop()

    trainer = Trainer(TrainConfig(**settings, out=str(tmp_path / "b")), progress=StopAfter(interactive=False))
    assert trainer.run().step == 8
    resumed = {**settings, "init_from": None, "resume": str(tmp_path / "b"), "out": str(tmp_path / "b")}
    assert Trainer(TrainConfig(**resumed), progress=Progress(interactive=False)).run().step == 16

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["type"] == "train"}

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 17))
    assert max(abs(a[s] - b[s]) for s in range(1, 17)) < 1e-4
    grown = load_checkpoint(tmp_path / "b" / "last").tokenizer.vocab_size
    assert grown == load_checkpoint(base).tokenizer.vocab_size + 4  # the markers were added once, not again
