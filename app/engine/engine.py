"""The decode thread: continuous batching over the slot KV cache.

One thread serves the model. Each turn of its loop it pulls new requests and cancellations from the inbox
(blocking there when there is nothing to do, instead of spinning), times out overdue requests, admits
waiting requests into free KV slots, and runs one step: the scheduler plans it (`Scheduler.schedule`, plain
data: decode rows and prompt chunks within the prefill budget), the runner executes it (`Runner.execute`:
the model, the cache, sampling) and the output delivers the tokens (`Output`: text, stop strings, events).
The prefix cache (`prefix_cache.py`: the scheduler decides what is cached, the runner copies the blocks) and
n-gram speculative decoding (`speculate.py`: the scheduler drafts, the runner verifies) ride on the same plan,
and so do a request's n choices (`submit_choices`): placed together, prefilled once by the first, the prompt's
keys copied into the others' slots (`StepPlan.forks`), each choice then sampled with its own generator.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pocketgpt.app.engine.grammar import GrammarCache
from pocketgpt.app.engine.output import Output
from pocketgpt.app.engine.plan import StepPlan
from pocketgpt.app.engine.prefix_cache import PrefixIndex
from pocketgpt.app.engine.runner import Runner
from pocketgpt.app.engine.scheduler import Scheduler, Sequence
from pocketgpt.app.engine.speculate import NgramDrafter, may_draft
from pocketgpt.app.engine.stream import TextStream
from pocketgpt.app.engine.types import EngineClosed, Event, GenRequest, Ticket, choice_request
from pocketgpt.model.checkpoint import Checkpoint
from pocketgpt.model.sampling import make_generator

if TYPE_CHECKING:
    from pocketgpt.app.metrics import Metrics

log = logging.getLogger("pocketgpt.engine")

_STOP = ("stop",)

RunnerFactory = Callable[..., Runner]  # Runner's signature; tests pass a test double (app.testing)


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
        lone_prefill_chunk: int | None = None,
        prefix_cache_slots: float = 0.0,
        prefix_block: int = 16,
        spec_tokens: int = 0,
        drafter: Callable[..., NgramDrafter] = NgramDrafter,
        decode_graphs: bool | None = None,
        compile_decode: bool = False,
        name: str | None = None,
        metrics: Metrics | None = None,
        runner: RunnerFactory = Runner,
    ) -> None:
        # The prefix cache's pool, sized in slots' worth of tokens: it shares the slots' memory budget.
        prefix_blocks = int(prefix_cache_slots * checkpoint.config.block_size) // prefix_block
        self.runner = runner(checkpoint.model, checkpoint.tokenizer, max_running, decode_graphs=decode_graphs,
                             prefix_blocks=prefix_blocks, prefix_block=prefix_block, compile_decode=compile_decode)
        self.tokenizer = checkpoint.tokenizer
        self.grammars = GrammarCache(self.tokenizer)  # structured output's compiled grammars (llguidance, lazily)
        self.config = checkpoint.config
        self.meta = checkpoint.meta
        self.path = checkpoint.path
        self.name = name or checkpoint.path.name
        self.device, self.dtype = self.runner.device, self.runner.dtype
        self.context_length = self.config.block_size
        self.max_running = max_running
        self.prefill_chunk = prefill_chunk
        # The chunk grid: small on a CPU (a chunk's cost adds to a decode step's), the whole budget on a GPU.
        if prefill_granule is None:
            prefill_granule = prefill_chunk if self.device.type == "cuda" else 16
        self.prefill_granule = max(1, min(prefill_granule, prefill_chunk))
        # With nothing decoding, a prompt goes in chunks this large (default: whole, up to the context).
        self.lone_prefill_chunk = max(1, lone_prefill_chunk or self.context_length)
        self.spec_tokens = spec_tokens  # n-gram speculative decoding: longest draft (0: off)
        self._drafter = drafter  # (history, k_max) -> a drafter; benchmarks pass one that always misses
        self.metrics = metrics
        self.eot_id = self.tokenizer.eot_id
        prefix = PrefixIndex(prefix_blocks, prefix_block) if prefix_blocks > 0 else None
        self.scheduler = Scheduler(max_running, max_queue, prefill_chunk, self.prefill_granule, self.runner.max_len,
                                   self.lone_prefill_chunk, prefix)
        self.output = Output(self.scheduler, self.eot_id, metrics, end_ids=self.tokenizer.stop_ids)
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._stopping = False
        self.steps = 0  # batched model steps taken
        self.prefill_tokens = 0  # prompt tokens run through the model (a request's n choices share one prefill)
        self.wakeups = 0  # loop turns, busy or not: a test can see that an idle engine does not spin
        self._thread = threading.Thread(target=self._run, name=f"pocketgpt-engine-{self.name}", daemon=True)

    @property
    def model(self) -> Any:
        """The served model (None once stopped)."""
        return self.runner.model if self.runner is not None else None

    # -- any thread -------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, request: GenRequest, loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Queue a request; raises QueueFull (answer 429) or EngineClosed (use the holder's current engine)."""
        return self.submit_choices(request, 1, loop)[0]

    def submit_choices(self, request: GenRequest, n: int,
                       loop: asyncio.AbstractEventLoop | None = None) -> list[Ticket]:
        """Queue `n` choices of one request (choice i: `types.choice_request`), which share one prefill and
        count as n requests against the queue; their events share one queue. Raises QueueFull or EngineClosed,
        and ValueError when they can never run (n beyond the slots, too long for the context)."""
        m = len(request.prompt_ids)
        if request.max_new_tokens == 0 and request.prompt_logprobs is None:
            raise ValueError("max_new_tokens 0 only scores a prompt: it needs prompt_logprobs")
        if m == 0 or m + request.max_new_tokens > self.context_length:
            raise ValueError(f"prompt ({m}) + max_new_tokens ({request.max_new_tokens}) "
                             f"must be within 1..{self.context_length}")
        if not 1 <= n <= self.max_running:  # the choices are placed together, so all n need a slot
            raise ValueError(f"n ({n}) must be within 1..{self.max_running} (the engine's slots)")
        loop = loop or asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        tickets = [Ticket(self, choice_request(request, i), loop, i, events) for i in range(n)]
        # The lock orders admissions against stop(): nothing can enter the inbox after the stop marker.
        with self.scheduler.lock:
            if not self._thread.is_alive():
                raise EngineClosed("the engine thread is not running")
            self.scheduler.reserve(n)
            self._inbox.put(("submit", tickets, time.perf_counter()))
        return tickets

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
        self.runner = None  # type: ignore[assignment]  # releases the model, cache and graphs

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
            "parameters": self.runner.n_params() if self.runner is not None else None,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "prefix_cache_tokens": self.scheduler.prefix.n_blocks * self.scheduler.prefix.block
            if self.scheduler.prefix is not None else 0,
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
                        self.scheduler.reset_prefix()  # blocks planned in the failed step may be unwritten
                        for seq in list(self.scheduler.running.values()):
                            self.output.fail(seq, 500, f"generation failed: {exc}", "engine_error")
                self.output.flush()
        finally:
            # Whatever ended the loop (stop, or a bug outside a step), admit nothing more and fail everything
            # still held, including requests that entered the inbox just before admission closed.
            with self.scheduler.lock:
                self.scheduler.close()
            self._pull(block=False)
            for seq in list(self.scheduler.all()):
                self.output.fail(seq, 503, "the model is being unloaded", "engine_stopped")
            self.output.flush()

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
                _, tickets, submitted = item
                leader, *followers = [self._sequence(ticket, submitted) for ticket in tickets]
                leader.followers = followers
                for seq in (leader, *followers):
                    seq.leader = leader if seq is not leader else None
                    self.scheduler.add(seq)
            elif item[0] == "cancel":
                seq = self.scheduler.find(item[1])
                if seq is not None:
                    self.output.count_finish("cancelled")  # before the slot frees: a watcher sees both or neither
                    self.scheduler.remove(seq)
            else:
                self._stopping = True

    def _sequence(self, ticket: Ticket, submitted: float) -> Sequence:
        req = ticket.request
        seq = Sequence(
            ticket=ticket,
            text=TextStream(self.tokenizer, req.stop, skip=req.heal),
            generator=make_generator(req.seed),
            deadline=submitted + req.timeout if req.timeout else None,
            submitted=submitted,
        )
        if self.scheduler.prefix is not None or self.spec_tokens > 0:
            seq.history = list(req.prompt_ids)
        # Greedy and sampled requests draft (verify.py keeps either exact); penalized, constrained and
        # logprob-asking ones do not (may_draft says why).
        if self.spec_tokens > 0 and may_draft(req):
            seq.drafter = self._drafter(seq.history, self.spec_tokens)
        return seq

    def _expire(self, now: float) -> None:
        for seq in self.scheduler.all():
            if seq.deadline is not None and now > seq.deadline:
                self.output.fail(seq, 504, f"request timed out after {seq.request.timeout:g}s", "request_timeout")

    def _admit(self) -> None:
        for seq in self.scheduler.admit():
            self.runner.admit(seq)
            if self.metrics is not None and self.scheduler.prefix is not None:
                self.metrics.prefix_query_tokens.inc(len(seq.request.prompt_ids))
                self.metrics.prefix_hit_tokens.inc(seq.cached)

    @property
    def prefix_cache_usage(self) -> float:
        """Fraction of the prefix cache's blocks in use (0 without a prefix cache)."""
        prefix = self.scheduler.prefix
        return prefix.used / prefix.n_blocks if prefix is not None else 0.0

    def _step(self) -> None:
        """One batched step: plan it, run it, hand the sampled tokens to their requests."""
        plan = self.scheduler.schedule()
        tokens = self.runner.execute(plan)
        self.scheduler.commit(plan, tokens)
        self.prefill_tokens += plan.prefill_tokens
        if self.metrics is not None and plan.prefill:
            self.metrics.prefill_tokens.inc(plan.prefill_tokens)
        if not tokens:
            return  # only partial prompt chunks ran this step
        self.steps += 1
        if plan.drafts:
            self._count_drafts(plan, tokens)
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(tokens))
        self.output.deliver(plan.rows, tokens, time.perf_counter())
        self._cache_finished()

    def _cache_finished(self) -> None:
        """Store the blocks of finished requests' prompt and output in the prefix cache (a chat's next turn
        starts with them), before their slots are reused."""
        finished, self.output.finished = self.output.finished, []
        prefix = self.scheduler.prefix
        if prefix is None:
            return
        for seq, slot in finished:
            if new := prefix.insert(seq.history[: seq.pos]):  # the tokens whose keys are in the slot
                self.runner.save_blocks(slot, new)

    def _count_drafts(self, plan: StepPlan, tokens: list[list[int]]) -> None:
        drafted = accepted = 0
        for seq, row in zip(plan.decode, tokens, strict=False):  # decode rows come first
            draft = plan.drafts.get(seq)
            if draft:
                seq.drafter.adapt(len(draft), len(row) - 1)
                drafted += len(draft)
                accepted += len(row) - 1
        if self.metrics is not None:
            self.metrics.spec_draft_tokens.inc(drafted)
            self.metrics.spec_accepted_tokens.inc(accepted)
