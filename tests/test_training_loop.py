"""The training loop in-process: it learns, writes the metrics contract, resumes exactly, starts from weights."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from pocketgpt.model.checkpoint import load_checkpoint, load_train_state
from pocketgpt.model.generate import generate
from pocketgpt.model.sampling import SamplingParams
from pocketgpt.training.cli import main
from pocketgpt.training.config import TrainConfig
from pocketgpt.training.metrics import RECORD_FIELDS, read_metrics
from pocketgpt.training.progress import Progress
from pocketgpt.training.schedule import lr_at
from pocketgpt.training.trainer import Trainer
from tests.test_training_data import structured_corpus, write_corpus

TINY = {"preset": "tiny", "block_size": 32, "batch_size": 16, "tokenizer_vocab": 300, "device": "cpu"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_config(corpus: Path, out: Path, **overrides) -> TrainConfig:
    return TrainConfig(data=[str(corpus)], out=str(out), **{**TINY, **overrides})


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["type"] == "train"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus, run dir) of a tiny model trained for 300 steps on structured sentences."""
    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "corpus.txt")
    cfg = tiny_config(corpus, root / "run", max_steps=300, eval_every=100, log_every=20, warmup_steps=30)
    result = Trainer(cfg, progress=Progress(interactive=False)).run()
    assert (result.status, result.reason, result.step) == ("succeeded", "max_steps", 300)
    return corpus, root / "run"


def test_schedule_warms_up_then_decays_to_min_lr() -> None:
    lrs = [lr_at(s, lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:10]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[55] == pytest.approx(0.55) and lrs[100] == lrs[119] == 0.1


def test_end_to_end_learns_and_the_checkpoint_generates(trained: tuple[Path, Path]) -> None:
    _, run = trained
    records = read_metrics(run / "metrics.jsonl")
    for r in records:
        assert tuple(r) == RECORD_FIELDS[r["type"]], r
    evals = [r for r in records if r["type"] == "eval"]
    assert [e["step"] for e in evals] == [100, 200, 300]
    # The random slots carry ~0.3 nats/token, the floor; an untrained model is at ln(300) = 5.7.
    assert evals[-1]["val_loss"] < 0.9 and evals[-1]["best"]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]), rel=1e-6)
    assert 0 < evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    assert "likes" in evals[-1]["sample"]
    start, end = records[0], records[-1]
    assert start["type"] == "start" and start["total_steps"] == 300 and start["tokens_per_step"] == 16 * 32
    assert start["resumed_from_step"] is None and start["preset"] == "tiny"
    assert end == {"type": "end", "status": "succeeded", "step": 300, "reason": "max_steps",
                   "best_val_loss": evals[-1]["val_loss"], "best_path": str(run / "best"),
                   "last_path": str(run / "last")}
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, *range(20, 301, 20)]
    assert train[-1]["tokens_seen"] == 300 * 16 * 32 and train[-1]["eta_s"] == 0

    ckpt = load_checkpoint(run / "best")
    assert ckpt.meta["step"] == 300 and ckpt.meta["val_loss"] == evals[-1]["val_loss"]
    assert ckpt.meta["config"]["preset"] == "tiny" and len(ckpt.meta["data_fingerprint"]) == 64
    prompt = ckpt.tokenizer.encode("The red cat number 7 likes")
    out = generate(ckpt.model, prompt, 12, params=SamplingParams(temperature=0.0))
    assert any(food in ckpt.tokenizer.decode(out) for food in ("apples", "bread", "fish"))
    assert load_train_state(run / "best") is None and load_train_state(run / "last")["step"] == 300


def test_resume_continues_the_same_loss_curve(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt", 2000)
    # Dropout on, so the test also covers restoring the torch RNG, not just weights/optimizer/sampler.
    settings = {"max_steps": 40, "eval_every": 15, "log_every": 1, "warmup_steps": 5, "dropout": 0.1,
                "data_dir": str(tmp_path / "prepared")}
    Trainer(tiny_config(corpus, tmp_path / "a", **settings), progress=Progress(interactive=False)).run()

    class StopAfter(Progress):  # stands in for a SIGTERM arriving during step 20
        def step(self) -> None:
            self.count = getattr(self, "count", 0) + 1
            if self.count == 20:
                trainer.request_stop()

    trainer = Trainer(tiny_config(corpus, tmp_path / "b", **settings), progress=StopAfter(interactive=False))
    first = trainer.run()
    assert (first.status, first.reason, first.step) == ("cancelled", "signal", 20)
    resumed = Trainer(TrainConfig(**{**tiny_config(corpus, tmp_path / "b", **settings).model_dump(),
                                     "resume": str(tmp_path / "b")}), progress=Progress(interactive=False)).run()
    assert (resumed.status, resumed.step) == ("succeeded", 40)

    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 41))
    assert max(abs(a[s] - b[s]) for s in range(1, 41)) < 1e-4
    starts = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["type"] == "start"]
    assert [s["resumed_from_step"] for s in starts] == [None, 20]


