"""Token buckets for RPM/TPM and the retry budget, on a fake clock."""

from __future__ import annotations

import math

import pytest

from consumer.llm.budgets import RetryBudget, TokenBucket, estimate_prompt_tokens


def test_prompt_estimate_is_chars_over_four_plus_four_per_message() -> None:
    messages = [
        {"role": "system", "content": "x" * 10},
        {"role": "user", "content": [{"type": "text", "text": "y" * 6}]},
    ]
    assert estimate_prompt_tokens(messages) == math.ceil(16 / 4) + 8


def test_a_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = TokenBucket(rate_per_s=10.0, capacity=100.0, now=0.0)
    bucket.take(100.0, 0.0)
    assert bucket.level(0.0) == 0.0
    assert bucket.level(2.0) == pytest.approx(20.0)
    assert bucket.level(100.0) == 100.0


def test_a_bucket_says_how_long_until_an_amount_fits_and_never_for_too_much() -> None:
    bucket = TokenBucket(rate_per_s=10.0, capacity=100.0, now=0.0)
    bucket.take(100.0, 0.0)
    assert bucket.seconds_until(30.0, 0.0) == pytest.approx(3.0)
    assert bucket.seconds_until(101.0, 0.0) == math.inf


def test_reconciliation_can_leave_a_debt_that_the_refill_repays() -> None:
    bucket = TokenBucket(rate_per_s=10.0, capacity=100.0, now=0.0)
    bucket.take(50.0, 0.0)
    bucket.adjust(-80.0, 0.0)  # the answer used 80 more than estimated
    assert bucket.level(0.0) == pytest.approx(-30.0)
    assert not bucket.can_take(1.0, 0.0)
    assert bucket.can_take(1.0, 3.1)


def test_retries_are_a_share_of_recent_requests_plus_a_floor() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, window_s=10.0)
    for _ in range(100):
        budget.record_request(now=0.5)
    assert budget.tokens(now=0.5) == pytest.approx(30.0)  # 20 % of 100 + 10 floor
    spent = sum(budget.try_spend(now=0.5) for _ in range(50))
    assert spent == 30
    assert not budget.try_spend(now=0.5)


def test_the_retry_budget_forgets_old_traffic() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, window_s=10.0)
    for _ in range(50):
        budget.record_request(now=0.0)
    for _ in range(10):
        assert budget.try_spend(now=1.0)
    assert not budget.try_spend(now=1.0)
    assert budget.tokens(now=20.0) == 0.0  # window passed: no requests, no retries
    budget.record_request(now=20.0)
    assert budget.tokens(now=20.0) == pytest.approx(0.2)


def test_an_outage_cannot_multiply_the_load() -> None:
    """Every request fails; the retries stay near 20 % of the requests, not 5x."""
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, window_s=10.0)
    retries = 0
    for second in range(60):
        for _ in range(100):
            budget.record_request(now=float(second))
            retries += budget.try_spend(now=float(second))
    assert retries <= 0.2 * 6000 + 60 + 10


def test_bad_budget_settings_are_rejected() -> None:
    with pytest.raises(ValueError):
        RetryBudget(window_s=0)
    with pytest.raises(ValueError):
        TokenBucket(0.0, 10.0, 0.0)
