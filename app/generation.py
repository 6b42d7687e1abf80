"""One generation on the asyncio side: validate against the served model, admit, relay events, time it.

Both HTTP routes and `pocketgpt generate` go through here, so they share the checks, the metrics and the
result shape. Everything that can refuse a request (no model, too long, queue full) happens in `start`,
before any response byte is sent, so those errors are real HTTP statuses.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.grammar import Constraint, GrammarError, GrammarSpec
from pocketgpt.app.engine.holder import EngineHolder
from pocketgpt.app.engine.types import (
    DoneEvent,
    EngineClosed,
    ErrorEvent,
    GenRequest,
    Logprob,
    PromptEvent,
    QueueFull,
    Ticket,
    TokenEvent,
)
from pocketgpt.app.errors import APIError
from pocketgpt.app.logprob_format import logprob_dict
from pocketgpt.app.metrics import Metrics
from pocketgpt.model.sampling import SamplingParams


def random_seed() -> int:
    return secrets.randbits(31)


# How a request that is not plain text (chat messages) becomes prompt ids for one engine, plus extra token ids
# that end the output. Called at admission with the engine that will run it, so the ids always come from that
# engine's tokenizer, even across a model swap; it may raise APIError (e.g. 400: the model has no chat template).
PromptRenderer = Callable[[Engine], tuple[list[int], tuple[int, ...]]]


@dataclass(frozen=True)
class GenerationSpec:
    """A validated request, independent of the route that received it."""

    prompt: str
    max_new_tokens: int
    params: SamplingParams
    seed: int
    stop: tuple[str, ...] = ()
    max_tokens_param: str = "max_new_tokens"  # the field name to blame when the context overflows
    render: PromptRenderer | None = None  # None: the prompt is `prompt`, encoded as text
    clip_to_context: bool = False  # lower max_new_tokens to the room the prompt leaves (max_tokens not given)
    model: str | None = None  # the model the client named (OpenAI routes); None: whichever is served
    logprobs: int | None = None  # each sampled token's logprob and this many alternatives (None: off)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo); the prompt is then not healed
    grammar: GrammarSpec | None = None  # structured output: the output must match it
    grammar_param: str = "response_format"  # the field to blame when the grammar cannot be compiled
    n: int = 1  # choices sharing one prefill; choice i is sampled with seed + i


def model_names(served: str) -> tuple[str, ...]:
    """The names a served model answers to: its id, and for a run's `best`/`last` checkpoint (`starter/best`)
    the run's name too (`starter`), the name people use for it."""
    run, _, leaf = served.rpartition("/")
    return (served, run) if run and leaf in ("best", "last") else (served,)


# What `encode_prompt` computes for one engine: prompt ids, extra stop ids, healed bytes, the grammar's matcher.
Encoded = tuple[list[int], tuple[int, ...], bytes, Constraint | None]
Prepared = tuple[Engine, Encoded]  # what `prepare` computed, and for which engine


def encode_prompt(engine: Engine, spec: GenerationSpec) -> Encoded:
    """Prompt ids for `engine` (rendered chat messages, or the text prompt), extra stop ids, healed bytes and the
    structured-output constraint compiled for its tokenizer (400 if it cannot be compiled)."""
    constraint = compile_constraint(engine, spec)
    if spec.render:
        ids, stop_ids = spec.render(engine)
        return ids, stop_ids, b"", constraint
    # A prompt is text: "<|endoftext|>" typed in it is those 13 characters, not the special token.
    ids = engine.tokenizer.encode_prompt(spec.prompt, allow_special=False)
    if constraint is not None:  # no token healing: the grammar, not the healed bytes, says what comes first
        return ids, (), b"", constraint
    if spec.prompt_logprobs is not None:  # scored as written: healing would drop its last token
        return ids, (), b"", None
    ids, heal = engine.tokenizer.heal_prompt(ids)
    return ids, (), heal, None


def compile_constraint(engine: Engine, spec: GenerationSpec) -> Constraint | None:
    """A fresh matcher for the spec's grammar (compiled once per grammar and engine, then cached), or None."""
    if spec.grammar is None:
        return None
    try:
        return engine.grammars.constraint(spec.grammar)
    except GrammarError as exc:
        raise APIError(400, f"{spec.grammar_param} cannot be used for structured output: {str(exc)[:1000]}",
                       param=spec.grammar_param, code="invalid_grammar") from None


