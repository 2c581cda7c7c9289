"""Windowing step: windows close on count or time, at most one closed window waits here."""

from __future__ import annotations

import asyncio

import pytest

from consumer.config import RetrySettings
from consumer.pipeline.enrich import EnrichedWindow, EnrichStep
from consumer.pipeline.protocol import Deadline, Rejected, Wakeup
from consumer.pipeline.windowing import WindowingStep
from consumer.retry import Backoff
from consumer.window import CloseReason, Window, WindowAccumulator
from tests.unit.pipeline.recording import (
    FakeClock,
    FakeHealth,
    Recording,
    RecordingSleep,
    SimulatedWakeup,
    fixed_rng,
    retryable_failure,
    row_item,
    turns,
)


def offsets(window: Window) -> list[int]:
    return [item.record.offset for item in window.items]


def windowing(
    nxt: Recording[Window],
    *,
    max_messages: int = 3,
    max_wait_s: float = 2.0,
    clock: FakeClock | None = None,
    wakeup: Wakeup | None = None,
) -> WindowingStep:
    clock = clock or FakeClock()
    return WindowingStep(
        WindowAccumulator(max_messages, max_wait_s, clock), nxt, wakeup or Wakeup(), clock
    )


async def test_a_window_closed_by_count_is_forwarded_at_once() -> None:
    nxt: Recording[Window] = Recording()
    step = windowing(nxt, max_messages=2)
    step.submit(row_item(0))
    assert nxt.submitted == []
    step.submit(row_item(1))
    [closed] = nxt.submitted
    assert offsets(closed) == [0, 1]
    assert closed.close_reason is CloseReason.COUNT


async def test_a_rejected_closed_window_is_held_and_items_rejected_until_poll_forwards() -> None:
    nxt: Recording[Window] = Recording(rejecting=True)
    step = windowing(nxt, max_messages=2)
    step.submit(row_item(0))
    step.submit(row_item(1))  # fills the window: taken, the closed window is held
    assert nxt.submitted == [] and len(nxt.offered) == 1
    later = row_item(2)
    with pytest.raises(Rejected):
        step.submit(later)
    step.poll()  # still full: still held
    assert nxt.submitted == []
    with pytest.raises(Rejected):
        step.submit(later)
    nxt.rejecting = False
    step.poll()
    [closed] = nxt.submitted
    assert offsets(closed) == [0, 1]
    assert closed is nxt.offered[0]  # the same window, offered again
    step.submit(later)  # room again
    step.submit(row_item(3))
    assert [offsets(w) for w in nxt.submitted] == [[0, 1], [2, 3]]


async def test_an_idle_window_closes_on_time_when_polled_after_its_deadline() -> None:
    clock = FakeClock(100.0)
    nxt: Recording[Window] = Recording()
    step = windowing(nxt, max_wait_s=2.0, clock=clock)
    step.submit(row_item(0))
    clock.advance(1.0)
    step.submit(row_item(1))  # does not push the deadline back
    clock.advance(0.99)
    step.poll()
    assert nxt.submitted == []
    clock.advance(0.01)
    step.poll()
    [closed] = nxt.submitted
    assert offsets(closed) == [0, 1]
    assert closed.close_reason is CloseReason.TIME
    assert nxt.polls == 2


async def test_a_time_closed_window_the_next_step_rejects_is_held_until_a_later_poll() -> None:
    clock = FakeClock()
    nxt: Recording[Window] = Recording(rejecting=True)
    step = windowing(nxt, max_wait_s=1.0, clock=clock)
    step.submit(row_item(0))
    clock.advance(1.0)
    step.poll()
    with pytest.raises(Rejected):
        step.submit(row_item(1))
    nxt.rejecting = False
    step.poll()
    assert [offsets(w) for w in nxt.submitted] == [[0]]


async def test_the_first_item_of_a_window_arms_a_timer_that_wakes_the_loop() -> None:
    wakeup = SimulatedWakeup(FakeClock())
    step = windowing(Recording(), max_wait_s=0.0, wakeup=wakeup)
    step.submit(row_item(0))
    assert wakeup.sets == 0
    await turns()  # call_later(0) runs on the next turn of the loop
    assert wakeup.sets == 1


async def test_a_window_closed_by_count_cancels_its_timer() -> None:
    wakeup = SimulatedWakeup(FakeClock())
    step = windowing(Recording(), max_messages=1, max_wait_s=0.0, wakeup=wakeup)
    step.submit(row_item(0))
    await turns()
    assert wakeup.sets == 0


async def test_close_closes_the_open_window_with_the_set_reason_and_closes_the_next_step() -> None:
    nxt: Recording[Window] = Recording()
    step = windowing(nxt)
    step.submit(row_item(0))
    step.close_reason(CloseReason.REVOKE)
    step.close()
    assert nxt.closes == 1
    assert nxt.submitted == []  # forwarded during join
    await step.join(Deadline(10.0, FakeClock()))
    [closed] = nxt.submitted
    assert offsets(closed) == [0]
    assert closed.close_reason is CloseReason.REVOKE
    assert nxt.events[-2:] == ["submit", "join"]


