"""When a window waits instead of writing error rows: the hold-back policy, pure.

A round of enrichment is systemic (the provider or the configuration failed, not the rows)
when any row failed systemically (bad key, missing deployment), or, while no request of this
process succeeded meanwhile, when every row that reached the provider failed retryably (the
provider is down for everyone) or at least `SAME_ERROR_MIN_ROWS` rows all got the same row
error that is not about their content (every row would fail the same way: a configuration
problem, like a parameter the model rejects). Waiting is right then and
error rows would be wrong: a systemic round holds the window for as long as it lasts, offsets
uncommitted.

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

    def rows_to_retry(self, outcomes: Sequence[RowOutcome]) -> list[int]:
        """Rows that failed for a reason outside them; after a systemic round, every row
        that reached the provider and failed (their errors may be the configuration's)."""
        return [
            i
            for i, o in enumerate(outcomes)
            if o.needs_retry_later or (self.systemic and o.error is not None and o.reached_provider)
        ]


# A round in which at least this many rows reached the provider and all got the same row error,
# while nothing succeeded anywhere, is a configuration problem rather than that many bad rows.
SAME_ERROR_MIN_ROWS = 3
# Errors about a row's own content or answer: many of them at once are still the rows' fault.
ROW_CONTENT_REASONS = frozenset(
    {
        "content_filter",
        "refused",
        "context_length_exceeded",
        "request_too_large",
        "invalid_json_response",
        "schema_mismatch",
        "empty_answer",
        "invalid_answer",
    }
)


def round_failed_systemically(round_outcomes: Sequence[RowOutcome], others_succeeded: bool) -> bool:
    if any(o.failure_kind is FailureKind.SYSTEMIC for o in round_outcomes):
        return True
    if others_succeeded:
        return False
    reached = [o for o in round_outcomes if o.reached_provider]
    if reached and all(o.needs_retry_later for o in reached):
        return True
    errors = {(o.error.reason, o.error.status_code) for o in reached if o.error is not None}
    return (
        len(reached) >= SAME_ERROR_MIN_ROWS
        and len(errors) == 1
        and all(o.error is not None for o in reached)
        and next(iter(errors))[0] not in ROW_CONTENT_REASONS
    )


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
        systemic = round_failed_systemically(round_outcomes, others_succeeded)
        if not systemic:
            if not any(o.needs_retry_later for o in outcomes):
                return None
            if self._partial_holds >= self._partial_retries:
                return None
            self._partial_holds += 1
        self._holds += 1
        return Hold(self._backoff.delay(self._holds), systemic)
