"""Which offsets may be committed: only a contiguous prefix of finished records per partition.

Offsets are tracked in consumption order, not by arithmetic, because a partition's offsets have
gaps (transaction markers, compaction): the commit is "last finished offset + 1" of the prefix.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from consumer.records import TopicPartition


class OffsetTracker:
    def __init__(self) -> None:
        self._pending: dict[TopicPartition, deque[int]] = {}
        self._finished: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def track(self, tp: TopicPartition, offset: int) -> None:
        """A record was consumed and must be finished before anything after it commits."""
        self._pending.setdefault(tp, deque()).append(offset)

    def finish(self, tp: TopicPartition, offset: int) -> None:
        """Its output (or dead letter) was acknowledged by the broker."""
        pending = self._pending.get(tp)
        if not pending:
            return
        finished = self._finished.setdefault(tp, set())
        finished.add(offset)
        while pending and pending[0] in finished:
            done = pending.popleft()
            finished.discard(done)
            self._next[tp] = done + 1

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets to commit now: those that moved since the last commit."""
        return {
            tp: offset for tp, offset in self._next.items() if self._committed.get(tp, -1) < offset
        }

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            self._committed[tp] = max(offset, self._committed.get(tp, -1))

    def first_pending(self, tp: TopicPartition) -> int | None:
        """The first consumed offset not yet finished: where to read again after abandoning."""
        pending = self._pending.get(tp)
        return pending[0] if pending else None

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """A revoked partition's unfinished records belong to its next owner now."""
        for tp in partitions:
            self._pending.pop(tp, None)
            self._finished.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
