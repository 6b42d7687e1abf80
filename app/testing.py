"""Helpers for tests and benchmarks: a real uvicorn server in a thread, and a scripted stand-in model.

Nothing here is used by the server itself. Clients read event streams with httpx-sse (tests/sse.py).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import uvicorn
from torch import nn

from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.plan import StepPlan
from pocketgpt.app.engine.runner import Runner
from pocketgpt.app.metrics import Metrics
from pocketgpt.app.settings import Settings
from pocketgpt.model.checkpoint import Checkpoint
from pocketgpt.model.config import ModelConfig
from pocketgpt.model.kv_cache import KVCache
from pocketgpt.model.tokenizer import Tokenizer


@contextmanager
def running_server(app: Any, host: str = "127.0.0.1", startup_timeout: float = 60.0,
                   **options: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port in a background thread; yields the base URL. `options` add
    uvicorn.Config arguments (e.g. `**app.server.uvicorn_options(settings)`, or `http="h11"`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                            **{"timeout_graceful_shutdown": 2, **options})
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        if not server.started:
            raise RuntimeError("uvicorn did not start (see the log for the start-up error)")
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


class ScriptedModel(nn.Module):
    """A stand-in for GPT that ignores its input and emits a fixed script of token ids.

    The token predicted after position p is `script[p % len(script)]`, so a one-token prompt yields
    script[0], script[1], ... This lets tests drive exact byte sequences (a Chinese character split over
    three tokens, a stop string split over two) through the real engine and server.
    """

    def __init__(self, config: ModelConfig, script: list[int]) -> None:
        super().__init__()
        self.config = config
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the engine a device and dtype to read
        self.register_buffer("script", torch.tensor(script, dtype=torch.long))

    def prepare_inference(self) -> ScriptedModel:
        return self

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache: KVCache, slots: list[int], starts: list[int],
                       last_only: bool = True, lengths: list[int] | None = None) -> torch.Tensor:
        n = torch.tensor(lengths, device=idx.device) if lengths is not None else idx.size(1)
        last = torch.tensor(starts, device=idx.device) + n - 1
        nxt = self.script[last % self.script.numel()]
        logits = torch.full((idx.size(0), self.config.vocab_size), -1e4, device=idx.device)
        logits[torch.arange(idx.size(0)), nxt] = 0.0
        return logits


def slowed(delay: float) -> type[Runner]:
    """A Runner test double whose every step takes at least `delay` seconds more: a slower model, so that
    streams last long enough for a test (or a benchmark) to act on them mid-way."""

    class SlowRunner(Runner):
        def execute(self, plan: StepPlan) -> list[list[int]]:
            tokens = super().execute(plan)
            time.sleep(delay)
            return tokens

    return SlowRunner


def scripted_factory(tokenizer: Tokenizer, script: list[int], block_size: int = 128, **engine_kwargs: Any):
    """An engine factory for create_app(engine_factory=...) serving a ScriptedModel."""
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1, n_embd=8, block_size=block_size)

    def factory(path: Path, settings: Settings, metrics: Metrics) -> Engine:
        checkpoint = Checkpoint(model=ScriptedModel(config, script), config=config, tokenizer=tokenizer,
                                meta={"step": 0}, path=Path(path))
        return Engine(checkpoint, max_running=settings.max_running, max_queue=settings.max_queue,
                      prefill_chunk=settings.prefill_chunk, metrics=metrics, **engine_kwargs).start()

    return factory


def byte_token_ids(tokenizer: Tokenizer, data: bytes) -> list[int]:
    """One token per byte: the byte-level base tokens (every byte 0..255 has one)."""
    by_bytes = {}
    for i in range(tokenizer.vocab_size):
        b = tokenizer.token_bytes(i)
        if len(b) == 1:
            by_bytes.setdefault(b, i)
    return [by_bytes[bytes([b])] for b in data]
