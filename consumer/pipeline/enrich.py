"""Step 3, enrich: windows are enriched as soon as they arrive, several at once, in order.

Up to `max_pending_windows` windows are in flight: their rows all wait for the process-wide
limiter, whose admission is FIFO, so an older window's rows go first and a younger window only
takes the slots the older one's slow tail leaves free. Windows leave in arrival order. So the
window size decides how often offsets are committed and how much is held in memory, not how
fast rows go.

A row refused at capacity waits out the provider's hint outside the limit, and its window
cannot leave before it: with hints of seconds, every window in flight can be waiting on such a
row while the limit has free permits and nobody queues for them. Then (and only while no window
is held back and the provider answers) one more window at a time is started, up to
`max_pending_windows_when_idle`, so a long hint costs that row's window its latency, not the
limit its work.

A window whose round failed systemically (see `enrich/holdback.py`) is held back: it waits,
retries its failing rows, and keeps every window behind it (and their offsets) waiting too.
Once the chain is closed (revocation, shutdown), a held window gives up at once, and the
windows behind it are dropped with it: their partitions' next owner reads them again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from consumer import audit
from consumer.config import RetrySettings
from consumer.enrich.holdback import Hold, HoldBackPolicy
from consumer.enrich.outcome import RowOutcome
from consumer.enrich.runner import WindowEnricher
from consumer.pipeline.protocol import Deadline, Rejected, Step, Wakeup, join_in_order
from consumer.retry import Backoff
from consumer.window import Window

log = logging.getLogger("consumer")


class ProviderState(Protocol):
    """How the provider has answered this process so far (any row, any window)."""

    @property
    def successes(self) -> int: ...

    def failing(self) -> str | None: ...

    def undecided_for_s(self) -> float: ...


@dataclass(frozen=True)
class EnrichedWindow:
    window: Window
    # Aligned with window.items; None where the item is a dead letter (no row to enrich).
    outcomes: list[RowOutcome | None]
    started_at: float


class _Abandoned(Exception):
    """A held window gave up because the step was closed."""


class EnrichStep:
    def __init__(
        self,
        enricher: WindowEnricher,
        retry: RetrySettings,
        health: ProviderState,
        max_windows: int,
        next_step: Step[EnrichedWindow],
        wakeup: Wakeup,
        backoff: Backoff,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        *,
        limit_idle: Callable[[], bool] | None = None,
        max_windows_when_idle: int = 0,
    ) -> None:
        self._enricher = enricher
        self._retry = retry
        self._health = health
        self._max_windows = max_windows
        self._next = next_step
        self._wakeup = wakeup
        self._backoff = backoff
        self._sleep = sleep
        self._clock = clock
        self._in_flight: deque[tuple[Window, asyncio.Task[EnrichedWindow]]] = deque()
        self._holding: dict[str, str] = {}
        self._closed = asyncio.Event()
        self._abandoned = False
        # `limit_idle`: the limiter has free permits and no request waits for one.
        self._limit_idle = limit_idle
        self._max_windows_when_idle = max_windows_when_idle
        self._unstarted = 0  # submitted windows whose rows have not reached the limiter yet

    @property
    def held_back_reason(self) -> str | None:
        """Why the oldest held window waits, or None when none is held."""
        return next(iter(self._holding.values()), None)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def submit(self, value: Window) -> None:
        if self._abandoned:
            return  # nothing behind an abandoned window can be delivered: the next owner reads it
        if len(self._in_flight) >= self._max_windows and not self._limit_waits_for_work():
            raise Rejected
        self._unstarted += 1
        task = asyncio.create_task(self._started(value), name=f"enrich-{value.id}")
        task.add_done_callback(lambda _: self._wakeup.set())
        self._in_flight.append((value, task))

    def poll(self) -> None:
        self._forward()
        self._next.poll()

    def close(self) -> None:
        self._closed.set()
        self._next.close()

    async def join(self, deadline: Deadline) -> None:
        await join_in_order(self._forward_and_poll, self._head_task, self._wakeup, deadline)
        await self._next.join(deadline)

    def terminate(self) -> None:
        for _, task in self._in_flight:
            task.cancel()
        self._in_flight.clear()
        self._holding.clear()
        self._next.terminate()

    def _forward_and_poll(self) -> bool:
        done = self._forward()
        self._next.poll()
        return done

    def _head_task(self) -> asyncio.Future[Any] | None:
        if self._in_flight and not self._in_flight[0][1].done():
            return self._in_flight[0][1]
        return None

    def _limit_waits_for_work(self) -> bool:
        """Room for one window beyond `max_windows`: the limit idles while every window in
        flight waits (on hinted rows), the provider answers, and no window is held back. One at
        a time: a window just started has not queued its rows at the limiter yet."""
        return (
            self._limit_idle is not None
            and len(self._in_flight) < self._max_windows_when_idle
            and self._unstarted == 0
            and not self._holding
            and self._health.failing() is None
            and self._limit_idle()
        )

    async def _started(self, window: Window) -> EnrichedWindow:
        self._unstarted -= 1
        return await self._enrich(window)

    def _forward(self) -> bool:
        """Pass finished windows on in order; True when nothing is left that could be."""
        while self._in_flight:
            window, task = self._in_flight[0]
            if not task.done():
                return False
            if task.cancelled() or isinstance(task.exception(), _Abandoned):
                # Everything behind an abandoned window must wait for the next owner too.
                if not self._abandoned:
                    log.warning("window abandoned", extra={"window_id": window.id})
                self._abandoned = True
                return True
            try:
                self._next.submit(task.result())  # a failed task re-raises here: a bug
            except Rejected:
                return False
            self._in_flight.popleft()
        return True

    async def _enrich(self, window: Window) -> EnrichedWindow:
        started = self._clock()
        indexes = [i for i, item in enumerate(window.items) if item.row is not None]
        rows = [row for item in window.items if (row := item.row) is not None]
        policy = HoldBackPolicy(
            self._retry.partial_window_retries, self._backoff, self._retry.row_deadline_s
        )
        # Any provider success after this (in this window or another) shows the provider
        # works while the rows that fail here do not.
        sent_mark = self._health.successes
        audit.enter_window(window.id, window.items)  # the audit trail's source positions
        outcomes = await self._enricher.enrich(rows)
        round_outcomes = outcomes
        try:
            while True:
                if any(outcome.needs_retry_later for outcome in round_outcomes):
                    await self._until_provider_decided()
                hold = policy.next_hold(
                    outcomes,
                    round_outcomes,
                    self._health.successes > sent_mark,
                    provider_down=self._health.failing() is not None,
                    failing_for_s=self._clock() - started,
                )
                if hold is None:
                    break
                todo = hold.rows_to_retry(outcomes)
                self._announce_hold(window, hold, [outcomes[i] for i in todo], "live")
                await self._sleep_unless_closed(hold.seconds)
                round_outcomes = await self._enricher.enrich([rows[i] for i in todo])
                for index, outcome in zip(todo, round_outcomes, strict=True):
                    outcomes[index] = outcome
        finally:
            self._holding.pop(window.id, None)
        return aligned(window, indexes, outcomes, started)

    async def _until_provider_decided(self) -> None:
        """At the edge of an outage every request fails but the provider does not count as
        down yet, and the successes of just before still say it works: a hold judged then
        would use up the rows' partial holds, and a window whose rounds are quick would end
        its rows as errors within the first seconds of an outage. Wait (at most
        `failing_after_s`) until a success or the failure streak's length decides."""
        while (left := self._health.undecided_for_s()) > 0:
            await self._sleep_unless_closed(min(left, 0.05))

    def _announce_hold(
        self, window: Window, hold: Hold, failing: Sequence[RowOutcome], mode: str
    ) -> None:
        """Readiness names why the window waits, and one line says so."""
        first = failing[0].error
        reason = first.reason if first else "unknown"
        self._holding[window.id] = f"{reason} ({len(failing)} rows failing)"
        log.warning(
            "window held back: offsets stay uncommitted",
            extra={
                "window_id": window.id,
                "mode": mode,
                "reason": reason,
                "status_code": first.status_code if first else None,
                "systemic": hold.systemic,
                "failed_rows": len(failing),
                "retry_in_s": round(hold.seconds, 1),
            },
        )

    async def _sleep_unless_closed(self, seconds: float) -> None:
        if self._closed.is_set():
            raise _Abandoned
        closed = asyncio.ensure_future(self._closed.wait())
        sleeping = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait([closed, sleeping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            sleeping.cancel()
        if self._closed.is_set():
            raise _Abandoned


def aligned(
    window: Window, indexes: Sequence[int], outcomes: Sequence[RowOutcome | None], started: float
) -> EnrichedWindow:
    """The window with its rows' outcomes at their items' places (dead letters: None)."""
    placed: list[RowOutcome | None] = [None] * len(window.items)
    for index, outcome in zip(indexes, outcomes, strict=True):
        placed[index] = outcome
    return EnrichedWindow(window, placed, started)
