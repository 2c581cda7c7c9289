"""When a window waits instead of writing error rows: the hold-back policy, pure.

A round of enrichment is systemic (the provider or the configuration failed, not the rows)
when any row failed systemically (bad key, missing deployment), or, while no request of this
process succeeded since those rows were sent, when every row that reached the provider failed
retryably without an answer (the provider is down for everyone) or at least
`SAME_ERROR_MIN_ROWS` rows all got the same row error that is not about their content (every
row would fail the same way: a configuration problem, like a parameter the model rejects).
Waiting is right then and error rows would be wrong: a systemic round holds the window for as
long as it lasts, offsets uncommitted.

When other requests did succeed after the rows were sent (in this window or any other), the
failures are the rows' own: such a window is held back at most `partial_window_retries` times,
and then its still-failing rows end as `retries_exhausted` errors, whatever the rest of the
window did. While the provider is failing for everyone (no success since its failures began),
those holds are not used up, so the edge of an outage does not become error rows; but a row
failing for longer than `row_deadline_s` ends all the same. So a row that can never succeed
never holds its partition for longer than that, even with no other traffic to compare with.
"""

from __future__ import annotations

import math
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
        # A provider that answered 200 (with an error inside, or garbage) is up: those rows
        # are failing on their own.
        return not all(_answered(o) for o in reached)
    errors = {(o.error.reason, o.error.status_code) for o in reached if o.error is not None}
    return (
        len(reached) >= SAME_ERROR_MIN_ROWS
        and len(errors) == 1
        and all(o.error is not None for o in reached)
        and next(iter(errors))[0] not in ROW_CONTENT_REASONS
    )


def _answered(outcome: RowOutcome) -> bool:
    return outcome.error is not None and outcome.error.status_code == 200


class HoldBackPolicy:
    def __init__(
        self, partial_window_retries: int, backoff: Backoff, row_deadline_s: float = math.inf
    ) -> None:
        self._partial_retries = partial_window_retries
        self._backoff = backoff
        self._row_deadline_s = row_deadline_s
        self._holds = 0
        self._partial_holds = 0

    def next_hold(
        self,
        outcomes: Sequence[RowOutcome],
        round_outcomes: Sequence[RowOutcome],
        others_succeeded: bool,
        *,
        provider_down: bool = False,
        failing_for_s: float = 0.0,
    ) -> Hold | None:
        """After a round: how long to hold the window, or None to let its rows' errors stand.

        `others_succeeded`: a request succeeded after the failing rows were first sent (their
        own window's included). `provider_down`: right now the provider fails for everyone.
        `failing_for_s`: since the failing rows were first sent. One policy object per window:
        it counts that window's holds.
        """
        systemic = round_failed_systemically(round_outcomes, others_succeeded)
        if not systemic:
            failing = [o for o in outcomes if o.needs_retry_later]
            if not failing or failing_for_s >= self._row_deadline_s:
                return None
            # While the provider is down for everyone, the edge of an outage is not the rows'
            # fault: wait without using up their holds (they still end at the row deadline).
            if not (provider_down and not all(_answered(o) for o in failing)):
                if self._partial_holds >= self._partial_retries:
                    return None
                self._partial_holds += 1
        self._holds += 1
        seconds = self._backoff.delay(self._holds)
        if systemic:
            # A failure that says when it passes (a budget's period ends) is tried again then,
            # not a whole backoff later.
            hints = [o.error.retry_after_s for o in round_outcomes if o.error is not None]
            if hints and all(hint is not None for hint in hints):
                seconds = min(seconds, max(hint for hint in hints if hint is not None))
        return Hold(seconds, systemic)
