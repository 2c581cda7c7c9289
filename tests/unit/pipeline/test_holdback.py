"""The hold-back policy: when a window waits out a failure instead of writing error rows."""

from __future__ import annotations

import pytest

from consumer.enrich.holdback import (
    SAME_ERROR_MIN_ROWS,
    HoldBackPolicy,
    round_failed_systemically,
)
from consumer.enrich.outcome import RowOutcome
from consumer.llm.errors import FailureKind, RowError
from consumer.retry import Backoff
from tests.unit.pipeline.recording import (
    fixed_rng,
    local_failure,
    retryable_failure,
    row_failure,
    success,
    systemic_failure,
)

BACKOFF = Backoff(2.0, 60.0, fixed_rng)


def policy(partial_window_retries: int = 2) -> HoldBackPolicy:
    return HoldBackPolicy(partial_window_retries, BACKOFF)


def test_a_window_with_nothing_to_retry_is_not_held() -> None:
    outcomes = [success(), row_failure(), local_failure(), row_failure("forbidden")]
    assert policy().next_hold(outcomes, outcomes, others_succeeded=False) is None


def test_a_systemic_failure_holds_for_as_long_as_it_lasts_without_counting() -> None:
    hold_back = policy(partial_window_retries=1)
    outcomes = [systemic_failure(), success()]
    for _ in range(10):
        hold = hold_back.next_hold(outcomes, outcomes, others_succeeded=True)
        assert hold is not None
        assert hold.systemic
    # The systemic holds did not use up the one partial hold.
    partial = [retryable_failure(), success()]
    hold = hold_back.next_hold(partial, partial, others_succeeded=True)
    assert hold is not None and not hold.systemic
    assert hold_back.next_hold(partial, partial, others_succeeded=True) is None


def test_every_reached_row_failing_retryably_with_no_success_anywhere_is_systemic() -> None:
    outcomes = [retryable_failure(), retryable_failure(FailureKind.BACKPRESSURE)]
    hold_back = policy(partial_window_retries=0)
    for _ in range(5):
        hold = hold_back.next_hold(outcomes, outcomes, others_succeeded=False)
        assert hold is not None and hold.systemic


def test_the_same_round_is_partial_when_requests_elsewhere_succeeded_meanwhile() -> None:
    outcomes = [retryable_failure(), retryable_failure()]
    assert not round_failed_systemically(outcomes, others_succeeded=True)
    hold = policy().next_hold(outcomes, outcomes, others_succeeded=True)
    assert hold is not None and not hold.systemic


@pytest.mark.parametrize("retries", [0, 1, 2, 5])
def test_partial_failures_are_held_at_most_partial_window_retries_times_then_end(
    retries: int,
) -> None:
    hold_back = policy(partial_window_retries=retries)
    outcomes = [retryable_failure(), success()]
    holds = 0
    while hold_back.next_hold(outcomes, outcomes, others_succeeded=False) is not None:
        holds += 1
        assert holds <= retries
    assert holds == retries
    # Once ended, the window stays ended.
    assert hold_back.next_hold(outcomes, outcomes, others_succeeded=False) is None


def test_rows_that_failed_before_reaching_the_provider_do_not_count_as_reached() -> None:
    # Only the retryable row reached the provider, and it failed: systemic.
    assert round_failed_systemically(
        [local_failure("template_error"), local_failure("internal_error"), retryable_failure()],
        others_succeeded=False,
    )
    # A round in which no row reached the provider is not an outage.
    assert not round_failed_systemically(
        [local_failure("template_error"), local_failure("internal_error")],
        others_succeeded=False,
    )


def test_a_row_error_that_reached_the_provider_makes_the_round_partial() -> None:
    outcomes = [row_failure("content_filter"), retryable_failure()]
    assert not round_failed_systemically(outcomes, others_succeeded=False)


def test_an_empty_round_is_not_systemic() -> None:
    assert not round_failed_systemically([], others_succeeded=False)


