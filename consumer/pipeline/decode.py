"""Step 1, decode: a consumed record becomes an item, a row or a dead letter, never an error.

Every limit a later step applies (size, nesting depth, key size) is checked here, so a record
that could not be processed is a dead letter with its reason before it enters a window.
"""

from __future__ import annotations

from collections.abc import Callable

from consumer.decode import RowLimits, decode_row
from consumer.pipeline.protocol import Deadline, Step
from consumer.records import DeadLetter, Item, SourceRecord


class DecodeStep:
    def __init__(
        self,
        limits: RowLimits,
        next_step: Step[Item],
        on_consumed: Callable[[], None] = lambda: None,
    ) -> None:
        self._limits = limits
        self._next = next_step
        self._on_consumed = on_consumed
        # A record the next step rejected is offered again; decode it only once.
        self._last: tuple[SourceRecord, Item] | None = None

    def submit(self, value: SourceRecord) -> None:
        if self._last is not None and self._last[0] is value:
            item = self._last[1]
        else:
            decoded = decode_row(value.key, value.value, self._limits)
            item = (
                Item(value, dead_letter=decoded)
                if isinstance(decoded, DeadLetter)
                else Item(value, row=decoded)
            )
            self._last = (value, item)
        self._next.submit(item)  # Rejected propagates: the loop keeps the record
        self._last = None
        self._on_consumed()

    def poll(self) -> None:
        self._next.poll()

    def close(self) -> None:
        self._next.close()

    async def join(self, deadline: Deadline) -> None:
        await self._next.join(deadline)

    def terminate(self) -> None:
        self._last = None
        self._next.terminate()
