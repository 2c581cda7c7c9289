"""Windows: gather items until `max_messages` or `max_wait` from the window's first item.

Pure and clock-driven, so the triggers are tested without sleeping. The time limit counts from
the first item (not from the last flush, as Arroyo and Faust do), and a window closes on its
deadline even if no further message arrives (unlike Quix Streams).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from consumer.records import Item, TopicPartition

_RUN_ID = uuid.uuid4().hex[:8]


class CloseReason(StrEnum):
    COUNT = "count"
    TIME = "time"
    SHUTDOWN = "shutdown"
    REVOKE = "revoke"


@dataclass
class Window:
    id: str
    items: list[Item]
    opened_at: float
    close_reason: CloseReason | None = None

    def committable(self) -> dict[TopicPartition, int]:
        """The offsets to commit once this window is delivered: last offset + 1 per partition.

        Windows travel the pipeline in order, so every earlier record of these partitions was
        in an earlier window that was delivered before this one.
        """
        offsets: dict[TopicPartition, int] = {}
        for item in self.items:
            tp = item.record.tp
            offsets[tp] = max(offsets.get(tp, 0), item.record.offset + 1)
        return offsets


class WindowAccumulator:
    """Holds the one window being filled."""

    def __init__(
        self, max_messages: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_messages = max_messages
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._sequence = itertools.count(1)
        self._open: Window | None = None

    def deadline(self) -> float | None:
        """When the open window must close on time, or None if nothing is open."""
        return None if self._open is None else self._open.opened_at + self._max_wait_s

    def add(self, item: Item) -> Window | None:
        """Add an item; returns the window if this item filled it."""
        if self._open is None:
            self._open = Window(
                id=f"{_RUN_ID}-{next(self._sequence)}", items=[], opened_at=self._clock()
            )
        self._open.items.append(item)
        if len(self._open.items) >= self._max_messages:
            return self.close(CloseReason.COUNT)
        return None

    def close_if_due(self) -> Window | None:
        deadline = self.deadline()
        if deadline is not None and self._clock() >= deadline:
            return self.close(CloseReason.TIME)
        return None

    def close(self, reason: CloseReason) -> Window | None:
        """Close the open window now (count, time, shutdown or revoke); None if empty."""
        window, self._open = self._open, None
        if window is not None:
            window.close_reason = reason
        return window
