"""Step 6, commit (at-least-once): input offsets, once the broker acknowledged the outputs.

Windows arrive here in input order and delivered, so the offset to commit for a partition is
the last offset of its newest delivered window + 1: every record before it was in an earlier
window. One commit runs at a time; windows delivered meanwhile are merged into the next one.
A window goes on to the next step once a commit covering it succeeded. A failed commit is
retried with the next (the offsets stay pending); nothing is ever committed past a record
whose output was not acknowledged. In exactly-once mode offsets are committed inside the
delivery transactions and this step is not in the chain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiokafka.errors import KafkaError

from consumer.pipeline.encode import EncodedWindow
from consumer.pipeline.protocol import Deadline, Rejected, Step, Wakeup
from consumer.records import TopicPartition
from consumer.retry import Backoff

log = logging.getLogger("consumer")

# Delivered windows waiting for a commit beyond this push back on delivery (and so on fetching).
_MAX_UNCOMMITTED_WINDOWS = 16


class Committer(Protocol):
    async def commit(self, offsets: dict[TopicPartition, int]) -> None: ...


class CommitEvents(Protocol):
    def committed(self, seconds: float) -> None: ...

    def partition_advanced(self, tp: TopicPartition) -> None: ...


class OffsetTracker:
    """The next offset to commit per partition: it only moves forward."""

    def __init__(self) -> None:
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def advance(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            current = self._next.get(tp, -1)
            if offset < current:
                raise ValueError(f"{tp} went back from {current} to {offset}: out of order")
            self._next[tp] = offset

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets to commit now: those that moved since the last commit."""
        return {
            tp: offset for tp, offset in self._next.items() if self._committed.get(tp, -1) < offset
        }

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            self._committed[tp] = max(offset, self._committed.get(tp, -1))


class CommitStep:
    def __init__(
        self,
        committer: Committer,
        events: CommitEvents,
        next_step: Step[EncodedWindow],
        wakeup: Wakeup,
        backoff: Backoff,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._committer = committer
        self._backoff = backoff
        self._sleep = sleep
        self._failures = 0
        self._events = events
        self._next = next_step
        self._wakeup = wakeup
        self._clock = clock
        self._tracker = OffsetTracker()
        self._uncommitted: list[EncodedWindow] = []
        self._commit: asyncio.Task[None] | None = None
        self._covered: list[EncodedWindow] = []

    def submit(self, value: EncodedWindow) -> None:
        if len(self._uncommitted) + len(self._covered) >= _MAX_UNCOMMITTED_WINDOWS:
            raise Rejected  # commits keep failing: stop taking delivered windows, keep memory
        self._tracker.advance(value.enriched.window.committable())
        self._uncommitted.append(value)
        self._start_commit()

    def poll(self) -> None:
        self._settle()
        self._start_commit()
        self._next.poll()

    def close(self) -> None:
        self._next.close()

    async def join(self, deadline: Deadline) -> None:
        while (self._commit is not None or self._uncommitted) and not deadline.expired:
            self._start_commit()
            if self._commit is None:
                break
            await asyncio.wait([self._commit], timeout=deadline.remaining())
            self._settle()
        await self._next.join(deadline)

    def terminate(self) -> None:
        if self._commit is not None:
            self._commit.cancel()
        self._commit = None
        self._uncommitted.clear()
        self._covered.clear()
        self._next.terminate()

    def _start_commit(self) -> None:
        if self._commit is not None:
            return
        offsets = self._tracker.committable()
        if not offsets:
            return
        self._covered, self._uncommitted = self._uncommitted, []
        self._commit = asyncio.create_task(self._run(offsets), name="commit")
        self._commit.add_done_callback(lambda _: self._wakeup.set())

    async def _run(self, offsets: dict[TopicPartition, int]) -> None:
        started = self._clock()
        try:
            await self._committer.commit(offsets)
        except KafkaError:
            # Waiting here keeps a broker outage from turning into a loop of failing commits.
            self._failures += 1
            await self._sleep(self._backoff.delay(self._failures))
            raise
        self._failures = 0
        self._tracker.committed(offsets)
        self._events.committed(self._clock() - started)
        for tp in offsets:
            self._events.partition_advanced(tp)

    def _settle(self) -> None:
        task = self._commit
        if task is None or not task.done():
            return
        self._commit = None
        covered, self._covered = self._covered, []
        error: Any = None if task.cancelled() else task.exception()
        if error is None and not task.cancelled():
            for window in covered:
                self._next.submit(window)  # the report step never rejects
            return
        if error is not None and not isinstance(error, KafkaError):
            raise error
        log.warning("commit failed; will retry with the next one", extra={"error": repr(error)})
        self._uncommitted = covered + self._uncommitted
