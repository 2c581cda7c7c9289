"""The last step: a finished window is counted in the metrics and logged, then forgotten."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from consumer.enrich.outcome import RowOutcome
from consumer.pipeline.encode import EncodedWindow
from consumer.pipeline.protocol import Deadline
from consumer.records import Item
from consumer.window import Window

log = logging.getLogger("consumer")


@dataclass
class Tally:
    """What this process finished, across every chain it built (the exit line says it)."""

    consumed: int = 0
    rows: int = 0
    dead_letters: int = 0
    cost_usd: float = 0.0  # of rows whose cost is known

    def consume(self) -> None:
        self.consumed += 1

    @property
    def finished(self) -> int:
        return self.rows + self.dead_letters

    def exit_line(self) -> dict[str, Any]:
        """The fields of the "stopped" line: what was done, and what the next owner gets."""
        return {
            "rows_consumed": self.consumed,
            "rows_finished": self.finished,
            "rows_left_for_next_owner": max(0, self.consumed - self.finished),
            "cost_usd": round(self.cost_usd, 6),
        }


class WindowMetrics(Protocol):
    def window_done(self, window: Window, outcomes: list[RowOutcome], seconds: float) -> None: ...


class ReportStep:
    def __init__(
        self,
        metrics: WindowMetrics,
        tally: Tally,
        dlq_topic: str,
        limit: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._tally = tally
        self._dlq_topic = dlq_topic
        self._limit = limit
        self._clock = clock

    def submit(self, value: EncodedWindow) -> None:
        enriched = value.enriched
        window = enriched.window
        seconds = self._clock() - enriched.started_at
        outcomes = [o for o in enriched.outcomes if o is not None]
        dead_letters = sum(1 for r in value.records if r.topic == self._dlq_topic)
        self._metrics.window_done(window, outcomes, seconds)
        self._tally.dead_letters += dead_letters
        self._tally.rows += len(window.items) - dead_letters
        costs = [o.cost.usd for o in outcomes if o.cost.usd is not None]
        self._tally.cost_usd += sum(costs)
        log.info(
            "window done",
            extra={
                "window_id": window.id,
                "close_reason": str(window.close_reason),
                "rows": len(outcomes),
                "row_errors": sum(1 for o in outcomes if o.error is not None),
                "dead_letters": dead_letters,
                "seconds": round(seconds, 3),
                "partitions": offset_ranges(window.items),
                "limit": round(self._limit(), 1),
                # null when no row's cost is known (no prices for the model)
                "cost_usd": round(sum(costs), 6) if costs else None,
            },
        )

    def poll(self) -> None:
        """Nothing in flight."""

    def close(self) -> None:
        """Nothing to stop."""

    async def join(self, deadline: Deadline) -> None:
        """Nothing to wait for."""

    def terminate(self) -> None:
        """Nothing to drop."""


def offset_ranges(items: list[Item]) -> dict[str, str]:
    ranges: dict[str, list[int]] = {}
    for item in items:
        key = f"{item.record.topic}/{item.record.partition}"
        bounds = ranges.setdefault(key, [item.record.offset, item.record.offset])
        bounds[0] = min(bounds[0], item.record.offset)
        bounds[1] = max(bounds[1], item.record.offset)
    return {key: f"{low}-{high}" for key, (low, high) in ranges.items()}
