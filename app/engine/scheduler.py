"""Admission, slots, the waiting queue and each step's plan: the engine's bookkeeping, with no tensors in it.

Only `reserve`/`close` are called from other threads (under a lock); everything else belongs to the decode
thread. `schedule()` says what the next step does (a `StepPlan`), `commit(plan)` records that it was done.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from pocketgpt.app.engine.plan import Chunk, StepPlan, group_waves, prefill_budget
from pocketgpt.app.engine.prefix_cache import PrefixIndex
from pocketgpt.app.engine.speculate import NgramDrafter
from pocketgpt.app.engine.stream import TextStream
from pocketgpt.app.engine.types import EngineClosed, GenRequest, Logprob, QueueFull, Ticket


@dataclass(eq=False)
class Sequence:
    """The decode thread's state for one request."""

    ticket: Ticket
    text: TextStream
    generator: torch.Generator
    deadline: float | None
    slot: int = -1  # -1 while waiting
    prefilled: int = 0  # prompt tokens already in the cache
    cached: int = 0  # of which taken from the prefix cache
    pos: int = 0  # tokens in the cache once prefill is done
    generated: int = 0  # tokens sampled so far (an end-of-text token included)
    next_token: int | None = None  # sampled but not yet fed back through the model
    submitted: float = 0.0
    history: list[int] | None = None  # prompt and output so far (kept for speculation and the prefix cache)
    drafter: NgramDrafter | None = None  # speculative decoding for this request (greedy requests only)
    logprobs: list[Logprob] = field(default_factory=list)  # sampled tokens' logprobs not yet delivered
    prompt_logprobs: list[Logprob | None] = field(default_factory=list)  # the prompt's, as its chunks run
    # n choices of one request share one prefill: the leader prefills the prompt, then its keys are copied into
    # its followers' slots and every choice samples its first token from the same logits.
    leader: Sequence | None = None  # a follower whose prompt keys have not been copied in yet: whose it copies
    followers: list[Sequence] = field(default_factory=list)  # a leader's followers, until they are forked

    @property
    def request(self) -> GenRequest:
        return self.ticket.request

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.request.prompt_ids)