def test_a_systemic_row_makes_the_round_systemic_whatever_else_happened() -> None:
    assert round_failed_systemically([systemic_failure(), success()], others_succeeded=True)


def test_the_wait_grows_with_each_hold_up_to_the_cap() -> None:
    hold_back = HoldBackPolicy(0, Backoff(2.0, 20.0, fixed_rng))
    outcomes = [retryable_failure()]
    waits = []
    for _ in range(6):
        hold = hold_back.next_hold(outcomes, outcomes, others_succeeded=False)
        assert hold is not None
        waits.append(hold.seconds)
    assert waits == [2.0, 4.0, 8.0, 16.0, 20.0, 20.0]


def test_partial_and_systemic_holds_share_one_growing_wait() -> None:
    hold_back = policy(partial_window_retries=2)
    partial = [retryable_failure(), success()]
    systemic = [systemic_failure()]
    waits = []
    for outcomes in (partial, systemic, partial):
        hold = hold_back.next_hold(outcomes, outcomes, others_succeeded=False)
        assert hold is not None
        waits.append(hold.seconds)
    assert waits == [2.0, 4.0, 8.0]


def test_three_rows_with_one_non_content_error_and_no_success_are_systemic() -> None:
    outcomes = [row_failure("bad_request") for _ in range(SAME_ERROR_MIN_ROWS)]
    assert round_failed_systemically(outcomes, others_succeeded=False)
    hold = policy().next_hold(outcomes, outcomes, others_succeeded=False)
    assert hold is not None and hold.systemic
    # Every such row is tried again, since the error may be the configuration's.
    assert hold.rows_to_retry(outcomes) == list(range(SAME_ERROR_MIN_ROWS))


@pytest.mark.parametrize(
    ("outcomes", "others_succeeded"),
    [
        ([row_failure("bad_request")] * (SAME_ERROR_MIN_ROWS - 1), False),
        ([row_failure("content_filter")] * SAME_ERROR_MIN_ROWS, False),
        ([row_failure("bad_request")] * SAME_ERROR_MIN_ROWS, True),
        ([row_failure("bad_request")] * 2 + [row_failure("forbidden")], False),
        ([row_failure("bad_request")] * SAME_ERROR_MIN_ROWS + [success()], False),
    ],
    ids=["too-few", "content-reason", "others-succeeded", "different-errors", "one-succeeded"],
)
def test_row_errors_are_the_rows_own_unless_many_share_one_error_in_silence(
    outcomes: list[RowOutcome], others_succeeded: bool
) -> None:
    assert not round_failed_systemically(outcomes, others_succeeded)
    assert policy().next_hold(outcomes, outcomes, others_succeeded) is None


def test_after_a_partial_round_only_rows_that_failed_retryably_are_tried_again() -> None:
    outcomes = [success(), retryable_failure(), row_failure(), local_failure()]
    hold = policy().next_hold(outcomes, outcomes, others_succeeded=True)
    assert hold is not None and not hold.systemic
    assert hold.rows_to_retry(outcomes) == [1]


def test_after_a_systemic_round_every_failed_row_that_reached_it_is_retried() -> None:
    outcomes = [success(), systemic_failure(), row_failure(), local_failure(), retryable_failure()]
    hold = policy().next_hold(outcomes, outcomes, others_succeeded=False)
    assert hold is not None and hold.systemic
    assert hold.rows_to_retry(outcomes) == [1, 2, 4]


def test_a_row_failing_after_which_the_provider_answered_others_is_held_boundedly() -> None:
    """The enrich step says `others_succeeded` when any request succeeded after the row failed
    (its own window's rows included), so a row that keeps failing ends after two holds."""
    hold_back = policy(partial_window_retries=2)
    outcomes = [retryable_failure(), success(), success()]
    holds = 0
    round_outcomes = outcomes
    while holds < 20 and hold_back.next_hold(outcomes, round_outcomes, True) is not None:
        holds += 1
        round_outcomes = [retryable_failure()]
    assert holds == 2


