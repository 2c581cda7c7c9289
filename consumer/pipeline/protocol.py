"""The one protocol every step speaks, after Sentry Arroyo's processing strategies.

A step takes values with `submit()` and hands what it finished to the next step on `poll()`,
in input order. `submit()` raises `Rejected` when the step is full: the caller keeps the value
and offers it again later (the loop pauses the partitions meanwhile), so backpressure never
drops data. Shutdown and revocation take one path: `close()` (no more submits), `await
join(deadline)` (finish what fits in the deadline, passing it on), then `terminate()` (drop
the rest: its offsets stay uncommitted and the partitions' next owner reads it again).

Steps that run work in tasks call `Wakeup.set()` when a task finishes, so the loop polls the
chain at once instead of on its fetch cadence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

T_contra = TypeVar("T_contra", contravariant=True)
In = TypeVar("In")
Out = TypeVar("Out")

# A join whose next step is full rechecks this often even if no wakeup comes.
_FULL_NEXT_STEP_RECHECK_S = 0.05


class Rejected(Exception):
    """The step is full: keep the value, offer it again after the next `poll()`."""


class Step(Protocol[T_contra]):
    def submit(self, value: T_contra) -> None:
        """Take a value or raise `Rejected`; never blocks."""

    def poll(self) -> None:
        """Forward finished work in order and poll the next step; re-raise a failed task."""

    def close(self) -> None:
        """No new input will come: tell the next step at once. Values a step still holds are
        forwarded during `join`, so a closed step still takes them."""

    async def join(self, deadline: Deadline) -> None:
        """Finish and forward what fits before the deadline, then join the next step."""

    def terminate(self) -> None:
        """Drop unfinished work (cancel its tasks), then terminate the next step."""


class Transform(Generic[In, Out]):
    """A step that turns each value into another at once, with no I/O (decode, encode).

    A value the next step rejected is offered again by the caller; it is transformed once.
    """

    def __init__(self, next_step: Step[Out]) -> None:
        self._next = next_step
        self._last: tuple[In, Out] | None = None

    def transform(self, value: In) -> Out:
        raise NotImplementedError

    def taken(self, value: In) -> None:
        """The next step took the value (a hook for counting)."""

    def submit(self, value: In) -> None:
        if self._last is not None and self._last[0] is value:
            out = self._last[1]
        else:
            out = self.transform(value)
            self._last = (value, out)
        self._next.submit(out)  # Rejected propagates: the caller keeps the value
        self._last = None
        self.taken(value)

    def poll(self) -> None:
        self._next.poll()

    def close(self) -> None:
        self._next.close()

    async def join(self, deadline: Deadline) -> None:
        await self._next.join(deadline)

    def terminate(self) -> None:
        self._last = None
        self._next.terminate()


class Deadline:
    """One time budget spent across every step of a join (and whatever follows it)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ends = clock() + seconds

    def remaining(self) -> float:
        return max(0.0, self._ends - self._clock())

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0


class Wakeup:
    """Tells the loop (or a join) that some step has finished something and wants a poll."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, at_most_s: float) -> None:
        """Until set or `at_most_s` passed; clears the signal for the next wait."""
        if not self._event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), at_most_s)
        self._event.clear()


async def join_in_order(
    forward: Callable[[], bool],
    head_task: Callable[[], asyncio.Future[Any] | None],
    wakeup: Wakeup,
    deadline: Deadline,
) -> bool:
    """Forward finished work until nothing is left or the deadline passes; True if drained.

    `forward()` passes on what it can (polling the next step) and says whether nothing is left
    to forward; `head_task()` is the oldest unfinished task to wait for, or None when the head
    is finished but the next step is full (then the next step's progress wakes us).
    """
    while not forward():
        remaining = deadline.remaining()
        if remaining <= 0.0:
            return False
        head = head_task()
        if head is not None:
            await asyncio.wait([head], timeout=remaining)
        else:
            await wakeup.wait(min(remaining, _FULL_NEXT_STEP_RECHECK_S))
    return True
