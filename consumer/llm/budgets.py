"""Budgets beside the concurrency limit: RPM/TPM token buckets and a retry budget.

Providers meter requests and tokens per minute, not concurrency, so the limiter pairs its AIMD
limit with two token buckets (Azure charges prompt + max_tokens at admission, then the real
usage is known: the bucket is reconciled with it). The retry budget keeps retries to a share of
recent traffic (botocore's retry quota, Finagle's RetryBudget), so an outage cannot turn every
row into `max_attempts` requests.

All of it is synchronous arithmetic over an injected clock: tests need no sleeps.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any


def estimate_prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """chars/4 plus 4 per message: the usual estimate when no tokenizer is at hand."""
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(
                len(part["text"])
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return math.ceil(chars / 4) + 4 * len(messages)


class TokenBucket:
    """A continuously refilled bucket: `rate_per_s` tokens a second, holding at most `capacity`.

    The level may go negative after a reconciliation (the answer used more than estimated):
    that debt is repaid by the refill before anything else is admitted.
    """

    def __init__(self, rate_per_s: float, capacity: float, now: float) -> None:
        if rate_per_s <= 0 or capacity <= 0:
            raise ValueError("a token bucket needs a positive rate and capacity")
        self.rate = rate_per_s
        self.capacity = capacity
        self._level = capacity
        self._at = now

    def level(self, now: float) -> float:
        self._refill(now)
        return self._level

    def can_take(self, amount: float, now: float) -> bool:
        return self.level(now) >= amount

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self._level -= amount

    def adjust(self, delta: float, now: float) -> None:
        """Give back (positive) or charge more (negative) after the real cost is known."""
        self._refill(now)
        self._level = min(self.capacity, self._level + delta)

    def seconds_until(self, amount: float, now: float) -> float:
        """How long until `amount` fits (0 when it fits now; inf when it never can)."""
        if amount > self.capacity:
            return math.inf
        missing = amount - self.level(now)
        return 0.0 if missing <= 0 else missing / self.rate

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
        self._at = max(self._at, now)


class RetryBudget:
    """Retries may be at most `ratio` of the requests of the last `window_s`, plus a floor.

    Counted in one-second buckets. `tokens()` is the number of retries allowed right now:
    `ratio * requests + min_per_s * window_s - retries` over the window.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_s: float = 2.0,
        window_s: float = 10.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if ratio < 0 or min_per_s < 0 or window_s <= 0:
            raise ValueError("retry budget needs ratio >= 0, min_per_s >= 0, window_s > 0")
        self._ratio = ratio
        self._floor = min_per_s * window_s
        self._window = window_s
        self._clock = clock
        # (second, first attempts, retries), oldest first.
        self._buckets: deque[list[int]] = deque()

    def record_request(self, now: float | None = None) -> None:
        """A first attempt: earns `ratio` of a retry."""
        self._bucket(self._now(now))[1] += 1

    def try_spend(self, now: float | None = None) -> bool:
        """Take one retry from the budget; False when it is spent."""
        at = self._now(now)
        if self.tokens(at) < 1.0:
            return False
        self._bucket(at)[2] += 1
        return True

    def tokens(self, now: float | None = None) -> float:
        at = self._now(now)
        self._expire(at)
        requests = sum(bucket[1] for bucket in self._buckets)
        retries = sum(bucket[2] for bucket in self._buckets)
        return self._ratio * requests + self._floor - retries

    def _now(self, now: float | None) -> float:
        if now is not None:
            return now
        if self._clock is None:
            raise ValueError("RetryBudget without a clock needs `now`")
        return self._clock()

    def _expire(self, now: float) -> None:
        horizon = math.floor(now) - self._window
        while self._buckets and self._buckets[0][0] <= horizon:
            self._buckets.popleft()

    def _bucket(self, now: float) -> list[int]:
        self._expire(now)
        second = math.floor(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        return self._buckets[-1]
