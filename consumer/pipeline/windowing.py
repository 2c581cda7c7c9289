"""Step 2, windowing: items gather into windows that close on count or on a timer.

A closed window the next step cannot take yet is kept here, and new items are rejected until
it is taken, so while running at most one closed window waits in this step. The window's
deadline is a timer on the event loop that wakes the loop, so an idle window closes on time.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from consumer.pipeline.protocol import Deadline, Rejected, Step, Wakeup
from consumer.records import Item
from consumer.window import CloseReason, Window, WindowAccumulator


class WindowingStep:
    def __init__(
        self,
        accumulator: WindowAccumulator,
        next_step: Step[Window],
        wakeup: Wakeup,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._accumulator = accumulator
        self._next = next_step
        self._wakeup = wakeup
        self._clock = clock
        # Closed windows the next step has not taken yet, oldest first: one while running, and
        # the open window too once the step is closed.
        self._closed: deque[Window] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._close_reason = CloseReason.SHUTDOWN

    def submit(self, value: Item) -> None:
        if self._closed:
            raise Rejected
        opens = self._accumulator.deadline() is None
        window = self._accumulator.add(value)
        if window is not None:
            self._cancel_timer()
            self._closed.append(window)
            self._offer()
        elif opens:
            self._arm_timer()

    def poll(self) -> None:
        self._offer()
        if not self._closed:
            window = self._accumulator.close_if_due()
            if window is not None:
                self._cancel_timer()
                self._closed.append(window)
                self._offer()
        self._next.poll()

    def close_reason(self, reason: CloseReason) -> None:
        """Why the open window will close early when the chain closes (revoke or shutdown)."""
        self._close_reason = reason

    def drop_unstarted(self) -> int:
        """On SIGTERM, before `close()`: the open window and the closed ones the next step has
        not taken are dropped instead of started (their offsets stay uncommitted, the next
        owner reads them again), so a stop finishes what is in flight and starts nothing new.
        Returns how many items were dropped."""
        self._cancel_timer()
        dropped = sum(len(window.items) for window in self._closed)
        self._closed.clear()
        window = self._accumulator.close(CloseReason.SHUTDOWN)
        return dropped + (len(window.items) if window is not None else 0)

    def close(self) -> None:
        self._cancel_timer()
        window = self._accumulator.close(self._close_reason)
        if window is not None:
            self._closed.append(window)
        self._next.close()

    async def join(self, deadline: Deadline) -> None:
        while self._closed and not deadline.expired:
            self._next.poll()
            self._offer()
            if self._closed:
                await self._wakeup.wait(min(deadline.remaining(), 0.05))
        await self._next.join(deadline)

    def terminate(self) -> None:
        self._cancel_timer()
        self._closed.clear()
        self._accumulator.close(self._close_reason)
        self._next.terminate()

    def _offer(self) -> None:
        while self._closed:
            try:
                self._next.submit(self._closed[0])
            except Rejected:
                return
            self._closed.popleft()

    def _arm_timer(self) -> None:
        deadline = self._accumulator.deadline()
        if deadline is not None:
            delay = max(0.0, deadline - self._clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._wakeup.set)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