async def test_close_without_a_reason_closes_the_open_window_as_shutdown() -> None:
    nxt: Recording[Window] = Recording()
    step = windowing(nxt)
    step.submit(row_item(0))
    step.close()
    await step.join(Deadline(10.0, FakeClock()))
    assert nxt.submitted[0].close_reason is CloseReason.SHUTDOWN


async def test_close_with_no_open_window_forwards_nothing() -> None:
    nxt: Recording[Window] = Recording()
    step = windowing(nxt)
    step.close()
    await step.join(Deadline(10.0, FakeClock()))
    assert nxt.submitted == []
    assert nxt.joins == 1


async def test_join_forwards_held_windows_in_order_then_joins_the_next_step() -> None:
    clock = FakeClock()
    nxt: Recording[Window] = Recording(reject_next=4)
    step = windowing(nxt, max_messages=2, clock=clock, wakeup=SimulatedWakeup(clock))
    step.submit(row_item(0))
    step.submit(row_item(1))  # closed and held
    with pytest.raises(Rejected):
        step.submit(row_item(2))
    step.close()  # nothing open
    await asyncio.wait_for(step.join(Deadline(10.0, clock)), timeout=5.0)
    assert [offsets(w) for w in nxt.submitted] == [[0, 1]]
    assert nxt.events[-2:] == ["submit", "join"]
    assert "poll" in nxt.events  # the next step is polled so it can make room


async def test_join_forwards_the_held_and_the_closed_open_window_in_input_order() -> None:
    clock = FakeClock()
    nxt: Recording[Window] = Recording(rejecting=True)
    step = windowing(nxt, max_messages=2, max_wait_s=1.0, clock=clock)
    step.submit(row_item(0))
    step.submit(row_item(1))  # closed, held
    nxt.rejecting = False
    step.poll()
    step.submit(row_item(2))  # opens a new window
    nxt.rejecting = True
    step.submit(row_item(3))  # closes it, held
    nxt.rejecting = False
    step.close()
    await asyncio.wait_for(step.join(Deadline(10.0, clock)), timeout=5.0)
    assert [offsets(w) for w in nxt.submitted] == [[0, 1], [2, 3]]


async def test_join_stops_offering_at_the_deadline_and_still_joins_the_next_step() -> None:
    clock = FakeClock()
    nxt: Recording[Window] = Recording(rejecting=True)
    step = windowing(nxt, clock=clock, wakeup=SimulatedWakeup(clock))
    step.submit(row_item(0))
    step.close()
    deadline = Deadline(1.0, clock)
    await asyncio.wait_for(step.join(deadline), timeout=5.0)
    assert nxt.submitted == []
    assert deadline.expired
    assert nxt.joins == 1


async def test_terminate_drops_the_open_and_held_windows_and_terminates_the_next_step() -> None:
    clock = FakeClock()
    nxt: Recording[Window] = Recording(rejecting=True)
    step = windowing(nxt, max_messages=2, max_wait_s=1.0, clock=clock)
    step.submit(row_item(0))
    step.submit(row_item(1))  # closed, held
    step.terminate()
    assert nxt.terminates == 1
    nxt.rejecting = False
    clock.advance(10.0)
    step.poll()
    assert nxt.submitted == []  # the held window is gone
    step.submit(row_item(2))  # no longer full
    step.poll()
    assert nxt.submitted == []


async def test_terminate_cancels_the_open_windows_timer() -> None:
    wakeup = SimulatedWakeup(FakeClock())
    step = windowing(Recording(), max_wait_s=0.0, wakeup=wakeup)
    step.submit(row_item(0))
    step.terminate()
    await turns()
    assert wakeup.sets == 0


async def test_join_does_not_spend_the_deadline_on_an_enrich_step_that_abandoned_all() -> None:
    clock = FakeClock()
    wakeup = SimulatedWakeup(clock)

    class AlwaysFailing:
        async def enrich(self, rows: list[dict[str, object]]) -> list[object]:
            return [retryable_failure() for _ in rows]

    enrich = EnrichStep(
        AlwaysFailing(),  # type: ignore[arg-type]
        RetrySettings(),
        FakeHealth(),
        1,
        Recording[EnrichedWindow](),
        wakeup,
        Backoff(2.0, 60.0, fixed_rng),
        sleep=RecordingSleep(blocking=True),
        clock=clock,
    )
    step = WindowingStep(WindowAccumulator(1, 10.0, clock), enrich, wakeup, clock)
    step.submit(row_item(0))  # enrich takes it; the provider is down: held back
    await turns()
    assert enrich.held_back_reason is not None
    step.submit(row_item(1))  # closed at once, enrich is full: held here
    step.close()  # enrich abandons its held window at once
    started = clock.now
    await asyncio.wait_for(step.join(Deadline(30.0, clock)), timeout=5.0)
    assert clock.now - started < 1.0, (
        f"join waited {clock.now - started:.1f} simulated seconds of a 30 s deadline"
    )
