"""n choices of one request in the engine: one prefill shared by n slots, seeds derived per choice, the group
placed together, counted as n against the queue, cancelled as one, and exactly what n=1 requests give."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.scheduler import Scheduler, Sequence
from pocketgpt.app.engine.types import DoneEvent, ErrorEvent, GenRequest, QueueFull, Ticket, TokenEvent
from pocketgpt.app.testing import slowed
from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.model.sampling import SamplingParams
from tests.conftest import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("nchoices") / "untied", tie_embeddings=False)


def make_engine(path: Path, **kwargs) -> Engine:
    return Engine(load_checkpoint(path), **kwargs).start()


async def collect(tickets: list[Ticket]) -> list[tuple[list[int], DoneEvent | ErrorEvent]]:
    """Every choice's token ids and its last event, read from the queue the choices share."""
    ids: list[list[int]] = [[] for _ in tickets]
    ends: dict[int, DoneEvent | ErrorEvent] = {}
    while len(ends) < len(tickets):
        event = await asyncio.wait_for(tickets[0].queue.get(), 30)
        if isinstance(event, TokenEvent):
            ids[event.choice].append(event.id)
        else:
            ends[event.choice] = event
    return [(ids[i], ends[i]) for i in range(len(tickets))]


def sampled(engine: Engine, prompt: str, max_new: int = 24, temperature: float = 1.0, seed: int = 5) -> GenRequest:
    return GenRequest(engine.tokenizer.encode(prompt), max_new, SamplingParams(temperature=temperature), seed=seed)


def test_n_choices_share_one_prefill_and_equal_n1_requests_with_derived_seeds(checkpoint: Path) -> None:
    eng = make_engine(checkpoint, max_running=8, prefill_chunk=16)
    try:
        request = sampled(eng, "To be, or not to be, that is the question")

        async def main() -> None:
            before = eng.prefill_tokens
            choices = await collect(eng.submit_choices(request, 3))
            assert eng.prefill_tokens - before == len(request.prompt_ids)  # one prefill, not three
            alone = [await collect(eng.submit_choices(GenRequest(request.prompt_ids, request.max_new_tokens,
                                                                 request.params, seed=request.seed + i), 1))
                     for i in range(3)]
            assert eng.prefill_tokens - before == 4 * len(request.prompt_ids)
            assert [ids for ids, _ in choices] == [a[0][0] for a in alone]  # choice i = n=1 with seed + i
            assert len({tuple(ids) for ids, _ in choices}) == 3  # sampled: the choices differ
            for ids, end in choices:
                assert isinstance(end, DoneEvent) and end.completion_tokens == len(ids)
                assert end.prompt_tokens == len(request.prompt_ids)

        asyncio.run(main())
    finally:
        eng.stop()


@pytest.mark.parametrize("options", [{}, {"prefix_cache_slots": 2.0, "spec_tokens": 4}])
def test_greedy_choices_are_equal_and_batched_with_others(checkpoint: Path, options: dict) -> None:
    """Greedy choices agree; choices sampled next to other requests give what they give alone (also with the
    prefix cache and speculative decoding on)."""
    eng = make_engine(checkpoint, max_running=6, max_queue=16, prefill_chunk=8, **options)
    try:
        greedy = sampled(eng, "The quick brown fox", temperature=0.0)
        mixed = sampled(eng, "A journey of a thousand miles", seed=11)
        others = [sampled(eng, p, seed=3) for p in ("All that glitters", "def add(a, b):", "床前明月光")]

        async def main() -> None:
            same = await collect(eng.submit_choices(greedy, 4))
            assert len({tuple(ids) for ids, _ in same}) == 1
            solo = await collect(eng.submit_choices(mixed, 3))
            solo_others = [await collect([eng.submit(r)]) for r in others]
            # Together: the 3 choices and 3 other requests in 6 slots, and 4 greedy choices queued behind.
            together = await asyncio.gather(collect(eng.submit_choices(mixed, 3)),
                                            *(collect([eng.submit(r)]) for r in others),
                                            collect(eng.submit_choices(greedy, 4)))
            assert [ids for ids, _ in together[0]] == [ids for ids, _ in solo]
            assert [t[0][0] for t in together[1:4]] == [s[0][0] for s in solo_others]
            assert [ids for ids, _ in together[4]] == [ids for ids, _ in same]

        asyncio.run(main())
    finally:
        eng.stop()


