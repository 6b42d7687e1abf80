"""What crosses between the HTTP side and the decode thread: requests in, events out."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Literal

from pocketgpt.model.sampling import SamplingParams

FinishReason = Literal["eos", "stop_sequence", "length"]


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full: refuse now (429) rather than queue without bound."""


class EngineClosed(Exception):
    """The engine no longer admits requests (it is being swapped out or stopped): use the current one."""


@dataclass(frozen=True)
class GenRequest:
    """One generation, already tokenized and validated against the engine's context length."""

    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    stop: tuple[str, ...] = ()
    timeout: float | None = None  # seconds from submission; None: no limit
    stop_ids: tuple[int, ...] = ()  # tokens that end the output like end-of-text (a chat turn's end marker)
    heal: bytes = b""  # token healing: the first generated token must start with these bytes (cut from the prompt)
    logprobs: int | None = None  # each sampled token's log-probability and this many top alternatives (None: off)
    prompt_logprobs: int | None = None  # the same for every prompt token (a PromptEvent); None: off
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class Logprob:
    """One position's token, its log-probability under the model, and the `k` most likely tokens there
    ((id, log-probability), most likely first). Log-probabilities are of the raw model distribution."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token. `text` is the newly safe text (whole characters, no possible stop-string start)."""

    index: int
    id: int
    text: str
    t: float  # time.perf_counter() when the token was sampled
    logprob: Logprob | None = None  # only when the request asked for logprobs


@dataclass(frozen=True)
class PromptEvent:
    """The prompt's log-probabilities (requests with `prompt_logprobs`), before the first token: one per prompt
    token, the first None (nothing predicts it)."""

    logprobs: tuple[Logprob | None, ...]


@dataclass(frozen=True)
class DoneEvent:
    """The request finished normally; its slot is already free."""

    finish_reason: FinishReason
    stop_sequence: str | None
    prompt_tokens: int
    completion_tokens: int
    t: float
    cached_tokens: int = 0  # prompt tokens whose keys came from the prefix cache


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed inside the engine (timeout, shutdown, a failed step); its slot is already free."""

    status: int
    message: str
    code: str


Event = TokenEvent | PromptEvent | DoneEvent | ErrorEvent


class Ticket:
    """The caller's handle on a submitted request: events arrive on `queue` in the caller's event loop."""

    def __init__(self, engine: object, request: GenRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    @property
    def id(self) -> str:
        return self.request.id

    def cancel(self) -> None:
        """Ask the engine to drop this request; its slot is freed before the next step."""
        self.engine.cancel(self.request.id)  # type: ignore[attr-defined]
