"""Step 1, decode: a consumed record becomes an item, a row or a dead letter, never an error.

Every limit a later step applies (size, nesting depth, key size) is checked here, so a record
that could not be processed is a dead letter with its reason before it enters a window.
"""

from __future__ import annotations

from collections.abc import Callable

from consumer.decode import RowLimits, decode_row
from consumer.pipeline.protocol import Step, Transform
from consumer.records import DeadLetter, Item, SourceRecord


class DecodeStep(Transform[SourceRecord, Item]):
    def __init__(
        self,
        limits: RowLimits,
        next_step: Step[Item],
        on_consumed: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(next_step)
        self._limits = limits
        self._on_consumed = on_consumed

    def transform(self, value: SourceRecord) -> Item:
        decoded = decode_row(value.key, value.value, self._limits)
        if isinstance(decoded, DeadLetter):
            return Item(value, dead_letter=decoded)
        return Item(value, row=decoded)

    def taken(self, value: SourceRecord) -> None:
        self._on_consumed()
