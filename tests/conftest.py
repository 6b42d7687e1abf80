"""Shared fixtures: small corpora and tiny checkpoints made on the spot (no downloads, no ../shared)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pocketgpt.model.checkpoint import save_checkpoint
from pocketgpt.model.config import ModelConfig
from pocketgpt.model.gpt import GPT
from pocketgpt.model.tokenizer import Tokenizer, train_tokenizer

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be, or not to be, that is the question. All that glitters is not gold. "
)
CHINESE = "床前明月光，疑是地上霜。举头望明月，低头思故乡。白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
CODE = "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
EMOJI = "🚀 launch 🎉 party 👍🏽 ok 👨‍👩‍👧 family "


def small_corpus(repeat: int = 30) -> list[str]:
    """A few KB of mixed English, Chinese, code and emoji."""
    return [ENGLISH, CHINESE, CODE, EMOJI] * repeat


def make_tiny_checkpoint(
    path: Path, vocab_size: int = 400, block_size: int = 128, seed: int = 0, **overrides
) -> Path:
    """Write a randomly initialised tiny checkpoint (sharpened so greedy decoding is not a coin toss)."""
    tok = train_tokenizer(small_corpus(), vocab_size=vocab_size)
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"vocab_size": tok.vocab_size, "n_layer": 2, "n_head": 2, "n_embd": 32,
                         "block_size": block_size, **overrides})
    model = GPT(cfg)
    with torch.no_grad():
        model.wte.weight.mul_(20)
    return save_checkpoint(path, model, tok, meta={"step": 0, "tokens_seen": 0})


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_tokenizer(small_corpus(), vocab_size=400)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint directory shared by tests that only read it."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread, and stay fast when other work shares the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