def test_choices_count_against_the_queue_and_cancel_frees_every_slot(checkpoint: Path) -> None:
    eng = make_engine(checkpoint, max_running=3, max_queue=2, runner=slowed(0.02))
    try:
        async def main() -> None:
            req = sampled(eng, "Hello", max_new=100)
            tickets = eng.submit_choices(req, 3)
            with pytest.raises(QueueFull):
                eng.submit_choices(req, 3)  # 3 running + 3 > 3 slots + 2 waiting places
            waiting = eng.submit_choices(req, 2)  # fits in the queue: 5 outstanding
            assert eng.outstanding == 5
            for _ in range(6):
                assert isinstance(await tickets[0].queue.get(), TokenEvent)
            assert eng.running == 3
            for t in tickets:
                t.cancel()
            for t in waiting:
                t.cancel()
            while eng.outstanding:
                await asyncio.sleep(0.005)
            assert eng.running == 0
            with pytest.raises(ValueError, match="slots"):
                eng.submit_choices(req, 4)  # can never be placed together

        asyncio.run(main())
    finally:
        eng.stop()


def test_choices_wait_until_n_slots_are_free_and_keep_their_order(checkpoint: Path) -> None:
    eng = make_engine(checkpoint, max_running=3, max_queue=8)
    try:
        async def main() -> None:
            first = eng.submit(sampled(eng, "Hi", max_new=30))
            group = eng.submit_choices(sampled(eng, "Hello there", max_new=5), 3)
            late = eng.submit(sampled(eng, "Bye", max_new=5))
            order = []

            async def track(name: str, tickets: list[Ticket]) -> None:
                await collect(tickets)
                order.append(name)

            await asyncio.gather(track("first", [first]), track("group", group), track("late", [late]))
            # The group waits for three free slots, i.e. for `first`; `late` does not overtake it.
            assert order.index("group") < order.index("late")
            assert order[0] == "first"

        asyncio.run(main())
    finally:
        eng.stop()


def seq(n: int, choice: int = 0) -> Sequence:
    request = GenRequest(list(range(1, n + 1)), 8)
    ticket = SimpleNamespace(request=request, loop=None, choice=choice)
    return Sequence(ticket=ticket, text=None, generator=None, deadline=None)  # type: ignore[arg-type]


def group(size: int, n: int) -> list[Sequence]:
    leader, *followers = [seq(size, i) for i in range(n)]
    leader.followers = followers
    for f in followers:
        f.leader = leader
    return [leader, *followers]


def test_plan_forks_the_leaders_prompt_into_its_followers() -> None:
    sched = Scheduler(4, 4, prefill_chunk=8, granule=4, max_len=64, lone_chunk=8)
    a, b, c = group(10, 3)
    for s in (a, b, c):
        sched.add(s)
    assert sched.admit() == [a, b, c] and [s.slot for s in (a, b, c)] == [0, 1, 2]
    plan = sched.schedule()
    assert [ch.seq for batch in plan.prefill for ch in batch.chunks] == [a] and not plan.forks
    sched.commit(plan)
    plan = sched.schedule()
    assert plan.forks == {a: [b, c]} and plan.rows == [a, b, c]
    sched.commit(plan)
    assert [(s.prefilled, s.pos, s.leader, s.followers) for s in (a, b, c)] == [(10, 10, None, [])] * 3


def test_a_leader_gone_before_its_prompt_is_forked_hands_over_to_a_follower() -> None:
    sched = Scheduler(2, 4, prefill_chunk=8, granule=4, max_len=64, lone_chunk=8)
    x = seq(3)
    a, b, c = group(10, 3)
    for s in (x, a, b, c):
        sched.add(s)
    assert sched.admit() == [x]  # the group needs 3 free slots, there is 1: it waits, whole
    sched.remove(a)  # cancelled while waiting: b leads c now
    assert (b.leader, b.followers, c.leader) == (None, [c], b)
    sched.remove(x)
    assert sched.admit() == [b, c]
    plan = sched.schedule()
    sched.remove(b)  # gone mid-prefill: c prefills the prompt itself, from the start
    assert (c.leader, c.followers, c.prefilled) == (None, [], 0)
    plan = sched.schedule()
    assert next((ch.seq, ch.start) for batch in plan.prefill for ch in batch.chunks) == (c, 0)