def answered_failure() -> RowOutcome:
    """A 200 with an error inside (or garbage): the provider is up, this row fails."""
    error = RowError("retries_exhausted", "provider_error: boom", 200, 2, True)
    return RowOutcome(None, error, FailureKind.TRANSIENT, "ab" * 32)


def test_while_the_provider_is_down_for_everyone_partial_holds_are_not_used_up() -> None:
    hold_back = HoldBackPolicy(1, BACKOFF, row_deadline_s=600.0)
    outcomes = [success(), retryable_failure()]
    for elapsed in range(0, 300, 10):  # an outage of five minutes at the edge of a window
        hold = hold_back.next_hold(
            outcomes, outcomes, True, provider_down=True, failing_for_s=float(elapsed)
        )
        assert hold is not None and not hold.systemic
    # The provider is back and the row still fails: now its one hold is spent, then it ends.
    assert hold_back.next_hold(outcomes, outcomes, True, failing_for_s=310.0) is not None
    assert hold_back.next_hold(outcomes, outcomes, True, failing_for_s=320.0) is None


def test_a_row_failing_past_its_deadline_ends_even_while_the_provider_looks_down() -> None:
    hold_back = HoldBackPolicy(2, BACKOFF, row_deadline_s=5.0)
    outcomes = [success(), retryable_failure()]
    assert hold_back.next_hold(outcomes, outcomes, True, provider_down=True, failing_for_s=4.9)
    assert (
        hold_back.next_hold(outcomes, outcomes, True, provider_down=True, failing_for_s=5.0) is None
    )


def test_the_deadline_does_not_end_a_window_that_fails_as_a_whole() -> None:
    hold_back = HoldBackPolicy(2, BACKOFF, row_deadline_s=5.0)
    outcomes = [retryable_failure(), retryable_failure()]
    hold = hold_back.next_hold(outcomes, outcomes, False, provider_down=True, failing_for_s=3600)
    assert hold is not None and hold.systemic


def test_rows_the_provider_answered_with_an_error_inside_are_their_own_fault() -> None:
    """A 200 carrying an error is an answer: even with nothing else succeeding, it is no
    outage, and the holds are used up."""
    outcomes = [answered_failure(), answered_failure()]
    assert not round_failed_systemically(outcomes, others_succeeded=False)
    hold_back = HoldBackPolicy(2, BACKOFF)
    holds = 0
    while hold_back.next_hold(outcomes, outcomes, False, provider_down=True) is not None:
        holds += 1
        assert holds <= 2
    assert holds == 2


def budget_spent(resumes_in_s: float) -> RowOutcome:
    error = RowError("budget_exhausted", "spent", None, 0, False, resumes_in_s)
    return RowOutcome(None, error, FailureKind.SYSTEMIC, "h")


def test_a_systemic_failure_that_says_when_it_passes_is_tried_again_then() -> None:
    hold_back = policy()
    for _ in range(6):  # the backoff has grown past the period's end
        hold_back.next_hold([systemic_failure()], [systemic_failure()], others_succeeded=False)
    soon = [budget_spent(4.0), budget_spent(3.0)]
    hold = hold_back.next_hold(soon, soon, others_succeeded=False)
    assert hold is not None and hold.seconds == 4.0  # when the last of them passes
    later = [budget_spent(3000.0)]
    hold = hold_back.next_hold(later, later, others_succeeded=False)
    assert hold is not None and hold.seconds == BACKOFF.delay(8)  # not longer than the backoff
    mixed = [budget_spent(1.0), systemic_failure()]  # one failure gives no word: the backoff
    hold = hold_back.next_hold(mixed, mixed, others_succeeded=False)
    assert hold is not None and hold.seconds == BACKOFF.delay(9)
