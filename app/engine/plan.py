"""What one engine step will do, as plain data: the scheduler writes it, the runner executes it.

A `StepPlan` holds the decode rows (sequences feeding back their last sampled token) and the prompt chunks
to prefill, already grouped into the batches the runner will run: a prompt's chunks run in order, one per
wave; chunks of different prompts that start at the same position run as one batch, shorter ones padded at
the end (their padding's keys land past the prompt and are overwritten before anything attends there).
Nothing here holds a tensor, so plans are unit-tested without a model.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from pocketgpt.app.engine.scheduler import Sequence


class Chunk(NamedTuple):
    """Prompt tokens [start, end) of `seq` to prefill."""

    seq: Sequence
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PrefillBatch:
    """Chunks that all start at `start` and run as one forward, padded to `width` tokens."""

    start: int
    chunks: tuple[Chunk, ...]

    @property
    def width(self) -> int:
        return max(c.size for c in self.chunks)

    @property
    def lengths(self) -> list[int]:
        return [c.size for c in self.chunks]

    @property
    def all_positions(self) -> bool:
        """Whether the runner needs every position's logits: the prompts asked for their logprobs (such chunks
        are batched only with each other, so no other request pays for it)."""
        return self.chunks[0].seq.request.prompt_logprobs is not None


@dataclass
class StepPlan:
    """One step: copy `loads` in, decode `decode`, run `prefill` in order, copy `saves` out; `rows` are the
    sequences sampled afterwards.

    `loads`: (sequence, prefix-cache blocks to copy into its slot from position 0), before anything runs.
    `saves`: (sequence, [(pool block, start position)]) to copy out of its slot once its prompt is prefilled.
    `drafts`: speculative draft tokens of decode rows, to verify after their fed-back token.
    `forks`: completing prompts whose keys are copied into other sequences' slots once prefilled (a request's
    n choices: the followers are sampled from their leader's logits, right after it in `rows`).
    """

    decode: list[Sequence] = field(default_factory=list)
    prefill: list[PrefillBatch] = field(default_factory=list)
    loads: list[tuple[Sequence, list[int]]] = field(default_factory=list)
    saves: list[tuple[Sequence, list[tuple[int, int]]]] = field(default_factory=list)
    drafts: dict[Sequence, list[int]] = field(default_factory=dict)
    forks: dict[Sequence, list[Sequence]] = field(default_factory=dict)

    @property
    def completing(self) -> list[Sequence]:
        """Sequences whose prompt is complete after this step, in the order their last chunk runs."""
        return [c.seq for b in self.prefill for c in b.chunks if c.end == len(c.seq.request.prompt_ids)]

    @property
    def rows(self) -> list[Sequence]:
        """The sequences that get a sampled token this step, in the order of the runner's logits."""
        if not self.forks:
            return self.decode + self.completing
        return self.decode + [r for s in self.completing for r in (s, *self.forks.get(s, ()))]

    @property
    def prefill_tokens(self) -> int:
        return sum(c.size for b in self.prefill for c in b.chunks)


def prefill_budget(decoding: int, prefill_chunk: int, granule: int, lone_chunk: int) -> tuple[int, int]:
    """(token budget, chunk granule) for a step with `decoding` rows: the interference rule.

    With nothing decoding nobody waits on the step, so prompts go in chunks of up to `lone_chunk` tokens on
    a grid of that size: on a CPU one forward over a long prompt costs far less than many small ones, and
    time to first token is then about one forward of the prompt. While requests decode a step takes about
    one prompt token per two decoding rows (at least one `granule`, at most `prefill_chunk`), cut on the
    `granule` grid, so a long prompt never stalls running streams: on a CPU, where a prompt token costs about
    what a decode row does, their inter-token latency rises by well under 2x while it is prefilled.
    """
    if decoding == 0:
        return lone_chunk, lone_chunk
    return min(prefill_chunk, max(granule, decoding // 2 // granule * granule)), granule


def group_waves(chunks: list[Chunk], max_len: int) -> list[PrefillBatch]:
    """Group planned chunks into batches: waves of one chunk per prompt, then by start position.

    Rows of different lengths are padded to the widest, except where the padding would run past `max_len`:
    there only chunks of equal length share a batch.
    """
    batches: list[PrefillBatch] = []
    while chunks:
        # (start, wants every position's logits) -> chunks, in plan order
        wave: dict[tuple[int, bool], list[Chunk]] = defaultdict(list)
        later, seen = [], set()
        for chunk in chunks:
            if chunk.seq in seen:
                later.append(chunk)
            else:
                seen.add(chunk.seq)
                wave[chunk.start, chunk.seq.request.prompt_logprobs is not None].append(chunk)
        for (start, _), group in wave.items():
            width = max(c.size for c in group)
            if start + width <= max_len:
                batches.append(PrefillBatch(start, tuple(group)))
                continue
            by_size: dict[int, list[Chunk]] = defaultdict(list)
            for c in group:
                by_size[c.size].append(c)
            batches.extend(PrefillBatch(start, tuple(g)) for g in by_size.values())
        chunks = later
    return batches
