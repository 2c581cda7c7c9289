"""Between encode and deliver: the writes a window made to shared state reach the broker first.

Cache entries are produced without waiting, as each answer arrives; before the window's
outputs (and so its offsets) go out, this step waits until the broker has acknowledged every
write so far, so a committed offset never depends on an answer the cache may have lost. A write
that failed is counted and logged by the store; the window goes on all the same (a lost cache
entry costs a paid call later, never a row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from consumer.pipeline.deliver import OneAtATime
from consumer.pipeline.encode import EncodedWindow
from consumer.pipeline.protocol import Step, Wakeup


class Flushable(Protocol):
    async def flush(self) -> int:
        """Wait for every write so far; how many of them failed."""


class FlushStateStep(OneAtATime):
    def __init__(
        self,
        state: Flushable,
        on_failed: Callable[[int], None],
        next_step: Step[EncodedWindow],
        wakeup: Wakeup,
    ) -> None:
        super().__init__(next_step, wakeup)
        self._state = state
        self._on_failed = on_failed

    async def _process(self, window: EncodedWindow) -> EncodedWindow:
        failed = await self._state.flush()
        if failed:
            self._on_failed(failed)
        return window
