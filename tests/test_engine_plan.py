"""The scheduler's step plans, without a model: decode rows, the prefill budget, waves, padding, commit."""

from __future__ import annotations

from types import SimpleNamespace

from pocketgpt.app.engine.plan import Chunk, PrefillBatch, group_waves, prefill_budget
from pocketgpt.app.engine.scheduler import Scheduler, Sequence
from pocketgpt.app.engine.types import GenRequest


def seq(n: int) -> Sequence:
    """A sequence with an n-token prompt (nothing here reads its text stream or generator)."""
    request = GenRequest(list(range(1, n + 1)), 8)
    ticket = SimpleNamespace(request=request, loop=None)
    return Sequence(ticket=ticket, text=None, generator=None, deadline=None)  # type: ignore[arg-type]


def admitted(sched: Scheduler, *seqs: Sequence) -> list[Sequence]:
    for s in seqs:
        sched.add(s)
    return sched.admit()


def test_budget_rule() -> None:
    assert prefill_budget(0, 256, 16, 1024) == (1024, 1024)  # nothing decodes: big chunks on a coarse grid
    assert prefill_budget(4, 256, 16, 1024) == (16, 16)  # at least one granule
    assert prefill_budget(64, 256, 16, 1024) == (32, 16)  # one prompt token per two decoding rows
    assert prefill_budget(1024, 256, 16, 1024) == (256, 16)  # never more than prefill_chunk


def test_a_lone_prompt_goes_in_one_chunk_then_granules_once_others_decode() -> None:
    sched = Scheduler(4, 4, prefill_chunk=64, granule=16, max_len=2048, lone_chunk=2048)
    a = admitted(sched, seq(1000))[0]
    plan = sched.schedule()
    assert [x.chunks for x in plan.prefill] == [(Chunk(a, 0, 1000),)] and plan.rows == [a]
    sched.commit(plan)
    a.next_token = 5
    b = admitted(sched, seq(100))[0]
    plan = sched.schedule()  # a decodes now: b goes 16 tokens at a time
    assert plan.decode == [a] and [x.chunks for x in plan.prefill] == [(Chunk(b, 0, 16),)]


def test_waves_keep_a_prompts_chunks_in_order_and_batch_equal_starts() -> None:
    a, b, c = seq(40), seq(5), seq(20)
    chunks = [Chunk(a, 0, 16), Chunk(a, 16, 32), Chunk(b, 0, 5), Chunk(c, 8, 16), Chunk(c, 16, 20)]
    assert group_waves(chunks, max_len=64) == [
        PrefillBatch(0, (Chunk(a, 0, 16), Chunk(b, 0, 5))),  # padded to 16
        PrefillBatch(8, (Chunk(c, 8, 16),)),
        PrefillBatch(16, (Chunk(a, 16, 32), Chunk(c, 16, 20))),
    ]
    # Where padding would run past the cache, only equal lengths share a batch.
    assert group_waves([Chunk(a, 0, 8), Chunk(b, 0, 5)], max_len=6) == [
        PrefillBatch(0, (Chunk(a, 0, 8),)), PrefillBatch(0, (Chunk(b, 0, 5),))]


def test_schedule_and_commit_walk_a_prompt_into_decoding() -> None:
    sched = Scheduler(4, 4, prefill_chunk=8, granule=4, max_len=64, lone_chunk=8)
    a, b = admitted(sched, seq(10), seq(3))
    plan = sched.schedule()
    # Nothing decodes: one 8-token chunk on the 8-grid; b's 3 tokens do not fit after it.
    assert plan.decode == [] and plan.prefill_tokens == 8
    assert [x.chunks for x in plan.prefill] == [(Chunk(a, 0, 8),)]
    assert plan.rows == []
    sched.commit(plan)
    assert (a.prefilled, a.pos) == (8, 0)
    plan = sched.schedule()
    assert [x.chunks for x in plan.prefill] == [(Chunk(a, 8, 10),), (Chunk(b, 0, 3),)]
    assert plan.rows == [a, b] and plan.completing == [a, b]
    sched.commit(plan)
    assert (a.prefilled, a.pos, b.pos) == (10, 10, 3)
    a.next_token = b.next_token = 7  # the runner sampled them; output fed them back
    c = admitted(sched, seq(30))[0]
    plan = sched.schedule()
    assert plan.decode == [a, b]
    assert [x.chunks for x in plan.prefill] == [(Chunk(c, 0, 4),)]  # two decoding rows: one 4-granule
    sched.commit(plan)
    assert (a.pos, b.pos, c.prefilled) == (11, 4, 4)
