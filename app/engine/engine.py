"""The decode thread: continuous batching over the slot KV cache.

One thread owns the model and the cache. Each turn of its loop it applies new requests and cancellations
from the inbox, times out overdue requests, admits waiting requests into free slots, runs one batched decode
step over every running slot (each row at its own position), prefills prompt chunks within a token budget,
samples every row with its own parameters and generator in one call, and hands the new tokens to each
request's asyncio queue. With nothing to do it blocks on the inbox instead of spinning.

Prefill budget: with nothing decoding a step takes up to `prefill_chunk` prompt tokens (fast time to first
token); while requests decode it takes about one token per two decoding rows (at least one granule), so a
long prompt never stalls running streams: on a CPU, where a prompt token costs about what a decode row does,
their inter-token latency rises by well under 2x while it is prefilled. Prompts are cut into chunks at fixed
multiples of `prefill_granule` whatever the load, and chunks of several prompts that start at the same
position run as one padded batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch

from pocketgpt.app.engine.graphs import GraphDecoder
from pocketgpt.app.engine.scheduler import Scheduler, Sequence
from pocketgpt.app.engine.stream import TextStream
from pocketgpt.app.engine.types import (
    DoneEvent,
    EngineClosed,
    ErrorEvent,
    Event,
    FinishReason,
    GenRequest,
    Ticket,
    TokenEvent,
)
from pocketgpt.model.checkpoint import Checkpoint
from pocketgpt.model.kv_cache import KVCache
from pocketgpt.model.sampling import make_generator, sample

if TYPE_CHECKING:
    from pocketgpt.app.metrics import Metrics

log = logging.getLogger("pocketgpt.engine")

_STOP = ("stop",)


def _deliver(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for q, event in items:
        q.put_nowait(event)


class Engine:
    """A loaded model plus the thread that serves it. Create, `start()`, `submit()`, finally `stop()`."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        max_running: int = 16,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        prefill_granule: int | None = None,
        decode_graphs: bool | None = None,
        name: str | None = None,
        metrics: Metrics | None = None,
        step_delay: float = 0.0,
    ) -> None:
        model = checkpoint.model
        if hasattr(model, "prepare_inference"):  # a GPT; tests may serve stand-ins with only forward_cached
            model = model.prepare_inference()  # the flat fast path (and [in, out] weights on CPU)
        self.model = model
        # Padded multi-prompt prefill needs `lengths`; CUDA-graph steps need `forward_batch`.
        self._padded_prefill = "lengths" in inspect.signature(model.forward_cached).parameters
        self.tokenizer = checkpoint.tokenizer
        self.config = checkpoint.config
        self.meta = checkpoint.meta
        self.path = checkpoint.path
        self.name = name or checkpoint.path.name
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.context_length = self.config.block_size
        self.max_running = max_running
        self.prefill_chunk = prefill_chunk
        # The chunk grid: small on a CPU (a chunk's cost adds to a decode step's), the whole budget on a GPU.
        if prefill_granule is None:
            prefill_granule = prefill_chunk if self.device.type == "cuda" else 16
        self.prefill_granule = max(1, min(prefill_granule, prefill_chunk))
        self.metrics = metrics
        self.step_delay = step_delay  # a test and benchmark hook: emulate a slower model
        self.eot_id = self.tokenizer.eot_id
        self._text_vocab = self.tokenizer.vocab_size  # ids beyond it (a padded embedding) are never sampled
        self._heal_masks: dict[bytes, torch.Tensor] = {}  # token-healing prefix -> allowed first tokens

        self.cache = KVCache.for_model(self.model, n_slots=max_running)
        # Decode steps from CUDA graphs on a GPU (default); on a CPU the same static step runs eagerly when asked
        # for (tests), though the dynamic path is faster there.
        if decode_graphs is None:
            decode_graphs = self.device.type == "cuda"
        use_graphs = decode_graphs and hasattr(model, "forward_batch")
        self._graphs = GraphDecoder(self.model, self.cache) if use_graphs else None
        vocab = self.config.vocab_size
        # Penalty state per slot, kept on the device; only rows of penalized requests are kept up to date.
        self._counts = torch.zeros(max_running, vocab, dtype=torch.int32, device=self.device)
        self._prompt_mask = torch.zeros(max_running, vocab, dtype=torch.bool, device=self.device)

        self.scheduler = Scheduler(max_running, max_queue)
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._outbox: list[tuple[Ticket, Event]] = []
        self._stopping = False
        self.steps = 0  # batched model steps taken
        self.wakeups = 0  # loop turns, busy or not: a test can see that an idle engine does not spin
        self._thread = threading.Thread(target=self._run, name=f"pocketgpt-engine-{self.name}", daemon=True)

    # -- any thread -------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, request: GenRequest, loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Queue a request; raises QueueFull (answer 429) or EngineClosed (use the holder's current engine)."""
        n = len(request.prompt_ids)
        if n == 0 or n + request.max_new_tokens > self.context_length:
            raise ValueError(f"prompt ({n}) + max_new_tokens ({request.max_new_tokens}) "
                             f"must be within 1..{self.context_length}")
        ticket = Ticket(self, request, loop or asyncio.get_running_loop())
        # The lock orders admissions against stop(): nothing can enter the inbox after the stop marker.
        with self.scheduler.lock:
            if not self._thread.is_alive():
                raise EngineClosed("the engine thread is not running")
            self.scheduler.reserve()
            self._inbox.put(("submit", ticket, time.perf_counter()))
        return ticket

    def cancel(self, request_id: str) -> None:
        """Drop a request (client gone); its slot is freed before the next step. Unknown ids are ignored."""
        self._inbox.put(("cancel", request_id))

    def close(self) -> None:
        """Admit nothing more; requests already in keep running (drain)."""
        with self.scheduler.lock:
            self.scheduler.close()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the thread (outstanding requests get an error event) and release the model and cache."""
        with self.scheduler.lock:
            self.scheduler.close()
            self._inbox.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.model = self.cache = self._graphs = None  # type: ignore[assignment]
        self._counts = self._prompt_mask = None  # type: ignore[assignment]

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def outstanding(self) -> int:
        """Requests admitted and not yet finished."""
        return self.scheduler.outstanding

    @property
    def running(self) -> int:
        """Requests holding a KV slot (prefilling or decoding)."""
        return len(self.scheduler.running)

    @property
    def waiting(self) -> int:
        return max(0, self.outstanding - self.running)

    def info(self) -> dict[str, Any]:
        """What GET /info reports about the model."""
        return {
            "model": self.name,
            "checkpoint": str(self.path),
            "config": self.config.to_dict(),
            "context_length": self.context_length,
            "parameters": sum(p.numel() for p in self.model.parameters()) if self.model is not None else None,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "meta": {k: v for k, v in self.meta.items() if k in ("step", "tokens_seen", "created", "val_loss")},
        }

    # -- the decode thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._pull(block=not self.scheduler.has_work())
                if self._stopping:
                    break
                self._expire(time.perf_counter())
                self._admit()
                if self.scheduler.running:
                    try:
                        self._step()
                    except Exception as exc:  # a failed step must not kill the thread: fail the batch
                        log.exception("engine step failed")
                        for seq in list(self.scheduler.running.values()):
                            self._fail(seq, 500, f"generation failed: {exc}", "engine_error")
                self._flush()
                if self.step_delay:
                    time.sleep(self.step_delay)
        finally:
            # Whatever ended the loop (stop, or a bug outside a step), admit nothing more and fail everything
            # still held, including requests that entered the inbox just before admission closed.
            with self.scheduler.lock:
                self.scheduler.close()
            self._pull(block=False)
            for seq in list(self.scheduler.all()):
                self._fail(seq, 503, "the model is being unloaded", "engine_stopped")
            self._flush()

    def _pull(self, block: bool) -> None:
        """Apply everything in the inbox; wait for the first item when there is nothing else to do."""
        items = [self._inbox.get()] if block else []
        self.wakeups += 1
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if item[0] == "submit":
                _, ticket, submitted = item
                req = ticket.request
                self.scheduler.add(Sequence(
                    ticket=ticket,
                    text=TextStream(self.tokenizer, req.stop, skip=req.heal),
                    generator=make_generator(req.seed),
                    deadline=submitted + req.timeout if req.timeout else None,
                    submitted=submitted,
                ))
            elif item[0] == "cancel":
                seq = self.scheduler.find(item[1])
                if seq is not None:
                    self.scheduler.remove(seq)
                    self._count_finish("cancelled")
            else:
                self._stopping = True

    def _expire(self, now: float) -> None:
        for seq in self.scheduler.all():
            if seq.deadline is not None and now > seq.deadline:
                self._fail(seq, 504, f"request timed out after {seq.request.timeout:g}s", "request_timeout")

    def _admit(self) -> None:
        for seq in self.scheduler.admit():
            req = seq.request
            if req.params.penalized:
                self._counts[seq.slot].zero_()
                self._prompt_mask[seq.slot].zero_()
                self._prompt_mask[seq.slot, torch.tensor(req.prompt_ids, device=self.device)] = True

    @torch.inference_mode()
    def _step(self) -> None:
        """One batched step: decode every running row, prefill what the budget allows, sample all at once."""
        rows: list[Sequence] = self.scheduler.decode_rows()
        parts: list[torch.Tensor] = []
        if rows:
            slots, positions = [s.slot for s in rows], [s.pos for s in rows]
            if self._graphs is not None:
                parts.append(self._graphs.step(slots, [s.next_token for s in rows], positions))
            else:
                idx = torch.tensor([[s.next_token] for s in rows], device=self.device)
                parts.append(self.model.forward_cached(idx, self.cache, slots, positions))
            for s in rows:
                s.pos += 1
        granule = self.prefill_granule
        budget = self.prefill_chunk if not rows else max(granule, len(rows) // 2 // granule * granule)
        for seq, logits in self._prefill(self.scheduler.prefill_plan(min(budget, self.prefill_chunk), granule)):
            rows.append(seq)
            parts.append(logits)
        if not rows:
            return  # only partial prompt chunks ran this step
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self._text_vocab < logits.size(1):
            logits[:, self._text_vocab :] = float("-inf")
        for i, seq in enumerate(rows):
            if seq.generated == 0 and seq.request.heal:
                logits[i].masked_fill_(~self._heal_mask(seq.request.heal), float("-inf"))
        params = [s.request.params for s in rows]
        penalized = any(p.penalized for p in params)
        counts = mask = slots = None
        if penalized:
            slots = torch.tensor([s.slot for s in rows], device=self.device)
            counts, mask = self._counts[slots], self._prompt_mask[slots]
        tokens = sample(logits, params, [s.generator for s in rows], counts, mask)
        if penalized:
            self._counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        now = time.perf_counter()
        self.steps += 1
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(rows))
        for seq, token in zip(rows, tokens.tolist(), strict=True):  # the one host sync of the step
            self._advance(seq, token, now)

    def _heal_mask(self, prefix: bytes) -> torch.Tensor:
        """Boolean (vocab,) mask of the tokens that may follow a healed prompt; built once per prefix."""
        mask = self._heal_masks.get(prefix)
        if mask is None:
            mask = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=self.device)
            mask[torch.tensor(self.tokenizer.ids_with_prefix(prefix), dtype=torch.long, device=self.device)] = True
            self._heal_masks[prefix] = mask
        return mask

    def _prefill(self, plan: list[tuple[Sequence, int, int]]) -> list[tuple[Sequence, torch.Tensor]]:
        """Run the planned prompt chunks; return (sequence, last-token logits) for prompts now complete.

        A prompt's chunks run in order; chunks of different prompts that start at the same position run as
        one batch, shorter ones padded at the end (the padding's keys land past the prompt and are overwritten
        before anything attends there).
        """
        done: list[tuple[Sequence, torch.Tensor]] = []
        while plan:
            wave: dict[int, list[tuple[Sequence, int, int]]] = defaultdict(list)  # start -> chunks
            later, seen = [], set()
            for item in plan:
                if item[0] in seen:
                    later.append(item)
                else:
                    seen.add(item[0])
                    wave[item[1]].append(item)
            for start, group in wave.items():
                width = max(end - s for _, s, end in group)
                if self._padded_prefill and start + width <= self.cache.max_len:
                    batches = [group]
                else:  # no room for padding (or a model that cannot take it): equal lengths together
                    by_width: dict[int, list] = defaultdict(list)
                    for item in group:
                        by_width[item[2] - item[1]].append(item)
                    batches = list(by_width.values())
                for chunks in batches:
                    width = max(end - s for _, s, end in chunks)
                    lengths = [end - s for _, s, end in chunks]
                    idx = torch.tensor([seq.request.prompt_ids[s:end] + [0] * (width - (end - s))
                                        for seq, s, end in chunks], device=self.device)
                    logits = self.model.forward_cached(
                        idx, self.cache, [seq.slot for seq, _, _ in chunks], [start] * len(chunks),
                        **({"lengths": lengths} if min(lengths) < width else {}))
                    for i, (seq, _, end) in enumerate(chunks):
                        seq.prefilled = end
                        if not seq.prefilling:
                            seq.pos = end
                            done.append((seq, logits[i : i + 1]))
            plan = later
        return done

    def _advance(self, seq: Sequence, token: int, now: float) -> None:
        """Hand one sampled token to its request; retire the request on end-of-text, a stop string or length."""
        index = seq.generated
        seq.generated += 1
        if token == self.eot_id or token in seq.request.stop_ids:  # stop_ids: e.g. a chat template's end
            text, stop = seq.text.finish()
            reason: FinishReason | None = "stop_sequence" if stop else "eos"
        else:
            text, stop = seq.text.push(token)
            reason = "stop_sequence" if stop else None
            if reason is None and seq.generated >= seq.request.max_new_tokens:
                tail, stop = seq.text.finish()
                text += tail
                reason = "stop_sequence" if stop else "length"
        self._emit(seq, TokenEvent(index, token, text, now))
        if reason is None:
            seq.next_token = token
            return
        self.scheduler.remove(seq)
        self._count_finish(reason)
        self._emit(seq, DoneEvent(reason, stop, len(seq.request.prompt_ids), seq.generated, now))

    def _fail(self, seq: Sequence, status: int, message: str, code: str) -> None:
        self.scheduler.remove(seq)
        self._count_finish(code)
        self._emit(seq, ErrorEvent(status, message, code))

    def _count_finish(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.finished.labels(reason=reason).inc()

    def _emit(self, seq: Sequence, event: Event) -> None:
        self._outbox.append((seq.ticket, event))

    def _flush(self) -> None:
        """Deliver this turn's events: one thread-safe call per event loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = defaultdict(list)
        for ticket, event in self._outbox:
            by_loop[ticket.loop].append((ticket.queue, event))
        self._outbox.clear()
        for loop, items in by_loop.items():
            # A closed event loop raises RuntimeError: nobody is listening there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)
