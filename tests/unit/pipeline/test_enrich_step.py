"""Enrich step: several windows at once, forwarded in order, held back while the provider fails."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from consumer.config import RetrySettings
from consumer.enrich.outcome import RowOutcome
from consumer.pipeline.enrich import EnrichedWindow, EnrichStep
from consumer.pipeline.protocol import Deadline, Rejected, Wakeup
from consumer.retry import Backoff
from consumer.window import Window
from tests.unit.pipeline.recording import (
    FakeClock,
    FakeHealth,
    Recording,
    RecordingSleep,
    dead_item,
    fixed_rng,
    retryable_failure,
    row_ids,
    row_item,
    spin,
    success,
    systemic_failure,
    turns,
    window,
)

# (row, how many times this row was enriched so far, this time included) -> its outcome
Answer = Callable[[dict[str, Any], int], RowOutcome]


def always_succeeds(row: dict[str, Any], attempt: int) -> RowOutcome:
    return success(f"answer {row['id']}")


class ScriptedEnricher:
    """A fake WindowEnricher: answers each row by script and counts successes as the caller does.

    `gates[first_row_id]` makes the first round of that window wait until the event is set;
    `elsewhere` successes are added to the health during every round (other windows' traffic).
    """

    def __init__(self, health: FakeHealth, answer: Answer = always_succeeds) -> None:
        self.health = health
        self.answer = answer
        self.elsewhere = 0
        self.rounds: list[list[Any]] = []
        self.attempts: Counter[Any] = Counter()
        self.gates: dict[Any, asyncio.Event] = {}

    def gate(self, first_row_id: Any) -> asyncio.Event:
        return self.gates.setdefault(first_row_id, asyncio.Event())

    async def enrich(self, rows: Sequence[dict[str, Any]]) -> list[RowOutcome]:
        ids = row_ids(rows)
        self.rounds.append(ids)
        gate = self.gates.pop(ids[0], None) if ids else None
        if gate is not None:
            await gate.wait()
        self.health.successes += self.elsewhere
        outcomes = []
        for row in rows:
            self.attempts[row["id"]] += 1
            outcome = self.answer(row, self.attempts[row["id"]])
            if outcome.completion is not None:
                self.health.successes += 1
            outcomes.append(outcome)
        return outcomes


class Harness:
    def __init__(
        self,
        answer: Answer = always_succeeds,
        *,
        max_windows: int = 4,
        partial_window_retries: int = 2,
        blocking_sleep: bool = False,
        limit_idle: Callable[[], bool] | None = None,
        max_windows_when_idle: int = 0,
    ) -> None:
        self.health = FakeHealth()
        self.enricher = ScriptedEnricher(self.health, answer)
        self.next: Recording[EnrichedWindow] = Recording()
        self.sleep = RecordingSleep(blocking=blocking_sleep)
        self.clock = FakeClock()
        self.wakeup = Wakeup()
        self.step = EnrichStep(
            self.enricher,  # type: ignore[arg-type]
            RetrySettings(partial_window_retries=partial_window_retries),
            self.health,
            max_windows,
            self.next,
            self.wakeup,
            Backoff(2.0, 60.0, fixed_rng),
            sleep=self.sleep,
            clock=self.clock,
            limit_idle=limit_idle,
            max_windows_when_idle=max_windows_when_idle,
        )

    def forwarded(self) -> list[Window]:
        return [enriched.window for enriched in self.next.submitted]

    async def until_forwarded(self, count: int) -> None:
        await spin(lambda: len(self.next.submitted) >= count, poll=self.step.poll)


async def test_windows_are_enriched_concurrently_in_the_order_they_arrive() -> None:
    h = Harness()
    first = window(row_item(0), row_item(1))
    second = window(row_item(2), row_item(3))
    h.enricher.gate(0)
    h.enricher.gate(2)
    h.step.submit(first)
    h.step.submit(second)
    await turns()
    assert h.enricher.rounds == [[0, 1], [2, 3]]  # both started, neither finished
    assert h.step.in_flight == 2


async def test_windows_are_forwarded_in_submit_order_even_if_a_later_one_finishes_first() -> None:
    h = Harness()
    first = window(row_item(0))
    second = window(row_item(1))
    first_gate = h.enricher.gate(0)
    second_gate = h.enricher.gate(1)
    h.step.submit(first)
    h.step.submit(second)
    second_gate.set()
    await turns()
    h.step.poll()
    assert h.next.submitted == []
    first_gate.set()
    await h.until_forwarded(2)
    assert h.forwarded() == [first, second]
    assert h.next.polls >= 1


async def test_more_windows_than_max_windows_are_rejected_until_one_is_forwarded() -> None:
    h = Harness(max_windows=2)
    gates = [h.enricher.gate(i) for i in range(2)]
    h.step.submit(window(row_item(0)))
    h.step.submit(window(row_item(1)))
    third = window(row_item(2))
    with pytest.raises(Rejected):
        h.step.submit(third)
    gates[0].set()
    await h.until_forwarded(1)
    h.step.submit(third)  # room again
    assert h.step.in_flight == 2
    gates[1].set()
    await h.until_forwarded(3)


async def test_while_the_limit_idles_one_more_window_at_a_time_starts_up_to_the_idle_bound() -> (
    None
):
    idle = [True]
    h = Harness(max_windows=2, limit_idle=lambda: idle[0], max_windows_when_idle=4)
    gates = [h.enricher.gate(i) for i in range(6)]  # every window waits (on a hinted row, say)
    h.step.submit(window(row_item(0)))
    h.step.submit(window(row_item(1)))
    await turns()
    h.step.submit(window(row_item(2)))  # beyond max_windows: the limit idles
    with pytest.raises(Rejected):
        h.step.submit(window(row_item(3)))  # the last one has not queued its rows yet
    await turns()
    h.step.submit(window(row_item(3)))
    await turns()
    with pytest.raises(Rejected):
        h.step.submit(window(row_item(4)))  # the idle bound
    assert h.step.in_flight == 4
    for gate in gates:
        gate.set()
    await h.until_forwarded(4)


async def test_a_busy_limit_a_held_window_or_a_failing_provider_start_no_extra_window() -> None:
    idle = [False]
    h = Harness(max_windows=1, limit_idle=lambda: idle[0], max_windows_when_idle=4)
    gate = h.enricher.gate(0)
    h.step.submit(window(row_item(0)))
    await turns()
    with pytest.raises(Rejected):
        h.step.submit(window(row_item(1)))  # rows queue at the limiter: it is not idle
    idle[0] = True
    h.health.down = "LLM provider failing for 3.0 s: overloaded"
    with pytest.raises(Rejected):
        h.step.submit(window(row_item(1)))  # more windows would only fail too
    h.health.down = None
    h.step.submit(window(row_item(1)))
    gate.set()
    await h.until_forwarded(2)


async def test_a_finished_window_the_next_step_rejects_still_takes_a_slot() -> None:
    h = Harness(max_windows=1)
    h.next.rejecting = True
    first = window(row_item(0))
    h.step.submit(first)
    await turns()
    h.step.poll()
    with pytest.raises(Rejected):
        h.step.submit(window(row_item(1)))
    h.next.rejecting = False
    h.step.poll()
    assert h.forwarded() == [first]
    assert h.next.offered.count(h.next.submitted[0]) == 2  # the same result, offered again


async def test_dead_letter_items_get_none_outcomes_aligned_with_the_items() -> None:
    h = Harness()
    items = [row_item(0), dead_item(1), row_item(2), dead_item(3)]
    h.step.submit(window(*items))
    await h.until_forwarded(1)
    [enriched] = h.next.submitted
    assert h.enricher.rounds == [[0, 2]]  # only the rows are enriched
    assert len(enriched.outcomes) == len(items)
    assert enriched.outcomes[1] is None and enriched.outcomes[3] is None
    first, third = enriched.outcomes[0], enriched.outcomes[2]
    assert first is not None and first.completion is not None
    assert third is not None and third.completion is not None
    assert first.completion.content == "answer 0"
    assert third.completion.content == "answer 2"


async def test_a_window_of_dead_letters_only_is_forwarded_with_no_outcomes() -> None:
    h = Harness()
    h.step.submit(window(dead_item(0), dead_item(1)))
    await h.until_forwarded(1)
    assert h.next.submitted[0].outcomes == [None, None]
    assert h.sleep.delays == []


async def test_the_enriched_window_carries_when_its_enrichment_started() -> None:
    h = Harness()
    gate = h.enricher.gate(0)
    h.clock.now = 123.0
    h.step.submit(window(row_item(0)))
    await turns()  # the task has started: it waits for the provider
    h.clock.now = 200.0
    gate.set()
    await h.until_forwarded(1)
    assert h.next.submitted[0].started_at == 123.0


def stubborn_row(failing_id: int, *, gives_up_after: int = 1000) -> Answer:
    """Row `failing_id` fails retryably (until `gives_up_after` attempts); others succeed."""

    def answer(row: dict[str, Any], attempt: int) -> RowOutcome:
        if row["id"] == failing_id and attempt < gives_up_after:
            return retryable_failure()
        return success()

    return answer


async def test_a_row_failing_while_other_windows_succeed_ends_as_retries_exhausted() -> None:
    h = Harness(stubborn_row(1), partial_window_retries=2)
    h.enricher.elsewhere = 1  # every round, some other request of the process succeeds
    h.step.submit(window(row_item(0), row_item(1), row_item(2)))
    await h.until_forwarded(1)
    # One first round, then one retry per partial hold, then its error stands.
    assert h.enricher.rounds == [[0, 1, 2], [1], [1]]
    assert h.sleep.delays == [2.0, 4.0]
    outcomes = h.next.submitted[0].outcomes
    failed = outcomes[1]
    assert failed is not None and failed.error is not None
    assert failed.error.reason == "retries_exhausted"
    assert [o is not None and o.completion is not None for o in outcomes] == [True, False, True]
    assert h.step.held_back_reason is None


async def test_a_row_failing_while_its_own_windows_rows_succeeded_is_not_held_forever() -> None:
    # The row would succeed on its 12th attempt: that only ends the test, it is not the point.
    h = Harness(stubborn_row(1, gives_up_after=12), partial_window_retries=2)
    h.step.submit(window(row_item(0), row_item(1), row_item(2)))
    await h.until_forwarded(1)
    assert len(h.enricher.rounds) == 1 + 2, f"{len(h.enricher.rounds)} rounds"
    failed = h.next.submitted[0].outcomes[1]
    assert failed is not None and failed.error is not None
    assert failed.error.reason == "retries_exhausted"


async def test_at_the_edge_of_an_outage_the_hold_waits_until_the_provider_counts_as_down() -> None:
    """The round fails just after other requests succeeded, before the failure streak counts:
    the step waits for the verdict instead of spending a partial hold on the outage."""
    down_for = 3  # every request fails for three rounds: an outage, not these rows

    def answer(row: dict[str, Any], attempt: int) -> RowOutcome:
        return retryable_failure() if attempt <= down_for else success()

    h = Harness(answer, partial_window_retries=0)
    h.enricher.elsewhere = 1  # successes from just before the outage, in the first round only
    h.health.undecided_steps = [1.5, 0.05]  # the streak is young when the first round ends

    def on_sleep(seconds: float) -> None:
        h.enricher.elsewhere = 0
        if not h.health.undecided_steps:
            h.health.down = "LLM provider failing for 2.0 s: server_error"

    h.sleep.on_sleep = on_sleep
    h.step.submit(window(row_item(0), row_item(1)))
    await h.until_forwarded(1)
    assert h.sleep.delays[:2] == [0.05, 0.05]  # waiting for the verdict, then holds
    outcomes = h.next.submitted[0].outcomes
    assert all(o is not None and o.completion is not None for o in outcomes), outcomes


async def test_a_window_failing_everywhere_is_held_until_the_provider_recovers() -> None:
    down_for = 4  # the provider answers again from each row's 5th attempt

    def answer(row: dict[str, Any], attempt: int) -> RowOutcome:
        return retryable_failure() if attempt <= down_for else success()

    h = Harness(answer, partial_window_retries=0)
    reasons: list[str | None] = []
    h.sleep.on_sleep = lambda _: reasons.append(h.step.held_back_reason)
    h.step.submit(window(row_item(0), row_item(1)))
    await h.until_forwarded(1)
    assert len(h.enricher.rounds) == down_for + 1
    assert h.sleep.delays == [2.0, 4.0, 8.0, 16.0]  # the hold grows
    assert reasons == ["retries_exhausted (2 rows failing)"] * down_for
    assert h.step.held_back_reason is None  # cleared once it recovered
    outcomes = h.next.submitted[0].outcomes
    assert all(o is not None and o.completion is not None for o in outcomes)


async def test_a_systemic_failure_holds_the_window_and_reports_why_while_it_waits() -> None:
    h = Harness(lambda row, attempt: systemic_failure() if attempt == 1 else success())
    h.sleep.blocking = True
    h.step.submit(window(row_item(0)))
    await spin(lambda: h.sleep.sleeping == 1)
    assert h.step.held_back_reason == "unauthorized (1 rows failing)"
    h.step.poll()
    assert h.next.submitted == []
    h.sleep.wake()
    await h.until_forwarded(1)
    assert h.step.held_back_reason is None


async def test_close_during_a_hold_abandons_it_at_once_and_drops_the_windows_behind() -> None:
    h = Harness(
        lambda row, attempt: retryable_failure() if row["id"] == 0 else success(),
        blocking_sleep=True,
    )
    held = window(row_item(0))
    behind = window(row_item(1))
    h.step.submit(held)
    h.step.submit(behind)
    await spin(lambda: h.sleep.sleeping == 1)
    h.step.poll()
    assert h.next.submitted == []
    h.step.close()
    assert h.next.closes == 1
    # The blocked sleep is never woken: close alone ends the hold.
    await asyncio.wait_for(h.step.join(Deadline(3600.0, FakeClock())), timeout=5.0)
    assert h.next.submitted == []  # neither the held window nor the finished one behind it
    assert h.next.joins == 1
    assert h.step.in_flight == 2  # left for terminate: their rows go to the next owner
    assert h.step.held_back_reason is None
    h.step.terminate()
    assert h.step.in_flight == 0
    assert h.next.terminates == 1


async def test_a_window_closed_before_its_first_hold_gives_up_without_waiting() -> None:
    h = Harness(lambda row, attempt: retryable_failure())
    gate = h.enricher.gate(0)
    h.step.submit(window(row_item(0)))
    await turns()
    h.step.close()
    gate.set()
    await asyncio.wait_for(h.step.join(Deadline(3600.0, FakeClock())), timeout=5.0)
    assert h.sleep.delays == []
    assert h.next.submitted == []


async def test_windows_ahead_of_an_abandoned_one_are_still_forwarded_by_join() -> None:
    h = Harness(
        lambda row, attempt: retryable_failure() if row["id"] == 1 else success(),
        blocking_sleep=True,
    )
    ahead = window(row_item(0))
    gate = h.enricher.gate(0)
    h.step.submit(ahead)
    h.step.submit(window(row_item(1)))
    await spin(lambda: h.sleep.sleeping == 1)
    h.step.close()
    gate.set()
    await asyncio.wait_for(h.step.join(Deadline(3600.0, FakeClock())), timeout=5.0)
    assert h.forwarded() == [ahead]


async def test_join_waits_for_windows_in_flight_forwards_them_then_joins_the_next_step() -> None:
    h = Harness()
    gate = h.enricher.gate(0)
    first, second = window(row_item(0)), window(row_item(1))
    h.step.submit(first)
    h.step.submit(second)
    h.step.close()
    join = asyncio.ensure_future(h.step.join(Deadline(3600.0, FakeClock())))
    await turns()
    assert not join.done()
    gate.set()
    await asyncio.wait_for(join, timeout=5.0)
    assert h.forwarded() == [first, second]
    assert h.next.events[-1] == "join"


async def test_terminate_cancels_the_windows_in_flight_and_terminates_the_next_step() -> None:
    h = Harness()
    h.enricher.gate(0)
    h.step.submit(window(row_item(0)))
    await turns()
    h.step.terminate()
    await turns()
    h.step.poll()
    assert h.next.submitted == []
    assert h.step.in_flight == 0
    assert h.next.terminates == 1


async def test_an_enricher_that_raises_is_a_bug_and_stops_the_consumer_from_poll() -> None:
    class Broken:
        async def enrich(self, rows: Sequence[dict[str, Any]]) -> list[RowOutcome]:
            raise RuntimeError("a bug in the enricher")

    step = EnrichStep(
        Broken(),  # type: ignore[arg-type]
        RetrySettings(),
        FakeHealth(),
        4,
        Recording[EnrichedWindow](),
        Wakeup(),
        Backoff(2.0, 60.0, fixed_rng),
        sleep=RecordingSleep(),
    )
    step.submit(window(row_item(0)))
    await turns()
    with pytest.raises(RuntimeError, match="a bug in the enricher"):
        step.poll()


async def test_a_finished_window_wakes_the_loop() -> None:
    h = Harness()
    h.step.submit(window(row_item(0)))
    await asyncio.wait_for(h.wakeup.wait(3600.0), timeout=5.0)
    h.step.poll()
    assert len(h.next.submitted) == 1
