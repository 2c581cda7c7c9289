"""When a window waits instead of writing error rows: the hold-back policy, pure.

A round of enrichment is systemic (the provider or the configuration failed, not the rows)
when any row failed systemically (bad key, missing deployment), or when every row that
reached the provider failed retryably and no request of this process succeeded meanwhile:
the provider is down for everyone, so waiting is right and error rows would be wrong. A
systemic round holds the window for as long as it lasts, offsets uncommitted.

When other requests did succeed during the round, the failures are the rows' own: such a
window is held back at most `partial_window_retries` times (the edge of an outage gets a
second chance), and then its still-failing rows end as `retries_exhausted` errors, whatever
the rest of the window did. So a row that can never succeed never holds its partition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from consumer.enrich.outcome import RowOutcome
from consumer.llm.errors import FailureKind
from consumer.retry import Backoff


@dataclass(frozen=True)
class Hold:
    """Wait this long, then enrich the failing rows again."""

    seconds: float
    systemic: bool


def round_failed_systemically(round_outcomes: Sequence[RowOutcome], others_succeeded: bool) -> bool:
    if any(o.failure_kind is FailureKind.SYSTEMIC for o in round_outcomes):
        return True
    reached = [o for o in round_outcomes if o.reached_provider]
    return bool(reached) and all(o.needs_retry_later for o in reached) and not others_succeeded


class HoldBackPolicy:
    def __init__(self, partial_window_retries: int, backoff: Backoff) -> None:
        self._partial_retries = partial_window_retries
        self._backoff = backoff
        self._holds = 0
        self._partial_holds = 0

    def next_hold(
        self,
        outcomes: Sequence[RowOutcome],
        round_outcomes: Sequence[RowOutcome],
        others_succeeded: bool,
    ) -> Hold | None:
        """After a round: how long to hold the window, or None to let its rows' errors stand.

        One policy object per window: it counts that window's holds.
        """
        if not any(o.needs_retry_later for o in outcomes):
            return None
        systemic = round_failed_systemically(round_outcomes, others_succeeded)
        if not systemic:
            if self._partial_holds >= self._partial_retries:
                return None
            self._partial_holds += 1
        self._holds += 1
        return Hold(self._backoff.delay(self._holds), systemic)
