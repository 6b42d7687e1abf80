"""What crosses between the HTTP side and the decode thread: requests in, events out."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from pocketgpt.model.sampling import SamplingParams

if TYPE_CHECKING:
    from pocketgpt.app.engine.grammar import Constraint

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
    # Structured output: the grammar's matcher (the runner masks by it, the output advances it); None: free text.
    constraint: Constraint | None = field(default=None, compare=False, repr=False)
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
    choice: int = 0  # which of the request's n choices it belongs to


@dataclass(frozen=True)
class PromptEvent:
    """The prompt's log-probabilities (requests with `prompt_logprobs`), before the first token: one per prompt
    token, the first None (nothing predicts it)."""

    logprobs: tuple[Logprob | None, ...]
    choice: int = 0


@dataclass(frozen=True)
class DoneEvent:
    """The request finished normally; its slot is already free."""

    finish_reason: FinishReason
    stop_sequence: str | None
    prompt_tokens: int
    completion_tokens: int
    t: float
    cached_tokens: int = 0  # prompt tokens whose keys came from the prefix cache
    choice: int = 0


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed inside the engine (timeout, shutdown, a failed step); its slot is already free."""

    status: int
    message: str
    code: str
    choice: int = 0


Event = TokenEvent | PromptEvent | DoneEvent | ErrorEvent


def choice_request(request: GenRequest, choice: int) -> GenRequest:
    """Choice `choice` of a request for n choices: the same request with seed `seed + choice` (so choice 0 is
    exactly the n=1 output for that seed, and choice i the n=1 output for seed + i) and its own id."""
    if choice == 0:
        return request
    return replace(request, seed=request.seed + choice, id=f"{request.id}-{choice}")


class Ticket:
    """The caller's handle on a submitted request (one choice of it): events arrive on `queue` in the caller's
    event loop. The n choices of one request share one queue; their events say which `choice` they belong to."""

    def __init__(self, engine: object, request: GenRequest, loop: asyncio.AbstractEventLoop, choice: int = 0,
                 queue: asyncio.Queue[Event] | None = None) -> None:
        self.engine = engine
        self.request = request
        self.loop = loop
        self.choice = choice
        self.queue: asyncio.Queue[Event] = queue if queue is not None else asyncio.Queue()

    @property
    def id(self) -> str:
        return self.request.id

    def cancel(self) -> None:
        """Ask the engine to drop this request; its slot is freed before the next step."""
        self.engine.cancel(self.request.id)  # type: ignore[attr-defined]
