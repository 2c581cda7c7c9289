"""The AIMD limiter: admission, additive increase, one cut per congestion event, Retry-After."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest

from consumer.llm.limiter import AIMDLimiter, Ticket


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limiter(
    initial: int = 10,
    minimum: int = 1,
    maximum: int = 100,
    factor: float = 0.5,
    clock: FakeClock | None = None,
    rng: float = 0.0,
    jitter: float = 0.2,
) -> AIMDLimiter:
    return AIMDLimiter(
        initial,
        minimum,
        maximum,
        decrease_factor=factor,
        retry_after_jitter=jitter,
        clock=clock or FakeClock(),
        rng=lambda: rng,
    )


def fill(lim: AIMDLimiter) -> list[Ticket]:
    tickets = []
    while (ticket := lim.try_acquire()) is not None:
        tickets.append(ticket)
    return tickets


def run_saturated(lim: AIMDLimiter, in_flight: deque[Ticket], successes: int) -> None:
    """Complete the oldest request and immediately admit a new one, keeping the limit full."""
    for _ in range(successes):
        lim.on_success(in_flight.popleft())
        in_flight.extend(fill(lim))


def test_bad_bounds_are_rejected() -> None:
    with pytest.raises(ValueError):
        AIMDLimiter(initial=5, minimum=6, maximum=10)
    with pytest.raises(ValueError):
        AIMDLimiter(initial=11, minimum=1, maximum=10)
    with pytest.raises(ValueError):
        AIMDLimiter(initial=1, minimum=0, maximum=10)


def test_never_admits_more_than_the_permits() -> None:
    lim = limiter(initial=3)
    tickets = fill(lim)
    assert len(tickets) == 3
    assert lim.try_acquire() is None
    assert lim.state().in_flight == 3
    lim.on_ignore()
    assert lim.try_acquire() is not None
    assert lim.try_acquire() is None


def test_a_ticket_remembers_in_flight_at_admission() -> None:
    lim = limiter(initial=3)
    assert [t.in_flight_at_admission for t in fill(lim)] == [1, 2, 3]


def test_additive_increase_is_about_one_per_round_trip_when_the_limit_is_used() -> None:
    lim = limiter(initial=10)
    in_flight = deque(fill(lim))
    run_saturated(lim, in_flight, 10)  # replace the warm-up tickets admitted at low in-flight
    before = lim.limit
    run_saturated(lim, in_flight, round(before))  # one round trip's worth of successes
    assert 0.9 <= lim.limit - before <= 1.0
    assert lim.permits == int(lim.limit)


def test_successes_at_low_utilisation_do_not_raise_the_limit() -> None:
    lim = limiter(initial=10)
    for _ in range(100):
        ticket = lim.try_acquire()
        assert ticket is not None
        lim.on_success(ticket)
    assert lim.limit == 10.0


def test_multiplicative_decrease_by_the_factor() -> None:
    clock = FakeClock()
    lim = limiter(initial=10, factor=0.7, clock=clock)
    ticket = lim.try_acquire()
    assert ticket is not None
    clock.now = 1.0
    lim.on_congestion(ticket)
    assert lim.limit == pytest.approx(7.0)
    assert lim.permits == 7
    assert lim.state().decreases == 1
    assert lim.state().in_flight == 0


def test_congestion_from_requests_admitted_before_the_last_decrease_cuts_only_once() -> None:
    clock = FakeClock(0.0)
    lim = limiter(initial=8, factor=0.5, clock=clock)
    tickets = fill(lim)
    assert len(tickets) == 8
    clock.now = 1.0
    for i, ticket in enumerate(tickets):
        clock.now = 1.0 + i * 0.01  # the 429s of one overload arrive over a few ms
        lim.on_congestion(ticket)
    assert lim.limit == 4.0
    assert lim.state().decreases == 1
    assert lim.state().in_flight == 0


def test_a_request_admitted_after_the_decrease_cuts_again() -> None:
    clock = FakeClock(0.0)
    lim = limiter(initial=8, factor=0.5, clock=clock)
    first, stale = lim.try_acquire(), lim.try_acquire()
    assert first is not None and stale is not None
    clock.now = 1.0
    lim.on_congestion(first)
    assert lim.limit == 4.0
    clock.now = 2.0
    fresh = lim.try_acquire()
    assert fresh is not None
    clock.now = 3.0
    lim.on_congestion(stale)  # admitted at 0, before the decrease at 1: no cut
    assert lim.limit == 4.0
    lim.on_congestion(fresh)  # admitted at 2, after the decrease: a new event
    assert lim.limit == 2.0
    assert lim.state().decreases == 2


def test_the_limit_never_goes_below_the_minimum() -> None:
    clock = FakeClock(0.0)
    lim = limiter(initial=4, minimum=2, factor=0.5, clock=clock)
    for step in range(10):
        clock.now = float(step)
        ticket = lim.try_acquire()
        assert ticket is not None
        clock.now = step + 0.5
        lim.on_congestion(ticket)
    assert lim.limit == 2.0
    assert lim.permits == 2


def test_the_limit_never_goes_above_the_maximum() -> None:
    lim = limiter(initial=4, maximum=5)
    in_flight = deque(fill(lim))
    run_saturated(lim, in_flight, 500)
    assert lim.limit == 5.0
    assert len(in_flight) == 5


def test_retry_after_closes_the_gate_until_the_hint_passes_without_jitter() -> None:
    clock = FakeClock(0.0)
    lim = limiter(initial=10, clock=clock, rng=0.0)
    ticket = lim.try_acquire()
    assert ticket is not None
    lim.on_congestion(ticket, retry_after_s=2)
    assert lim.state().not_before_in_s == pytest.approx(2.0)
    clock.now = 1.99
    assert lim.try_acquire() is None
    clock.now = 2.0
    assert lim.try_acquire() is not None


def test_retry_after_jitter_extends_the_gate_by_at_most_the_jitter_fraction() -> None:
    clock = FakeClock(0.0)
    lim = limiter(initial=10, clock=clock, rng=1.0, jitter=0.2)
    ticket = lim.try_acquire()
    assert ticket is not None
    lim.on_congestion(ticket, retry_after_s=2)
    clock.now = 2.39
    assert lim.try_acquire() is None
    clock.now = 2.4
    assert lim.try_acquire() is not None


def test_a_shorter_hint_does_not_shorten_the_gate() -> None:
    clock = FakeClock(0.0)
    lim = limiter(clock=clock)
    lim.defer(5.0)
    lim.defer(1.0)
    clock.now = 4.0
    assert lim.try_acquire() is None


async def test_waiting_acquires_are_woken_in_fifo_order_on_release() -> None:
    lim = limiter(initial=1, maximum=1)
    held = lim.try_acquire()
    assert held is not None
    order: list[str] = []

    async def wait(name: str) -> Ticket:
        ticket = await lim.acquire()
        order.append(name)
        return ticket

    tasks = {name: asyncio.create_task(wait(name)) for name in ("a", "b", "c")}
    await asyncio.sleep(0)
    assert lim.state().waiting == 3
    assert order == []

    lim.on_success(held)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == ["a"]
    assert lim.state().in_flight == 1

    lim.on_ignore()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == ["a", "b"]

    lim.on_success(await tasks["b"])
    await tasks["c"]
    assert order == ["a", "b", "c"]
    assert lim.state().waiting == 0


async def test_a_new_acquire_does_not_jump_the_queue() -> None:
    lim = limiter(initial=1, maximum=1)
    held = lim.try_acquire()
    assert held is not None
    first = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    lim.on_ignore()  # hands the permit straight to the waiter
    late = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    assert first.done()
    assert not late.done()
    lim.on_ignore()
    await late


async def test_cancelling_a_waiting_acquire_does_not_leak_a_permit() -> None:
    lim = limiter(initial=1, maximum=1)
    held = lim.try_acquire()
    assert held is not None
    waiter = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert lim.state().waiting == 0
    lim.on_success(held)
    assert lim.state().in_flight == 0
    assert lim.try_acquire() is not None


async def test_cancelling_an_acquire_that_was_just_granted_returns_its_permit() -> None:
    lim = limiter(initial=1, maximum=1)
    held = lim.try_acquire()
    assert held is not None
    waiter = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    lim.on_ignore()  # grants the permit to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert lim.state().in_flight == 0
    assert lim.try_acquire() is not None


async def test_a_release_between_cancel_and_resume_does_not_break_the_cancel() -> None:
    lim = limiter(initial=1, maximum=1)
    held = lim.try_acquire()
    assert held is not None
    waiter = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    waiter.cancel()  # the waiter's future is cancelled now, the task resumes later
    lim.on_success(held)  # a release in the same tick sweeps the cancelled future
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert lim.state().in_flight == 0
    assert lim.state().waiting == 0
    assert lim.try_acquire() is not None
