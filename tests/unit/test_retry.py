"""The one backoff policy: exponential, capped, with equal jitter."""

from __future__ import annotations

from consumer.retry import Backoff


def test_the_delay_grows_exponentially_and_is_capped() -> None:
    backoff = Backoff(0.5, 4.0, rng=lambda: 1.0)
    assert [backoff.delay(attempt) for attempt in range(1, 8)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        4.0,
        4.0,
        4.0,
    ]


def test_the_jitter_lies_between_half_and_the_whole_ceiling() -> None:
    assert Backoff(1.0, 30.0, rng=lambda: 0.0).delay(3) == 2.0
    assert Backoff(1.0, 30.0, rng=lambda: 0.5).delay(3) == 3.0
    assert Backoff(1.0, 30.0, rng=lambda: 1.0).delay(3) == 4.0


def test_attempt_zero_waits_like_the_first() -> None:
    backoff = Backoff(1.0, 30.0, rng=lambda: 1.0)
    assert backoff.delay(0) == backoff.delay(1) == 1.0
