"""Delivery: sampled tokens in, events on each request's asyncio queue out.

Per token it releases the text that is safe to send (whole UTF-8 characters, no possible stop-string start),
ends a request on end-of-text, a stop token, a stop string, its length or a complete structured output, frees
its slot, and counts how it finished. Events are collected during a loop turn and handed over in one
thread-safe call per event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from typing import TYPE_CHECKING

from pocketgpt.app.engine.scheduler import Scheduler, Sequence
from pocketgpt.app.engine.types import DoneEvent, ErrorEvent, Event, FinishReason, PromptEvent, Ticket, TokenEvent

if TYPE_CHECKING:
    from pocketgpt.app.metrics import Metrics


def _put_all(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for q, event in items:
        q.put_nowait(event)


class Output:
    """Turns tokens and failures into events; retires finished sequences from `scheduler`."""

    def __init__(self, scheduler: Scheduler, eot_id: int, metrics: Metrics | None = None,
                 end_ids: tuple[int, ...] = ()) -> None:
        self.scheduler = scheduler
        self.eot_id = eot_id
        self.end_ids = frozenset((eot_id, *end_ids))  # end of text and any end-of-turn the model has
        self.metrics = metrics
        self._outbox: list[tuple[Ticket, Event]] = []
        self.finished: list[tuple[Sequence, int]] = []  # (sequence, the slot it held) ended normally this turn

    def deliver(self, rows: list[Sequence], tokens: list[list[int]], now: float) -> None:
        """Hand each row its tokens (one, or several from a verified draft), up to where its request ends."""
        for seq, row in zip(rows, tokens, strict=True):
            for token in row:
                if self._advance(seq, token, now):
                    break

    def _advance(self, seq: Sequence, token: int, now: float) -> bool:
        """One token to its request; retire the request on end-of-text, a stop string or its length.
        Returns whether the request is finished."""
        index = seq.generated
        if index == 0 and seq.request.prompt_logprobs is not None:
            self._emit(seq, PromptEvent(tuple(seq.prompt_logprobs), seq.ticket.choice))
            if seq.request.max_new_tokens == 0:  # scoring a prompt: its logprobs are the answer, `token` unused
                self._retire(seq, "length", None, now)
                return True
        seq.generated += 1
        if seq.history is not None:
            seq.history.append(token)
        if token in self.end_ids or token in seq.request.stop_ids:  # stop_ids: e.g. a chat template's end
            text, stop = seq.text.finish()
            reason: FinishReason | None = "stop_sequence" if stop else "eos"
        else:
            constraint = seq.request.constraint
            if constraint is not None and not constraint.advance(token):  # the mask makes this a bug, not input
                self.fail(seq, 500, f"structured output failed: {constraint.error}", "constraint_error")
                return True
            complete = constraint is not None and constraint.done  # the grammar takes nothing more: the end
            text, stop = seq.text.push(token)
            reason = "stop_sequence" if stop else None
            if reason is None and (complete or seq.generated >= seq.request.max_new_tokens):
                tail, stop = seq.text.finish()
                text += tail
                reason = "stop_sequence" if stop else "eos" if complete else "length"
        logprob = seq.logprobs.pop(0) if seq.request.logprobs is not None else None
        self._emit(seq, TokenEvent(index, token, text, now, logprob, seq.ticket.choice))
        if reason is None:
            seq.next_token = token
            return False
        self._retire(seq, reason, stop, now)
        return True

    def _retire(self, seq: Sequence, reason: FinishReason, stop: str | None, now: float) -> None:
        self.finished.append((seq, seq.slot))
        self.count_finish(reason)  # counted before the slot frees, so the metrics never show it free but uncounted
        self.scheduler.remove(seq)
        self._emit(seq, DoneEvent(reason, stop, len(seq.request.prompt_ids), seq.generated, now, seq.cached,
                                  seq.ticket.choice))

    def fail(self, seq: Sequence, status: int, message: str, code: str) -> None:
        """End `seq` with an error event and free its slot."""
        self.count_finish(code)
        self.scheduler.remove(seq)
        self._emit(seq, ErrorEvent(status, message, code, seq.ticket.choice))

    def count_finish(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.finished.labels(reason=reason).inc()

    def _emit(self, seq: Sequence, event: Event) -> None:
        self._outbox.append((seq.ticket, event))

    def flush(self) -> None:
        """Deliver this turn's events: one thread-safe call per event loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = defaultdict(list)
        for ticket, event in self._outbox:
            by_loop[ticket.loop].append((ticket.queue, event))
        self._outbox.clear()
        for loop, items in by_loop.items():
            # A closed event loop raises RuntimeError: nobody is listening there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, items)
