"""AIMD limit on concurrent LLM requests, shared by every row of every window in the process.

Decisions, and why:
- Additive increase of about `increase_step` per round trip (step/limit per success), and only
  while the limit is actually in use, so the idle tail of a window does not inflate it.
- Multiplicative decrease once per congestion event: a request that was admitted before the
  last decrease belongs to the overload that decrease already answered, so it cannot cut again.
- A limiter-wide "not before" time from Retry-After hints, with jitter, so waiting requests do
  not come back as a herd.
The arithmetic is synchronous and takes a clock, so it is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

_USED_FRACTION = 0.8


@dataclass(frozen=True)
class Ticket:
    """Proof of admission; remembers when, so congestion can be matched to its event."""

    admitted_at: float
    in_flight_at_admission: int


@dataclass(frozen=True)
class LimiterState:
    limit: float
    in_flight: int
    waiting: int
    not_before_in_s: float
    decreases: int


class AIMDLimiter:
    """Admission control: `async with limiter.slot() as ticket`, then report how it went."""

    def __init__(
        self,
        initial: int,
        minimum: int,
        maximum: int,
        decrease_factor: float = 0.7,
        increase_step: float = 1.0,
        retry_after_jitter: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError("need 1 <= minimum <= initial <= maximum")
        self._limit = float(initial)
        self._min = minimum
        self._max = maximum
        self._factor = decrease_factor
        self._step = increase_step
        self._jitter = retry_after_jitter
        self._clock = clock
        self._rng = rng
        self._in_flight = 0
        self._last_decrease_at = -math.inf
        self._not_before = -math.inf
        self._decreases = 0
        self._waiters: deque[asyncio.Future[Ticket]] = deque()
        self._wake_handle: asyncio.TimerHandle | None = None

    @property
    def limit(self) -> float:
        return self._limit

    @property
    def permits(self) -> int:
        return max(self._min, int(self._limit))

    def state(self) -> LimiterState:
        return LimiterState(
            limit=self._limit,
            in_flight=self._in_flight,
            waiting=len(self._waiters),
            not_before_in_s=max(0.0, self._not_before - self._clock()),
            decreases=self._decreases,
        )

    def try_acquire(self) -> Ticket | None:
        """Admit one request now if the limit and the Retry-After gate allow it."""
        now = self._clock()
        if now < self._not_before or self._in_flight >= self.permits:
            return None
        self._in_flight += 1
        return Ticket(admitted_at=now, in_flight_at_admission=self._in_flight)

    async def acquire(self) -> Ticket:
        """Wait, in FIFO order, for admission."""
        if not self._waiters:
            ticket = self.try_acquire()
            if ticket is not None:
                return ticket
        future: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._schedule_gate_wakeup()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._in_flight -= 1
                self._wake()
            elif future in self._waiters:
                self._waiters.remove(future)
            raise

    def on_success(self, ticket: Ticket) -> None:
        """A completed attempt: grow the limit if the limit was what held traffic back."""
        used = bool(self._waiters) or ticket.in_flight_at_admission >= self._limit * _USED_FRACTION
        self._in_flight -= 1
        if used and self._limit < self._max:
            self._limit = min(float(self._max), self._limit + self._step / self._limit)
        self._wake()

    def on_congestion(self, ticket: Ticket, retry_after_s: float | None = None) -> None:
        """A 429, 503, timeout...: cut once per event, and honour the server's wait hint."""
        self._in_flight -= 1
        now = self._clock()
        if ticket.admitted_at > self._last_decrease_at:
            before = self._limit
            self._limit = max(float(self._min), self._limit * self._factor)
            self._last_decrease_at = now
            self._decreases += 1
            log.debug("limiter decrease %.1f -> %.1f", before, self._limit)
        if retry_after_s is not None and retry_after_s > 0:
            self.defer(retry_after_s)
        self._wake()

    def on_ignore(self) -> None:
        """An attempt that says nothing about capacity (a 400, a transient 500)."""
        self._in_flight -= 1
        self._wake()

    def defer(self, seconds: float) -> None:
        """Hold every admission until `seconds` from now, plus jitter to spread re-entry."""
        until = self._clock() + seconds * (1.0 + self._jitter * self._rng())
        if until > self._not_before:
            self._not_before = until
            log.debug("limiter gate closed for %.2fs", until - self._clock())

    def _wake(self) -> None:
        while self._waiters:
            if self._waiters[0].done():
                self._waiters.popleft()
                continue
            ticket = self.try_acquire()
            if ticket is None:
                break
            self._waiters.popleft().set_result(ticket)
        self._schedule_gate_wakeup()

    def _schedule_gate_wakeup(self) -> None:
        if not self._waiters:
            return
        delay = self._not_before - self._clock()
        if delay <= 0:
            return
        if self._wake_handle is not None:
            self._wake_handle.cancel()
        self._wake_handle = asyncio.get_running_loop().call_later(delay, self._wake)
