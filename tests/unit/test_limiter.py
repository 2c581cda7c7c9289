"""The AIMD limiter: admission, additive increase, one cut per congestion event, Retry-After."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable

import pytest

from consumer.config import ConcurrencySettings
from consumer.llm.budgets import RetryBudget
from consumer.llm.errors import FailureKind, LLMFailure
from consumer.llm.limiter import AIMDLimiter, Ticket
from consumer.llm.ratelimit import Quota, RateLimits


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
    """Plain AIMD (no probing, no climb): the arithmetic the other behaviours build on."""
    return AIMDLimiter(
        initial,
        minimum,
        maximum,
        decrease_factor=factor,
        retry_after_jitter=jitter,
        clock=clock or FakeClock(),
        rng=lambda: rng,
        probe_step=None,
        fast_climb=False,
        latency_signal=False,
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


async def test_idle_means_free_permits_nobody_waiting_for_them_and_no_quota_gate() -> None:
    clock = FakeClock()
    lim = limiter(initial=2, clock=clock)
    assert lim.idle()
    tickets = fill(lim)
    assert not lim.idle()  # every permit in use
    lim.on_ignore(tickets.pop())
    assert lim.idle()
    waiting = asyncio.ensure_future(lim.acquire())
    lim.try_acquire()
    await asyncio.sleep(0)
    assert not waiting.done() and not lim.idle()  # a request waits for a permit
    waiting.cancel()
    await asyncio.sleep(0)
    lim.on_ignore()
    lim.on_ignore()
    assert lim.idle()
    lim.defer(5.0)
    assert not lim.idle()  # the quota gate holds every admission
    clock.now = 10.0
    assert lim.idle()


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
    tickets = fill(lim)
    clock.now = 1.0
    lim.on_congestion(tickets[0])
    assert lim.limit == pytest.approx(7.0)
    assert lim.permits == 7
    assert lim.state().decreases == 1
    assert lim.state().in_flight == 9


def test_the_cut_starts_from_the_level_in_flight_when_the_overload_showed() -> None:
    """A 429 with 6 in flight under a limit of 10: the capacity is about 6, not 10."""
    clock = FakeClock()
    lim = limiter(initial=10, factor=0.5, clock=clock)
    tickets = [lim.try_acquire() for _ in range(6)]
    clock.now = 1.0
    assert tickets[0] is not None
    lim.on_congestion(tickets[0])
    assert lim.state().ceiling == 6.0
    assert lim.limit == 3.0


def test_one_event_cuts_at_most_two_cuts_worth_however_few_are_in_flight() -> None:
    """One request at a time refused three times (a proxy's own 429s): 16 x 0.64^3 = 4.2,
    not 16 -> 1."""
    clock = FakeClock()
    lim = limiter(initial=16, factor=0.8, clock=clock)
    for attempt in range(3):
        clock.now = float(attempt)
        ticket = lim.try_acquire()
        assert ticket is not None
        clock.now += 0.5
        lim.on_congestion(ticket)
    assert lim.limit == pytest.approx(16 * 0.64**3)
    assert lim.state().decreases == 3


def test_congestion_from_requests_admitted_before_the_last_decrease_cuts_only_once() -> None:
    clock = FakeClock(0.0)
    lim = limiter(initial=8, factor=0.5, clock=clock)
    tickets = fill(lim)
    assert len(tickets) == 8
    clock.now = 1.0
    for i, ticket in enumerate(tickets[:3]):
        clock.now = 1.0 + i * 0.01  # the 429s of one overload arrive over a few ms
        lim.on_congestion(ticket)
    for ticket in tickets[3:]:
        lim.on_ignore(ticket)
    assert lim.state().decreases == 1
    assert lim.state().in_flight == 0
    # one cut (8 -> 4), and each further refusal of the event says the capacity was one lower:
    # 3 of 8 refused, so the level was 6, and the limit is one cut of that
    assert lim.state().ceiling == 6.0
    assert lim.limit == 3.0


def test_an_overload_refusing_every_request_in_flight_takes_the_limit_down_in_one_event() -> None:
    clock = FakeClock(0.0)
    lim = limiter(initial=16, factor=0.9, clock=clock)
    tickets = fill(lim)
    clock.now = 1.0
    for ticket in tickets[:10]:  # another replica holds most of the capacity: 10 of 16 refused
        lim.on_congestion(ticket)
    for ticket in tickets[10:]:
        lim.on_ignore(ticket)
    assert lim.state().decreases == 1
    assert lim.limit == pytest.approx(7 * 0.9)  # the 6 that got in, plus the one refused first


def test_a_request_admitted_after_the_decrease_cuts_again() -> None:
    clock = FakeClock(0.0)
    lim = limiter(initial=8, factor=0.5, clock=clock)
    first, stale, *others = fill(lim)
    clock.now = 1.0
    lim.on_congestion(first)
    assert lim.limit == 4.0
    for ticket in others:
        lim.on_ignore(ticket)
    clock.now = 2.0
    fresh = lim.try_acquire()
    assert fresh is not None
    clock.now = 3.0
    lim.on_congestion(stale)  # admitted at 0, before the decrease at 1: no cut...
    assert lim.limit == 3.5  # ...but the level was one lower than 8: one cut of 7
    lim.on_congestion(fresh)  # admitted at 2, after the decrease: a new event
    assert lim.limit == 1.0  # two cuts' worth: only `fresh` was in flight when answered
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


def test_a_capacity_overload_cuts_but_never_closes_the_gate() -> None:
    """The hint of a 429 at capacity is the refused request's own: the others go on."""
    clock = FakeClock(0.0)
    lim = limiter(initial=10, factor=0.5, clock=clock, rng=1.0, jitter=0.2)
    tickets = fill(lim)
    clock.now = 1.0
    lim.on_congestion(tickets[0])
    assert lim.state().not_before_in_s == 0.0
    assert lim.limit == 5.0
    for ticket in tickets[1:6]:
        lim.on_success(ticket)
    assert lim.try_acquire() is not None  # admitted at once, under the cut limit
    assert lim.hint_delay(2.0) == pytest.approx(2.4)  # the refused one waits hint + jitter


def test_a_spent_quota_gates_everyone_until_the_reset_and_does_not_cut() -> None:
    clock = FakeClock(0.0)
    lim = limiter(initial=10, clock=clock, rng=0.0)
    ticket = lim.try_acquire()
    assert ticket is not None
    lim.on_quota(ticket, 2.0)
    assert lim.limit == 10.0
    assert lim.state().decreases == 0
    assert lim.state().quota_gates == 1
    assert lim.state().not_before_in_s == pytest.approx(2.0)
    clock.now = 1.99
    assert lim.try_acquire() is None
    clock.now = 2.0
    assert lim.try_acquire() is not None


def test_a_quota_gate_without_a_hint_lasts_until_the_reset_of_the_spent_limit() -> None:
    clock = FakeClock(0.0)
    lim = limiter(initial=10, clock=clock, rng=0.0)
    ticket = lim.try_acquire()
    assert ticket is not None
    spent = RateLimits(Quota(100, 0, 3.0), Quota(10_000, 500, 0.5))
    lim.on_quota(ticket, None, spent)
    assert lim.state().not_before_in_s == pytest.approx(3.0)


def test_retry_after_jitter_extends_the_gate_by_at_most_the_jitter_fraction() -> None:
    clock = FakeClock(0.0)
    lim = limiter(initial=10, clock=clock, rng=1.0, jitter=0.2)
    ticket = lim.try_acquire()
    assert ticket is not None
    lim.on_quota(ticket, 2.0)
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


async def test_retries_are_admitted_before_first_attempts_that_queued_earlier() -> None:
    lim = limiter(initial=1, maximum=1)
    held = lim.try_acquire()
    assert held is not None
    order: list[str] = []

    async def wait(name: str, retry: bool) -> None:
        ticket = await lim.acquire(retry=retry)
        order.append(name)
        lim.on_ignore(ticket)

    tasks = [
        asyncio.create_task(wait("first-a", False)),
        asyncio.create_task(wait("first-b", False)),
        asyncio.create_task(wait("retry-a", True)),
        asyncio.create_task(wait("retry-b", True)),
    ]
    await asyncio.sleep(0)
    assert lim.state().waiting == 4
    lim.on_ignore(held)
    await asyncio.gather(*tasks)
    assert order == ["retry-a", "retry-b", "first-a", "first-b"]


async def test_cancelling_a_waiting_retry_removes_it_from_the_queue() -> None:
    lim = limiter(initial=1, maximum=1)
    held = lim.try_acquire()
    assert held is not None
    retry = asyncio.create_task(lim.acquire(retry=True))
    first = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    retry.cancel()
    with pytest.raises(asyncio.CancelledError):
        await retry
    assert lim.state().waiting == 1
    lim.on_ignore(held)
    ticket = await asyncio.wait_for(first, 1.0)
    assert ticket.in_flight_at_admission == 1


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


# ---- recovery, probing at the safe level, climbing past it ----------------------------------


def shaped(
    clock: FakeClock, probe_step: float | None = 0.1, fast_climb: bool = True
) -> AIMDLimiter:
    return AIMDLimiter(
        20, 1, 1000, decrease_factor=0.5, clock=clock, probe_step=probe_step, fast_climb=fast_climb
    )


def full(lim: AIMDLimiter) -> deque[Ticket]:
    """The limit full of requests that were each admitted with the limit full."""
    tickets = deque(fill(lim))
    for _ in range(len(tickets)):
        lim.on_ignore(tickets.popleft())
        tickets.extend(fill(lim))
    return tickets


def congest_at_full_limit(lim: AIMDLimiter, clock: FakeClock) -> deque[Ticket]:
    """An overload with the limit full: the cut halves it and the ceiling is that level."""
    tickets = full(lim)
    clock.now += 1.0
    lim.on_congestion(tickets.popleft())
    clock.now += 1.0
    for ticket in tickets:  # the rest of that overload completes
        lim.on_ignore(ticket)
    return full(lim)


def round_trip(lim: AIMDLimiter, in_flight: deque[Ticket]) -> float:
    """One round trip's worth of successes at a full limit; returns the increase."""
    before = lim.limit
    run_saturated(lim, in_flight, round(before))
    return lim.limit - before


def test_after_a_cut_the_limit_recovers_half_the_way_to_the_safe_level_per_round_trip() -> None:
    clock = FakeClock()
    lim = shaped(clock)
    in_flight = congest_at_full_limit(lim, clock)
    assert lim.limit == 10.0
    assert lim.state().ceiling == 20.0
    # the safe level is 19: a gap of 9; half the remaining gap per round trip, applied per
    # success, closes 1 - e^-0.5 (about 40 %) of it in one round trip
    first = round_trip(lim, in_flight)
    assert 2.8 <= first <= 4.5
    second = round_trip(lim, in_flight)
    assert 0.3 <= second / (9.0 - first) <= 0.6


def test_at_the_safe_level_the_limit_probes_by_the_probe_step() -> None:
    clock = FakeClock()
    lim = shaped(clock, probe_step=0.1)
    in_flight = congest_at_full_limit(lim, clock)
    while lim.limit < 19.0:
        run_saturated(lim, in_flight, 1)
    assert 0.09 <= round_trip(lim, in_flight) <= 0.11
    assert lim.state().ceiling == 20.0


def test_replicas_sharing_the_provider_split_the_probe_step() -> None:
    """Three replicas probing at one replica's rate each would meet the provider's 429s three
    times as often, and cut together."""
    clock = FakeClock()
    lim = shaped(clock, probe_step=0.3)
    in_flight = congest_at_full_limit(lim, clock)
    while lim.limit < 19.0:
        run_saturated(lim, in_flight, 1)
    lim.peers_told([19.0, 19.0])  # at its share: the ceiling stays its own
    assert 0.09 <= round_trip(lim, in_flight) <= 0.11
    assert lim.state().ceiling == 20.0


def test_reaching_the_ceiling_without_congestion_starts_a_climb_that_doubles() -> None:
    clock = FakeClock()
    lim = shaped(clock, probe_step=0.5)
    in_flight = congest_at_full_limit(lim, clock)
    while lim.state().ceiling is not None:
        run_saturated(lim, in_flight, 1)
    steps = [round_trip(lim, in_flight) for _ in range(4)]
    assert 0.9 <= steps[0] <= 2.1
    for earlier, later in itertools.pairwise(steps):
        assert 1.6 <= later / earlier <= 2.6  # about twice the last round trip's increase


def test_with_no_congestion_seen_the_limit_climbs_from_the_start() -> None:
    lim = shaped(FakeClock())
    in_flight = full(lim)
    for _ in range(4):
        round_trip(lim, in_flight)
    assert lim.limit >= 20 + 1 + 2 + 4 + 8 - 2  # +1, +2, +4, +8 per round trip


def test_a_climb_starts_over_when_traffic_stops_pressing() -> None:
    lim = shaped(FakeClock())
    in_flight = full(lim)
    for _ in range(3):
        round_trip(lim, in_flight)
    while in_flight:  # the traffic ends
        lim.on_success(in_flight.popleft())
    lone = lim.try_acquire()  # a lone request, far below the limit
    assert lone is not None
    lim.on_success(lone)
    in_flight = full(lim)
    assert 0.9 <= round_trip(lim, in_flight) <= 2.1  # the climb starts over at the step


def test_a_congestion_during_a_climb_cuts_from_the_level_in_flight() -> None:
    clock = FakeClock()
    lim = shaped(clock)
    in_flight = full(lim)
    for _ in range(3):
        round_trip(lim, in_flight)
    assert lim.limit > 25
    clock.now += 1.0
    lim.on_congestion(in_flight.popleft())
    assert lim.state().ceiling == len(in_flight) + 1
    assert lim.limit == pytest.approx(0.5 * (len(in_flight) + 1))


def test_a_refusal_at_the_floor_holds_the_next_request_a_round_trip() -> None:
    """At the floor a cut cannot lower the limit: the next request waits instead of going into
    the full server the moment the last one was refused."""
    clock = FakeClock()
    lim = limiter(initial=1, clock=clock, jitter=0.0)
    ticket = lim.try_acquire()
    assert ticket is not None
    clock.now += 0.2
    lim.on_success(ticket)  # a round trip of 0.2 s
    refused = lim.try_acquire()
    assert refused is not None
    clock.now += 0.01
    lim.on_congestion(refused)
    assert lim.try_acquire() is None
    clock.now += 0.15
    assert lim.try_acquire() is None
    clock.now += 0.06  # a round trip after the refusal
    assert lim.try_acquire() is not None


def test_a_refusal_above_the_floor_holds_nothing() -> None:
    clock = FakeClock()
    lim = limiter(initial=4, clock=clock)
    tickets = fill(lim)
    clock.now += 0.01
    lim.on_congestion(tickets.pop())
    assert lim.permits == 2
    assert lim.try_acquire() is None  # the cut: 3 in flight against 2 permits
    lim.on_success(tickets.pop())
    lim.on_success(tickets.pop())
    assert lim.try_acquire() is not None  # at once


def test_a_ceiling_below_the_share_of_the_replicas_pressing_is_raised_to_that_share() -> None:
    """Replicas sharing a provider: one cut to 10 with its old level at 20, while the two
    others hold 40 each, climbs back toward the mean (30), not toward its own old level."""
    clock = FakeClock()
    lim = shaped(clock)
    in_flight = congest_at_full_limit(lim, clock)
    lim.peers_told([40.0, 40.0])
    assert lim.state().peers == 2
    first = round_trip(lim, in_flight)
    assert lim.state().ceiling == pytest.approx(30.0)  # (10 + 40 + 40) / 3
    alone = shaped(FakeClock())
    alone_in_flight = congest_at_full_limit(alone, FakeClock(0.0))
    assert first > round_trip(alone, alone_in_flight)  # half the way to 29, not to 19


def test_limits_told_before_the_last_cut_are_not_counted() -> None:
    """The others cut for the same overload: what they told before says too much."""
    clock = FakeClock()
    lim = shaped(clock)
    lim.peers_told([40.0, 40.0])
    in_flight = congest_at_full_limit(lim, clock)
    round_trip(lim, in_flight)
    assert lim.state().ceiling == 20.0
    lim.peers_told([40.0, 40.0])  # told again, after the cut
    limit = lim.limit
    run_saturated(lim, in_flight, 1)
    assert lim.state().ceiling == pytest.approx((limit + 80.0) / 3)


def test_a_ceiling_at_its_share_is_kept() -> None:
    clock = FakeClock()
    lim = shaped(clock)
    in_flight = congest_at_full_limit(lim, clock)
    lim.peers_told([12.0, 12.0])  # mean 11.3: this replica holds more than its share
    round_trip(lim, in_flight)
    assert lim.state().ceiling == 20.0


def test_no_replica_told_leaves_the_limit_alone() -> None:
    clock, shared_clock = FakeClock(), FakeClock()
    lim, shared = shaped(clock), shaped(shared_clock)
    shared.peers_told([])
    in_flight = congest_at_full_limit(lim, clock)
    shared_in_flight = congest_at_full_limit(shared, shared_clock)
    for _ in range(3):
        assert round_trip(shared, shared_in_flight) == round_trip(lim, in_flight)
    assert shared.state().ceiling == lim.state().ceiling == 20.0
    assert shared.state().peers == 0


def test_a_replica_above_its_share_cuts_when_another_replica_cuts() -> None:
    """The provider refuses the replica climbing back to its share, not the one holding the
    capacity: that one follows the cut, to no lower than its share, once per round trip, and
    it is not counted as a cut of its own (the others would follow it back)."""
    clock = FakeClock()
    lim = limiter(initial=30, factor=0.8, clock=clock)
    tickets = fill(lim)
    clock.now += 0.2
    for ticket in tickets:
        lim.on_ignore(ticket)
    lone = lim.try_acquire()
    assert lone is not None
    clock.now += 0.2
    lim.on_success(lone)  # a round trip of 0.2 s
    lim.peers_told([10.0, 10.0], cut=False)
    assert lim.limit == 30.0  # no cut told: nothing to follow
    lim.peers_told([10.0, 10.0], cut=True)
    assert lim.limit == pytest.approx(24.0)  # 0.8 of 30, above the share (16.7)
    assert lim.state().ceiling == 30.0
    assert lim.cuts == 0
    clock.now += 0.1
    lim.peers_told([10.0, 10.0], cut=True)  # within the round trip: the same cut
    assert lim.limit == pytest.approx(24.0)
    followed = []
    for _ in range(5):
        clock.now += 0.3
        lim.peers_told([10.0, 10.0], cut=True)
        followed.append(round(lim.limit, 2))
    # 0.8 per cut while above 1.1 x the share (the mean with the others' 10 and 10); the last
    # cut stops at the share (10.76), and that is kept
    assert followed == [19.2, 15.36, 12.29, 10.76, 10.76]


def test_a_replica_at_or_below_its_share_does_not_follow_the_others_cuts() -> None:
    clock = FakeClock()
    lim = shaped(clock)
    lim.peers_told([19.0, 21.0], cut=True)
    assert lim.limit == 20.0
    lim.peers_told([], cut=True)  # alone: no share to hold
    assert lim.limit == 20.0


def test_pressed_within_tells_whether_traffic_filled_the_limit_lately() -> None:
    clock = FakeClock()
    lim = limiter(initial=3, clock=clock)
    assert not lim.pressed_within(1.0)
    lone = lim.try_acquire()
    assert lone is not None
    assert not lim.pressed_within(1.0)  # one of three permits: room left
    tickets = fill(lim)
    assert lim.pressed_within(1.0)
    clock.now += 5.0
    assert not lim.pressed_within(1.0)
    for ticket in [lone, *tickets]:
        lim.on_success(ticket)


def test_probe_step_none_and_no_fast_climb_is_plain_aimd() -> None:
    clock = FakeClock()
    lim = shaped(clock, probe_step=None, fast_climb=False)
    in_flight = congest_at_full_limit(lim, clock)
    for _ in range(15):  # below, at and past the old level alike: one step per round trip
        assert 0.9 <= round_trip(lim, in_flight) <= 1.0
    assert lim.limit > 22


# ---- round trips and the latency signal ------------------------------------------------------


def test_round_trips_are_sampled_from_successes_only() -> None:
    clock = FakeClock()
    lim = limiter(clock=clock)
    fast_429 = lim.try_acquire()
    assert fast_429 is not None
    clock.now = 0.001
    lim.on_congestion(fast_429)
    assert lim.state().rtt_s is None
    ok = lim.try_acquire()
    assert ok is not None
    clock.now += 0.5
    lim.on_success(ok)
    assert lim.state().rtt_s == pytest.approx(0.5)
    assert lim.state().min_rtt_s == pytest.approx(0.5)


def test_latency_signal_off_by_default_ignores_slow_answers() -> None:
    clock = FakeClock()
    lim = limiter(clock=clock)
    for rtt in (0.1, 0.1, 1.0):
        ticket = lim.try_acquire()
        assert ticket is not None
        clock.now += rtt
        lim.on_success(ticket)
    assert lim.state().decreases == 0


class QueueServer:
    """A server with `slots` that queues the rest; each request slows 5 % per request served."""

    def __init__(self, slots: int, base: float = 0.1, slowdown: float = 0.05) -> None:
        self.slots, self.base, self.slowdown = slots, base, slowdown

    def round_trip(self, in_flight: int) -> float:
        served = min(in_flight, self.slots)
        service = self.base * (1 + self.slowdown * served)
        return service * max(1.0, in_flight / self.slots)


def closed_loop(
    lim: AIMDLimiter, clock: FakeClock, rtt_at: Callable[[int], float], n: int
) -> list[int]:
    """Keep the limit full for `n` completions, each lasting `rtt_at(in flight at admission)`;
    the permits after each completion."""
    pending: list[tuple[float, int, Ticket]] = []
    order = itertools.count()
    seen = []
    for _ in range(n):
        for ticket in fill(lim):
            heapq.heappush(
                pending, (clock.now + rtt_at(lim.state().in_flight), next(order), ticket)
            )
        done_at, _, ticket = heapq.heappop(pending)
        clock.now = done_at
        lim.on_success(ticket)
        seen.append(lim.permits)
    return seen


def test_latency_signal_settles_at_a_queueing_servers_slot_count() -> None:
    """From 16, far above 4 slots: the limit steps down to the slot count, where one more
    request no longer pays, not below it as "latency above 2x the minimum" did with CPU
    batching."""
    clock = FakeClock()
    lim = AIMDLimiter(16, 1, 64, clock=clock, latency_signal=True)

    def queue_server(in_flight: int) -> float:  # 4 slots, each request 5 % slower per one served
        service = 0.1 * (1 + 0.05 * min(in_flight, 4))
        return service * max(1.0, in_flight / 4)

    seen = closed_loop(lim, clock, queue_server, 5000)
    assert set(seen[-1000:]) <= {3, 4, 5}, seen[-50:]  # within one slot, probing either side
    assert seen[-1000:].count(4) > 0.9 * 1000


def test_known_slots_hold_the_limit_one_above_them_where_the_latency_would_mislead() -> None:
    """llama.cpp on a CPU: each request about half again slower per request served, queue or
    not. Told the slots (its /props), the limit rides at slots + 1 and the probe is off."""
    clock = FakeClock()
    lim = AIMDLimiter(16, 1, 64, clock=clock, latency_signal=None)
    lim.fit_slots(4)
    assert lim.permits == 5

    def cpu_bound_server(in_flight: int) -> float:
        service = 0.1 * (1 + 0.5 * min(in_flight, 4))
        return service * max(1.0, in_flight / 4)

    seen = closed_loop(lim, clock, cpu_bound_server, 3000)
    assert set(seen[-1000:]) == {5}
    floor = AIMDLimiter(8, 8, 64)
    floor.fit_slots(2)
    assert floor.permits == 8  # never below the configured minimum
    kept = AIMDLimiter(16, 1, 64, clock=clock, latency_signal=True)
    kept.fit_slots(4, keep_latency_signal=True)
    assert kept.permits == 5 and kept._queue_probe is not None


def test_latency_signal_stays_out_of_the_way_of_a_server_that_does_not_queue() -> None:
    clock = FakeClock()
    lim = AIMDLimiter(4, 1, 64, clock=clock, latency_signal=True)
    closed_loop(lim, clock, lambda in_flight: 0.1, 3000)  # the same latency at any level
    assert lim.permits == 64


def test_latency_signal_by_default_stops_once_a_provider_announces_its_quota() -> None:
    clock = FakeClock()
    lim = AIMDLimiter(8, 1, 64, clock=clock)
    ticket = lim.try_acquire()
    assert ticket is not None and lim._queue_probe is not None
    clock.now = 0.1
    lim.on_success(ticket, None, RateLimits(Quota(600, 599, 0.1)))
    assert lim._queue_probe is None


# ---- Retry-After re-entry ramp -------------------------------------------------------------


def test_after_the_gate_the_permits_come_back_over_a_ramp() -> None:
    clock = FakeClock()
    lim = limiter(initial=10, clock=clock, rng=0.0, jitter=0.5)
    lim.defer(2.0)  # gate until 2.0, then a ramp of 1.0 s
    clock.now = 2.0
    assert len(fill(lim)) == 1
    clock.now = 2.5
    assert len(fill(lim)) == 4  # half the permits
    clock.now = 3.0
    assert len(fill(lim)) == 5
    assert lim.state().in_flight == 10


async def test_a_request_queued_inside_the_ramp_with_nothing_in_flight_is_still_woken() -> None:
    """The stall the end-to-end bench hit with a capacity-limited provider: every request
    drained during a Retry-After gate, the gate's wake-up was pending, and a new acquire
    replaced it with nothing because the ramp step it computed had already passed."""
    clock = FakeClock(0.0)
    lim = limiter(initial=10, clock=clock, rng=0.0, jitter=0.5)
    lim.defer(1.0)  # gate until 1.0 s, then permits come back over 0.5 s
    first = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    assert not first.done()
    clock.now = 1.3  # inside the ramp (6 of 10 permits), before the pending wake-up ran
    second = asyncio.create_task(lim.acquire())
    done, _ = await asyncio.wait({first, second}, timeout=0.5)
    assert done == {first, second}
    assert lim.state().in_flight == 2


async def test_waiters_blocked_by_the_gate_are_woken_when_it_opens() -> None:
    lim = AIMDLimiter(4, 1, 4, retry_after_jitter=0.0)
    lim.defer(0.05)
    waiters = [asyncio.create_task(lim.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert lim.state().waiting == 3
    await asyncio.wait_for(asyncio.gather(*waiters), 2.0)
    assert lim.state().in_flight == 3


# ---- RPM / TPM budgets -----------------------------------------------------------------------


def test_rpm_budget_admits_a_ten_second_burst_then_the_refill_rate() -> None:
    clock = FakeClock()
    lim = AIMDLimiter(100, 1, 100, clock=clock, requests_per_minute=60)
    assert len(fill(lim)) == 10  # 10 s worth of 60 RPM
    clock.now = 1.0
    assert len(fill(lim)) == 1
    assert lim.state().rpm_tokens == pytest.approx(0.0)


def test_tpm_budget_charges_the_estimate_and_reconciles_with_usage() -> None:
    clock = FakeClock()
    lim = AIMDLimiter(100, 1, 100, clock=clock, tokens_per_minute=1000)
    first = lim.try_acquire(tokens=600)
    assert first is not None
    assert lim.try_acquire(tokens=600) is None  # 400 left
    lim.on_success(first, used_tokens=100)  # it used far less than estimated
    assert lim.state().tpm_tokens == pytest.approx(900.0)
    assert lim.try_acquire(tokens=600) is not None


def test_a_request_bigger_than_the_whole_token_budget_fails_fast() -> None:
    lim = AIMDLimiter(10, 1, 10, tokens_per_minute=1000)
    with pytest.raises(LLMFailure) as caught:
        lim.try_acquire(tokens=1001)
    assert caught.value.reason == "exceeds_token_budget"
    assert caught.value.kind is FailureKind.ROW


async def test_acquire_of_a_too_big_request_raises_instead_of_hanging() -> None:
    lim = AIMDLimiter(10, 1, 10, tokens_per_minute=1000)
    with pytest.raises(LLMFailure):
        await asyncio.wait_for(lim.acquire(tokens=5000), 1.0)
    assert lim.state().waiting == 0


async def test_a_waiter_for_tokens_is_woken_by_the_refill() -> None:
    lim = AIMDLimiter(10, 1, 10, tokens_per_minute=60_000)  # 1000 tokens a second
    first = lim.try_acquire(tokens=60_000)
    assert first is not None
    waiter = asyncio.create_task(lim.acquire(tokens=50))  # fits after ~50 ms
    ticket = await asyncio.wait_for(waiter, 2.0)
    assert ticket.tokens == 50


def test_from_settings_uses_every_knob() -> None:
    settings = ConcurrencySettings(
        initial=4, min=2, max=8, latency_signal=True, requests_per_minute=600
    )
    lim = AIMDLimiter.from_settings(settings)
    assert lim.limit == 4.0
    assert lim.state().rpm_tokens == pytest.approx(100.0)


def test_state_shows_the_retry_budget_once_attached() -> None:
    clock = FakeClock()
    lim = limiter(clock=clock)
    assert lim.state().retry_budget_tokens is None
    lim.retry_budget = RetryBudget(ratio=0.1, min_per_s=1.0, window_s=10.0, clock=clock)
    assert lim.state().retry_budget_tokens == pytest.approx(10.0)