def test_cli_resume_restores_config_and_explicit_flags_override(trained: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, _ = trained
    run = tmp_path / "run"
    args = ["--data", str(corpus), "--preset", "tiny", "--block-size", "32", "--batch-size", "8",
            "--tokenizer-vocab", "300", "--max-steps", "6", "--eval-every", "3", "--out", str(run)]
    assert main(["train", *args]) == 0
    assert main(["train", *args]) == 2  # an existing run is not silently mixed into
    assert main(["train", "--resume", str(run), "--max-steps", "9"]) == 0
    meta = load_checkpoint(run / "last").meta
    assert meta["step"] == 9 and meta["config"]["batch_size"] == 8 and meta["config"]["max_steps"] == 9
    assert main(["train", *args, "--overwrite"]) == 0
    assert read_metrics(run / "metrics.jsonl")[0]["type"] == "start"  # --overwrite started a fresh file
    assert load_checkpoint(run / "last").meta["step"] == 6


def test_init_from_checkpoint_starts_from_its_weights(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = trained
    new_text = write_corpus(tmp_path / "more.txt", 1500)
    new_text.write_text(structured_corpus(1500, seed=7))
    cfg = TrainConfig(data=[str(new_text)], out=str(tmp_path / "ft"), init_from=str(run / "best"), max_steps=10,
                      log_every=1, eval_every=10, batch_size=8, lr=1e-4, min_lr=1e-5, warmup_steps=0, device="cpu")
    Trainer(cfg, progress=Progress(interactive=False)).run()
    base, ft = load_checkpoint(run / "best"), load_checkpoint(tmp_path / "ft" / "last")
    assert ft.config == base.config and ft.tokenizer.to_str() == base.tokenizer.to_str()
    first_loss = train_losses(tmp_path / "ft")[1]
    assert first_loss < 1.5  # a fresh model would start near ln(vocab) = 5.7
    start = read_metrics(tmp_path / "ft" / "metrics.jsonl")[0]
    assert start["resumed_from_step"] is None and start["preset"] == "tiny" and ft.meta["step"] == 10


def test_eval_command_reports_loss_bleu_and_rouge(trained: tuple[Path, Path], capsys) -> None:
    corpus, run = trained
    assert main(["eval", "--checkpoint", str(run / "best"), "--data", str(corpus), "--json",
                 "--max-tokens", "4000", "--n-prompts", "6", "--prompt-tokens", "16", "--reference-tokens", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 300 and result["tokens"] == 3999 and result["prompts"] == 6
    assert result["loss"] < 1.0 and result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] /
                                                    (math.log(2) * result["bytes"]))
    # Continuations get the sentence frame right and the random slots mostly wrong; garbage would score ~0.
    assert 5 < result["bleu"] <= 100 and 30 < result["rouge1"] <= 100
    assert len(result["examples"]) == 3
    assert main(["eval", "--checkpoint", str(run / "best"), "--data", str(corpus), "--max-tokens", "500",
                 "--n-prompts", "2"]) == 0
    assert "bits per byte" in capsys.readouterr().out


def test_eval_prompts_file_and_chinese_scoring(trained: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    from pocketgpt.training.evaluate import RougeTokenizer, text_metrics

    assert RougeTokenizer().tokenize("床前明月光, Moon light!") == ["床", "前", "明", "月", "光", "moon", "light"]
    perfect = text_metrics(["床前明月光，疑是地上霜。"], ["床前明月光，疑是地上霜。"])
    assert perfect["bleu"] == pytest.approx(100) and perfect["rouge1"] == pytest.approx(100)
    assert text_metrics(["床前明月光"], ["低头思故乡"])["rouge1"] == 0
    _, run = trained
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "The red cat number 3 likes", "reference": " fish."}) + "\n")
    assert main(["eval", "--checkpoint", str(run / "best"), "--prompts", str(prompts), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 1 and "loss" not in result and 0 <= result["bleu"] <= 100


def test_nan_loss_is_an_error_record(tmp_path: Path, capsys) -> None:
    corpus = write_corpus(tmp_path / "c.txt", 500)
    out = tmp_path / "run"
    rc = main(["--data", str(corpus), "--preset", "tiny", "--block-size", "16", "--tokenizer-vocab", "300",
               "--lr", "1e30", "--min-lr", "1e30", "--grad-clip", "0", "--max-steps", "50", "--log-every", "5",
               "--out", str(out)])
    assert rc == 1
    last = read_metrics(out / "metrics.jsonl")[-1]
    assert last["type"] == "error" and "diverged" in last["message"]


def test_checkpoint_train_state_loads_with_weights_only(trained: tuple[Path, Path]) -> None:
    state = load_train_state(trained[1] / "last")
    assert set(state) >= {"step", "tokens_seen", "best_val_loss", "optimizer", "sampler", "rng", "world_size"}
    assert isinstance(state["rng"]["python"]["state"], torch.Tensor)