async def prepare(holder: EngineHolder, spec: GenerationSpec) -> Prepared | None:
    """Tokenize `spec` for the current engine in a worker thread, so a long prompt or conversation does not stall
    the event loop (and the other streams); `Generation.start` uses it unless a swap changed the engine since."""
    engine = holder.current
    if engine is None:
        return None
    check_model(spec.model, engine.name)  # a 404 needs no tokenizing
    return engine, await asyncio.to_thread(encode_prompt, engine, spec)


def check_model(requested: str | None, served: str) -> None:
    """404 `model_not_found` (OpenAI's and vLLM's answer) unless `requested` is absent or names the served model."""
    if requested is not None and requested not in model_names(served):
        raise APIError(404, f"The model {requested[:200]!r} does not exist: this server serves {served!r} "
                       "(see GET /v1/models).", type="invalid_request_error", param="model", code="model_not_found")


@dataclass
class GenerationResult:
    id: str
    model: str
    text: str
    finish_reason: str
    stop_sequence: str | None
    seed: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_ms: float | None
    total_ms: float
    tokens_per_s: float
    token_ids: list[int] = field(default_factory=list)  # the sampled tokens (an end-of-text token included)
    logprobs: list[Logprob] | None = None  # one per sampled token, when asked for
    prompt_logprobs: list[Logprob | None] | None = None  # one per prompt token (the first None), when asked for
    index: int = 0  # which choice of the request

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def openai_usage(self) -> dict[str, Any]:
        """`usage` as the OpenAI API reports it, with the prompt tokens served by the prefix cache."""
        return {**self.usage(), "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def timings(self) -> dict[str, float | None]:
        ttft = None if self.ttft_ms is None else round(self.ttft_ms, 3)
        return {"ttft_ms": ttft, "total_ms": round(self.total_ms, 3), "tokens_per_s": round(self.tokens_per_s, 3)}

    def to_dict(self) -> dict[str, Any]:
        """The /v1/generate response body (also the `done` event's data)."""
        body = {
            "id": self.id, "model": self.model, "text": self.text, "finish_reason": self.finish_reason,
            "stop_sequence": self.stop_sequence, "seed": self.seed, "usage": self.usage(), "timings": self.timings(),
        }
        if self.logprobs is not None:
            body["logprobs"] = [logprob_dict(e) for e in self.logprobs]
        return body


class Generation:
    """A running request and its n choices: iterate `events()` or `tokens()` (or await `collect()`). Once every
    choice finished, `results` holds one result per choice and `result` is choice 0's."""

    def __init__(self, tickets: list[Ticket], engine: Engine, spec: GenerationSpec, metrics: Metrics | None,
                 started: float) -> None:
        self.tickets = tickets
        self.ticket = tickets[0]  # the choices share its queue
        self.engine = engine
        self.spec = spec
        self.metrics = metrics
        self.started = started
        self.id = f"gen-{self.ticket.id}"
        self.model = engine.name
        self.n = len(tickets)
        self.prompt_tokens = len(self.ticket.request.prompt_ids)
        self.result: GenerationResult | None = None
        self.results: list[GenerationResult | None] = [None] * self.n
        self.error: APIError | None = None
        self._parts: list[list[str]] = [[] for _ in tickets]
        self._ids: list[list[int]] = [[] for _ in tickets]
        asked = self.ticket.request.logprobs is not None
        self._logprobs: list[list[Logprob] | None] = [[] if asked else None for _ in tickets]
        # The prompt's logprobs (one prefill, so the same for every choice): set before the first token, when asked.
        self.prompt_logprobs: list[Logprob | None] | None = None
        self._first: list[float | None] = [None] * self.n
        self._last: list[float | None] = [None] * self.n
        self._done = False
        self._aborted = False

    @classmethod
    def start(cls, holder: EngineHolder, spec: GenerationSpec, *, timeout: float | None = None,
              metrics: Metrics | None = None, retry_after: int = 1, prepared: Prepared | None = None) -> Generation:
        """Tokenize for the current model (or take `prepared`, see `prepare`), check the context length and
        admit; raises APIError.

        429 (queue full, also when the n choices do not fit) carries `Retry-After: retry_after`; 503 means no
        model is loaded; 422 `n_too_large` when n is beyond the model's KV slots.
        """
        started = time.perf_counter()
        for _ in range(5):  # a swap can close an engine between reading `current` and submitting to it
            engine = holder.current
            if engine is None:
                raise APIError(503, "the model is not loaded yet", code="model_not_ready")
            check_model(spec.model, engine.name)
            if spec.n > engine.max_running:  # the choices are decoded together: each needs a slot at once
                raise APIError(422, f"n is {spec.n}; this server decodes at most {engine.max_running} sequences "
                               "at once (POCKETGPT_MAX_RUNNING)", param="n", code="n_too_large")
            if prepared is not None and prepared[0] is engine:
                ids, stop_ids, heal, constraint = prepared[1]
            else:
                ids, stop_ids, heal, constraint = encode_prompt(engine, spec)
            n, m, limit = len(ids), spec.max_new_tokens, engine.context_length
            if spec.clip_to_context and n < limit:
                m = min(m, limit - n)
            if n + m > limit:
                raise APIError(
                    422, f"prompt is {n} tokens and {spec.max_tokens_param} is {m}: {n + m} tokens exceed the "
                    f"model's context length of {limit}", param="prompt" if n >= limit else spec.max_tokens_param,
                    code="context_length_exceeded")
            if constraint is not None and spec.n > 1:  # a constraint holds one output's parser state
                raise APIError(400, "n > 1 with structured output is not supported yet: send n = 1",
                               param="n", code="unsupported_parameter")
            request = GenRequest(ids, m, spec.params, spec.seed, spec.stop, timeout, stop_ids=stop_ids, heal=heal,
                                 constraint=constraint, logprobs=spec.logprobs, prompt_logprobs=spec.prompt_logprobs)
            try:
                tickets = engine.submit_choices(request, spec.n)
            except EngineClosed:
                continue
            except QueueFull as exc:
                if metrics is not None:
                    metrics.rejected.labels(reason="queue_full").inc()
                raise APIError(429, f"server busy: {exc}; retry shortly", code="queue_full",
                               headers={"Retry-After": str(retry_after)}) from exc
            if metrics is not None:
                metrics.prompt_tokens.inc(n)
            return cls(tickets, engine, spec, metrics, started)
        raise APIError(503, "the model is being swapped; retry shortly", code="model_swapping",
                       headers={"Retry-After": str(retry_after)})

    async def events(self, finishes: bool = True) -> AsyncIterator[TokenEvent | DoneEvent]:
        """Token events of every choice as the engine samples them (interleaved; `event.choice` says whose) and,
        with `finishes`, each choice's DoneEvent when it ends; raises APIError if the engine fails a choice
        (the others are cancelled).

        Leaving the loop early (client gone, task cancelled) cancels the request in the engine.
        """
        try:
            while not self._done:
                event = await self.ticket.queue.get()
                if isinstance(event, TokenEvent):
                    self._on_token(event)
                    yield event
                elif isinstance(event, PromptEvent):
                    self.prompt_logprobs = list(event.logprobs)
                elif isinstance(event, DoneEvent):
                    self._on_done(event)
                    if finishes:
                        yield event
                elif isinstance(event, ErrorEvent):
                    self.error = APIError(event.status, event.message, code=event.code)
                    self.cancel()
                    raise self.error
        finally:
            if not self._done:
                self.cancel()

    def tokens(self) -> AsyncIterator[TokenEvent]:
        """Token events only (see `events`)."""
        return self.events(finishes=False)  # type: ignore[return-value]

    async def collect(self) -> GenerationResult:
        """Run to the end and return choice 0's result (`finals()` has every choice's)."""
        async for _ in self.events(finishes=False):
            pass
        return self.final()

    def final(self) -> GenerationResult:
        """Choice 0's result once `tokens()` has run out; APIError 500 if the request ended without one."""
        return self.finals()[0]

    def finals(self) -> list[GenerationResult]:
        """Every choice's result, in choice order, once the request finished; APIError 500 if it was cancelled."""
        if self.result is None:
            raise APIError(500, "the generation ended without a result (it was cancelled)", code="cancelled")
        return self.results  # type: ignore[return-value]  # all set once `result` is

    def usage(self) -> dict[str, int]:
        """Usage as OpenAI counts n choices: the prompt once, the completions' tokens summed."""
        results = self.finals()
        completion = sum(r.completion_tokens for r in results)
        prompt = results[0].prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def openai_usage(self) -> dict[str, Any]:
        """`usage` as the OpenAI API reports it, with the prompt tokens served by the prefix cache."""
        return {**self.usage(), "prompt_tokens_details": {"cached_tokens": self.finals()[0].cached_tokens}}

    def to_dict(self) -> dict[str, Any]:
        """The /v1/generate response body: choice 0's fields at the top (the n=1 shape); with n > 1 also every
        choice under `choices`, and usage and timings over all of them."""
        results = self.finals()
        body = results[0].to_dict()
        if self.n > 1:
            total = max(r.total_ms for r in results)
            ttfts = [r.ttft_ms for r in results if r.ttft_ms is not None]
            body["usage"] = self.usage()
            body["timings"] = {"ttft_ms": round(min(ttfts), 3) if ttfts else None, "total_ms": round(total, 3),
                               "tokens_per_s": round(body["usage"]["completion_tokens"] / total * 1000, 3)}
            body["choices"] = [{"index": r.index, "text": r.text, "finish_reason": r.finish_reason,
                                "stop_sequence": r.stop_sequence, "seed": r.seed,
                                "completion_tokens": r.completion_tokens,
                                **({"logprobs": [logprob_dict(e) for e in r.logprobs]} if r.logprobs is not None
                                   else {})} for r in results]
        return body

    def cancel(self) -> None:
        """Drop the request (every unfinished choice) from the engine (idempotent)."""
        if not self._done:
            self._done = True
            for ticket, result in zip(self.tickets, self.results, strict=True):
                if result is None:
                    ticket.cancel()

    @property
    def finished(self) -> bool:
        """Done, failed, cancelled or aborted: nothing more will be read from the engine."""
        return self._done or self._aborted

    def abort(self, error: APIError) -> None:
        """End the request now with `error` (server shutdown): the reader gets the tokens already queued, then
        `error`, exactly as if the engine had failed it; the engine drops it before its next step."""
        if self.finished:
            return
        self._aborted = True
        self.ticket.queue.put_nowait(ErrorEvent(error.status, error.message, error.code or "aborted"))
        for ticket, result in zip(self.tickets, self.results, strict=True):
            if result is None:
                ticket.cancel()

    def _on_token(self, event: TokenEvent) -> None:
        c = event.choice
        self._parts[c].append(event.text)
        self._ids[c].append(event.id)
        logprobs = self._logprobs[c]
        if logprobs is not None and event.logprob is not None:
            logprobs.append(event.logprob)
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
            if self._last[c] is not None:
                self.metrics.itl.observe(event.t - self._last[c])
            elif all(t is None for t in self._last):  # the request's first token, whichever choice
                self.metrics.ttft.observe(event.t - self.started)
        if self._first[c] is None:
            self._first[c] = event.t
        self._last[c] = event.t

    def _on_done(self, event: DoneEvent) -> None:
        c = event.choice
        total = max(event.t - self.started, 1e-9)
        first = self._first[c]
        self.results[c] = GenerationResult(
            id=self.id, model=self.model, text="".join(self._parts[c]), finish_reason=event.finish_reason,
            stop_sequence=event.stop_sequence, seed=self.spec.seed + c, prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens, cached_tokens=event.cached_tokens,
            ttft_ms=None if first is None else (first - self.started) * 1000,
            total_ms=total * 1000, tokens_per_s=event.completion_tokens / total, index=c,
            token_ids=self._ids[c], logprobs=self._logprobs[c], prompt_logprobs=self.prompt_logprobs,
        )
        if all(r is not None for r in self.results):
            self._done = True
            self.result = self.results[0]


async def wait_or_cancel(generation: Generation, disconnected: asyncio.Future[Any]) -> GenerationResult | None:
    """Collect the result, or cancel the generation and return None when `disconnected` resolves first."""
    collect = asyncio.ensure_future(generation.collect())
    done, _ = await asyncio.wait({collect, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    if collect in done:
        disconnected.cancel()
        return collect.result()
    collect.cancel()
    generation.cancel()
    return None