@dataclass
class Scheduler:
    """Who waits, who holds which KV slot, and which prompt chunks run this step.

    `prefill_chunk`, `granule`, `lone_chunk`: the prefill budget rule (see `plan.prefill_budget`);
    `max_len`: the cache length, which padded prompt batches must fit (see `plan.group_waves`). `prefix`:
    the prefix-cache index (None: no prefix cache).
    """

    n_slots: int
    max_queue: int
    prefill_chunk: int = 256
    granule: int = 16
    max_len: int = 0
    lone_chunk: int = 256
    prefix: PrefixIndex | None = None
    waiting: deque[Sequence] = field(default_factory=deque)
    running: dict[int, Sequence] = field(default_factory=dict)  # slot -> sequence, in admission order

    def __post_init__(self) -> None:
        self._free = list(range(self.n_slots))  # a heap: the lowest free slot first keeps batches contiguous
        self._lock = threading.Lock()
        self._outstanding = 0  # admitted and not yet finished: waiting (incl. in transit) + running
        self._open = True
        self._loads: list[tuple[Sequence, list[int]]] = []  # prefix-cache hits admitted, not yet copied

    # -- admission (any thread) ------------------------------------------------------------------
    @property
    def lock(self) -> threading.Lock:
        return self._lock

    def reserve(self, n: int = 1) -> None:
        """Count `n` more sequences in (a request's n choices count as n requests), or refuse them all. Call
        with `lock` held."""
        if not self._open:
            raise EngineClosed("engine is not admitting requests")
        if self._outstanding + n > self.n_slots + self.max_queue:
            what = f"{n} choices do not fit" if n > 1 else "no room"
            raise QueueFull(f"{what}: {self.n_slots} slots and {self.max_queue} waiting places, "
                            f"{self._outstanding} taken")
        self._outstanding += n

    def close(self) -> None:
        """Admit nothing more. Call with `lock` held."""
        self._open = False

    @property
    def outstanding(self) -> int:
        return self._outstanding

    # -- the decode thread ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots (FIFO); return the newly placed ones. A request's n choices
        are placed together, once n slots are free (the ones behind it wait: no overtaking)."""
        placed = []
        while self.waiting and len(self._free) >= 1 + len(self.waiting[0].followers):
            seq = self.waiting.popleft()
            self._place(seq)
            placed.append(seq)
            # Prompt logprobs need every prompt position's logits, so such a prompt is computed in full.
            if self.prefix is not None and seq.request.prompt_logprobs is None:
                blocks = self.prefix.match(seq.request.prompt_ids)
                if blocks:
                    seq.prefilled = seq.cached = len(blocks) * self.prefix.block
                    self._loads.append((seq, blocks))
            for follower in seq.followers:  # placed now, prefilled by copying the leader's keys
                self.waiting.remove(follower)
                self._place(follower)
                placed.append(follower)
        return placed

    def _place(self, seq: Sequence) -> None:
        seq.slot = heapq.heappop(self._free)
        self.running[seq.slot] = seq

    def reset_prefix(self) -> None:
        """Forget every cached prefix (after a failed step, whose planned blocks may not have been written)."""
        if self.prefix is not None:
            self.prefix = PrefixIndex(self.prefix.n_blocks, self.prefix.block)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished, cancelled or failed sequence and free its slot at once."""
        self._ungroup(seq)
        if seq.slot >= 0:
            del self.running[seq.slot]
            heapq.heappush(self._free, seq.slot)
            seq.slot = -1
        else:
            self.waiting.remove(seq)
        with self._lock:
            self._outstanding -= 1

    @staticmethod
    def _ungroup(seq: Sequence) -> None:
        """Take `seq` out of its choice group before it goes: a leader whose prompt was not forked yet hands
        its followers to the first of them, which prefills the prompt itself (from the start)."""
        if seq.leader is not None:
            seq.leader.followers.remove(seq)
            seq.leader = None
        elif seq.followers:
            heir, *rest = seq.followers
            heir.leader, heir.followers = None, rest
            for follower in rest:
                follower.leader = heir
            seq.followers = []

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in self.all() if s.request.id == request_id), None)

    def all(self) -> Iterator[Sequence]:
        yield from list(self.running.values())
        yield from list(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> StepPlan:
        """The next step: every decoding row, plus the prompt chunks the budget allows, grouped into batches."""
        decode = self.decode_rows()
        budget, granule = prefill_budget(len(decode), self.prefill_chunk, self.granule, self.lone_chunk)
        chunks = [Chunk(*c) for c in self.prefill_plan(budget, granule)]
        plan = StepPlan(decode, group_waves(chunks, self.max_len))
        plan.forks = {s: list(s.followers) for s in plan.completing if s.followers}
        plan.drafts = self._drafts(decode)
        plan.loads = [(s, blocks) for s, blocks in self._loads if s.slot >= 0]
        self._loads.clear()
        if self.prefix is not None:  # prompts complete after this step: cache their blocks
            plan.saves = [(s, new) for s in plan.completing if (new := self.prefix.insert(s.request.prompt_ids))]
        return plan

    def _drafts(self, decode: list[Sequence]) -> dict[Sequence, list[int]]:
        """Speculative drafts of the decode rows that draft, within the room every row has left."""
        drafting = [s for s in decode if s.drafter is not None]
        if not drafting:
            return {}
        # All decode rows run as one padded batch when any drafts, so the fullest row bounds every draft.
        room = self.max_len - 1 - max(s.pos for s in decode)
        drafts = {}
        for s in drafting:
            limit = min(room, s.request.max_new_tokens - s.generated - 1)
            if draft := s.drafter.propose(limit):
                drafts[s] = draft
        return drafts

    def commit(self, plan: StepPlan, tokens: list[list[int]] | None = None) -> None:
        """Record a step the runner has executed: decode rows moved on by the tokens they took in (one, or a
        verified draft's accepted tokens plus one), chunks are cached; `tokens` as `Runner.execute` returns."""
        for i, seq in enumerate(plan.decode):
            seq.pos += len(tokens[i]) if tokens else 1
        for batch in plan.prefill:
            for chunk in batch.chunks:
                chunk.seq.prefilled = chunk.end
                if not chunk.seq.prefilling:
                    chunk.seq.pos = chunk.end
        for leader, followers in plan.forks.items():  # their prompt keys were copied in: they decode now
            for follower in followers:
                follower.prefilled = follower.pos = leader.pos
                follower.leader = None
            leader.followers = []

    def prefill_plan(self, budget: int, granule: int | None = None) -> list[tuple[Sequence, int, int]]:
        """Prompt chunks (sequence, start, end) for this step, at most `budget` prompt tokens in all.

        Chunks are cut at multiples of `granule` (default: `budget`) from the prompt start, so chunks of
        prompts admitted together start at the same positions and batch well. A prompt may get several
        consecutive chunks in one step. The first chunk of a step is always taken; later ones only if they
        fit, in admission order (no overtaking).
        """
        granule = granule or budget
        plan: list[tuple[Sequence, int, int]] = []
        used = 0
        for seq in self.running.values():
            if seq.leader is not None:
                continue  # its prompt keys come from its leader's slot
            start, n = seq.prefilled, len(seq.request.prompt_ids)
            while start < n:
                end = min((start // granule + 1) * granule, n)
                if plan and used + (end - start) > budget:
                    return plan
                plan.append((seq, start, end))
                used += end - start
                start = end
        return plan

    def decode_rows(self) -> list[Sequence]:
        """Sequences with a token to feed back, in slot order (contiguous slots read the cache as a view)."""
        return [s for _, s in sorted(self.running.items()) if s.next_token is not None]
