"""The protocol's pieces: one deadline for a whole join, the wakeup, and join_in_order."""

from __future__ import annotations

import asyncio

import pytest

from consumer.pipeline.protocol import Deadline, Wakeup, join_in_order
from tests.unit.pipeline.recording import FakeClock, ScriptedClock, turns


def test_a_deadline_counts_down_on_the_injected_clock() -> None:
    clock = FakeClock(50.0)
    deadline = Deadline(10.0, clock)
    assert deadline.remaining() == 10.0
    assert not deadline.expired
    clock.advance(4.0)
    assert deadline.remaining() == 6.0
    clock.advance(6.0)
    assert deadline.remaining() == 0.0
    assert deadline.expired


def test_a_deadline_never_reports_negative_time_left() -> None:
    clock = FakeClock()
    deadline = Deadline(1.0, clock)
    clock.advance(100.0)
    assert deadline.remaining() == 0.0
    assert deadline.expired


def test_a_zero_deadline_is_expired_from_the_start() -> None:
    assert Deadline(0.0, FakeClock()).expired


async def test_a_wakeup_set_before_the_wait_returns_at_once_and_is_cleared_by_it() -> None:
    wakeup = Wakeup()
    wakeup.set()
    await asyncio.wait_for(wakeup.wait(3600.0), timeout=5.0)
    # Cleared: the next wait does not return on the old signal.
    waiter = asyncio.ensure_future(wakeup.wait(3600.0))
    await turns()
    assert not waiter.done()
    waiter.cancel()


async def test_a_wakeup_set_while_waiting_ends_the_wait() -> None:
    wakeup = Wakeup()
    waiter = asyncio.ensure_future(wakeup.wait(3600.0))
    await turns()
    assert not waiter.done()
    wakeup.set()
    await asyncio.wait_for(waiter, timeout=5.0)


async def test_a_wakeup_wait_without_a_signal_ends_after_at_most_its_time() -> None:
    await asyncio.wait_for(Wakeup().wait(0.0), timeout=5.0)


async def test_join_in_order_returns_true_at_once_when_nothing_is_left() -> None:
    calls = 0

    def forward() -> bool:
        nonlocal calls
        calls += 1
        return True

    drained = await join_in_order(forward, lambda: None, Wakeup(), Deadline(10.0, FakeClock()))
    assert drained is True
    assert calls == 1


async def test_join_in_order_waits_for_the_head_task_then_forwards_until_drained() -> None:
    loop = asyncio.get_running_loop()
    heads = [loop.create_future(), loop.create_future()]
    forwarded: list[int] = []

    def forward() -> bool:
        # The head is forwarded once it is done; done when both are.
        while heads and heads[0].done():
            forwarded.append(heads.pop(0).result())
        return not heads

    join = asyncio.ensure_future(
        join_in_order(forward, lambda: heads[0], Wakeup(), Deadline(60.0, FakeClock()))
    )
    await turns()
    assert not join.done(), "join must wait for the unfinished head task"
    heads[0].set_result(1)
    await turns()
    assert forwarded == [1]
    assert not join.done()
    heads[0].set_result(2)
    assert await asyncio.wait_for(join, timeout=5.0) is True
    assert forwarded == [1, 2]


async def test_join_in_order_stops_at_the_deadline_and_says_it_did_not_drain() -> None:
    head = asyncio.get_running_loop().create_future()
    # Constructed at 0 with 5 s; the first look at the time left already finds it spent.
    deadline = Deadline(5.0, ScriptedClock(0.0, 10.0))
    drained = await asyncio.wait_for(
        join_in_order(lambda: False, lambda: head, Wakeup(), deadline), timeout=5.0
    )
    assert drained is False
    assert not head.done()


async def test_join_in_order_gives_up_once_the_deadline_passes_while_it_waited() -> None:
    loop = asyncio.get_running_loop()
    first = loop.create_future()
    second = loop.create_future()
    heads = [first, second]
    # 5 s at construction; still 5 s left on the first look; none on the second.
    deadline = Deadline(5.0, ScriptedClock(0.0, 0.0, 10.0))

    def forward() -> bool:
        if heads[0].done():
            heads.pop(0)
        return not heads

    join = asyncio.ensure_future(join_in_order(forward, lambda: heads[0], Wakeup(), deadline))
    await turns()
    assert not join.done()
    first.set_result(None)
    assert await asyncio.wait_for(join, timeout=5.0) is False
    assert heads == [second]


async def test_join_in_order_without_a_head_task_waits_on_the_wakeup() -> None:
    wakeup = Wakeup()
    room = False

    def forward() -> bool:
        return room

    join = asyncio.ensure_future(
        join_in_order(forward, lambda: None, wakeup, Deadline(60.0, FakeClock()))
    )
    await turns()
    assert not join.done()
    room = True
    wakeup.set()
    assert await asyncio.wait_for(join, timeout=5.0) is True


async def test_join_in_order_lets_an_error_from_forward_through() -> None:
    def forward() -> bool:
        raise RuntimeError("a failed task")

    with pytest.raises(RuntimeError, match="a failed task"):
        await join_in_order(forward, lambda: None, Wakeup(), Deadline(1.0, FakeClock()))
