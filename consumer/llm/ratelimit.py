"""What a provider says about its rate quota, and admission at the pace that quota allows.

Providers meter requests and tokens per minute and say where a key stands on every answer:

- OpenAI: `x-ratelimit-limit-requests` / `-tokens` (the per-minute limits),
  `x-ratelimit-remaining-requests` / `-tokens`, and `x-ratelimit-reset-requests` / `-tokens`,
  the time until the limit is back to its initial state as a Go duration (`1s`, `6m0s`,
  `12ms`) (platform.openai.com/docs/guides/rate-limits, "Rate limits in headers").
- Azure OpenAI: the same `x-ratelimit-remaining-*` names, `x-ratelimit-limit-*` on newer API
  versions, resets in seconds, also as `x-rate-limit-reset-tokens`; `-1` means unknown
  (learn.microsoft.com, Azure OpenAI quota; openai-dotnet#838; Q&A 5625878).
- OpenRouter: `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` (epoch
  milliseconds) for its own request limits (openrouter.ai/docs/api-reference/limits).

Two kinds of overload answer 429 and they need opposite remedies (issue 13):
- a **rate quota** is spent (a remaining count at zero, OpenAI's `type: requests|tokens`,
  Azure's "exceeded call/token rate limit", OpenRouter's `rate_limit_exceeded`): nobody gets
  in until it resets, so admission is gated for every request until the hint;
- the provider is at **capacity** (503, 529, Azure's "high demand", OpenRouter's
  `capacity_exhausted` / `provider_overloaded`, or a 429 that says nothing more): the
  concurrency limit is cut once, and only the request that got the hint waits it.
A 429 that carries no quota signal is read as capacity: the cut and the per-request wait are
the cautious answer that idles nothing.

`QuotaPacer` turns the headers into two token buckets (requests, tokens) whose rate is the
announced per-minute limit and whose level follows the provider's own remaining count, so a
run at the quota meets close to no 429s with no budget configured, and replicas sharing one
key see the same shared count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from consumer.llm.budgets import TokenBucket
from consumer.llm.errors import error_details, parse_duration

# The announced limits are per minute (OpenAI, Azure, OpenRouter's request caps).
QUOTA_WINDOW_S = 60.0
# A learnt bucket holds this much of the window: Azure enforces RPM over 1 s / 10 s sub-windows,
# so a full minute's burst at once would be refused.
_BURST_S = 10.0
# Epoch values above this are milliseconds (OpenRouter), above _EPOCH_S seconds.
_EPOCH_MS = 1e11
_EPOCH_S = 1e9

_QUOTA_WORDS = frozenset({"requests", "tokens", "rate_limit_exceeded"})
_CAPACITY_WORDS = frozenset(
    {"capacity_exhausted", "provider_overloaded", "overloaded_error", "server_error"}
)
_QUOTA_MESSAGE = re.compile(
    r"rate limit reached for|exceeded (?:call|token|request)s? rate limit|"
    r"(?:requests|tokens) per (?:min|day)|quota",
    re.IGNORECASE,
)
_CAPACITY_MESSAGE = re.compile(
    r"high demand|overloaded|capacity|utili[sz]ation|try again later", re.IGNORECASE
)


@dataclass(frozen=True)
class Quota:
    """One metered limit as a reply announced it; None where the provider did not say."""

    limit: float | None
    remaining: float | None
    reset_s: float | None


@dataclass(frozen=True)
class RateLimits:
    """The rate-limit headers of one reply, per metered dimension."""

    requests: Quota | None = None
    tokens: Quota | None = None

    @property
    def exhausted(self) -> bool:
        """A remaining count stands at zero: the quota, not the capacity, refused."""
        return any(
            quota is not None and quota.remaining is not None and quota.remaining <= 0
            for quota in (self.requests, self.tokens)
        )

    def reset_of_exhausted(self) -> float | None:
        """The longest reset among the spent limits: the wait until any request fits."""
        waits = [
            quota.reset_s
            for quota in (self.requests, self.tokens)
            if quota is not None
            and quota.remaining is not None
            and quota.remaining <= 0
            and quota.reset_s is not None
        ]
        return max(waits) if waits else None


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(name).lower(): str(value).strip() for name, value in headers.items()}


def _number(raw: str | None) -> float | None:
    """A count; negative values (Azure's -1) mean unknown."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value >= 0 and math.isfinite(value) else None


def _reset(raw: str | None, now_epoch_s: float) -> float | None:
    """Seconds until a reset given as a duration (`6m0s`, `2ms`, `6`) or an epoch (s or ms)."""
    if raw is None:
        return None
    number = _number(raw)
    if number is not None and number > _EPOCH_MS:
        return max(0.0, number / 1000.0 - now_epoch_s)
    if number is not None and number > _EPOCH_S:
        return max(0.0, number - now_epoch_s)
    return parse_duration(raw)


def _quota(limit: str | None, remaining: str | None, reset: str | None, now: float) -> Quota | None:
    if limit is None and remaining is None and reset is None:
        return None
    parsed = Quota(_number(limit), _number(remaining), _reset(reset, now))
    if parsed.limit is None and parsed.remaining is None:
        return None  # only unknowns (Azure's -1s): nothing to pace by
    return parsed


def parse_rate_limits(headers: Mapping[str, str], now_epoch_s: float) -> RateLimits | None:
    """The rate-limit headers of a reply, of any of the three styles; None when there are none."""
    h = _lower(headers)
    requests = _quota(
        h.get("x-ratelimit-limit-requests"),
        h.get("x-ratelimit-remaining-requests"),
        h.get("x-ratelimit-reset-requests") or h.get("x-rate-limit-reset-requests"),
        now_epoch_s,
    )
    tokens = _quota(
        h.get("x-ratelimit-limit-tokens"),
        h.get("x-ratelimit-remaining-tokens"),
        h.get("x-ratelimit-reset-tokens") or h.get("x-rate-limit-reset-tokens"),
        now_epoch_s,
    )
    if requests is None:
        # OpenRouter's unsuffixed names count requests.
        requests = _quota(
            h.get("x-ratelimit-limit"),
            h.get("x-ratelimit-remaining"),
            h.get("x-ratelimit-reset"),
            now_epoch_s,
        )
    if requests is None and tokens is None:
        return None
    return RateLimits(requests, tokens)


def is_quota_overload(status: int | None, limits: RateLimits | None, body: Any) -> bool:
    """Whether a 429 says a rate quota is spent (gate everyone) rather than capacity (cut)."""
    if status != 429:
        return False
    if limits is not None and limits.exhausted:
        return True
    words, message = error_details(body)
    found = set(words.split())
    if found & _CAPACITY_WORDS or _CAPACITY_MESSAGE.search(message):
        return False
    return bool(found & _QUOTA_WORDS) or _QUOTA_MESSAGE.search(message) is not None


# Our share of an announced quota that other replicas spend too: cut on a quota 429, regained
# a little with every answer that leaves some of the quota (AIMD on the rate, which shares a
# quota fairly the way AIMD shares a capacity).
_SHARE_CUT = 0.7
_SHARE_FLOOR = 0.05
_SHARE_REGAIN = 0.002


class _Learnt:
    """One dimension's bucket: the announced limit per minute, the provider's remaining count."""

    def __init__(self, limit: float, now: float) -> None:
        self.limit = limit
        self.share = 1.0
        self.bucket = TokenBucket(
            limit / QUOTA_WINDOW_S, max(1.0, limit * _BURST_S / QUOTA_WINDOW_S), now
        )

    def relearn(self, limit: float, now: float, share: float | None = None) -> None:
        if limit != self.limit or (share is not None and share != self.share):
            self.limit = limit
            self.share = self.share if share is None else share
            self.bucket.rate = limit * self.share / QUOTA_WINDOW_S
            self.bucket.capacity = max(1.0, limit * self.share * _BURST_S / QUOTA_WINDOW_S)
            self.bucket.adjust(0.0, now)  # clamp the level to the new capacity

    def follow(self, remaining: float, sent_since: float, now: float) -> None:
        """The provider counted `remaining` when it answered; what we sent since is spent too.
        Only downward: our own bucket never runs ahead of the provider's count."""
        known = remaining - sent_since
        level = self.bucket.level(now)
        if known < level:
            self.bucket.adjust(known - level, now)


class QuotaPacer:
    """Requests and tokens admitted at the pace the announced quota and its remaining allow."""

    def __init__(self) -> None:
        self.requests: _Learnt | None = None
        self.tokens: _Learnt | None = None

    @property
    def learnt(self) -> bool:
        return self.requests is not None or self.tokens is not None

    def observe(
        self, limits: RateLimits, now: float, sent_since: int = 0, tokens_since: float = 0.0
    ) -> None:
        """Learn from a reply's headers: `sent_since` requests (and `tokens_since` tokens)
        were admitted after the one this reply answers."""
        for name, quota, since in (
            ("requests", limits.requests, float(sent_since)),
            ("tokens", limits.tokens, tokens_since),
        ):
            if quota is None:
                continue
            learnt: _Learnt | None = getattr(self, name)
            limit = quota.limit
            if limit is None and learnt is None and quota.remaining is not None:
                # Azure without x-ratelimit-limit-*: the first remaining is the best guess.
                limit = quota.remaining + 1.0
            if limit is not None and limit > 0:
                if learnt is None:
                    learnt = _Learnt(limit, now)
                    setattr(self, name, learnt)
                else:
                    learnt.relearn(limit, now)
            if learnt is not None and quota.remaining is not None:
                learnt.follow(quota.remaining, since, now)
                if quota.remaining > 0 and learnt.share < 1.0:
                    # faster while much of the quota is left: nobody else is spending it
                    regain = _SHARE_REGAIN * (1.0 + 10.0 * quota.remaining / learnt.limit)
                    learnt.relearn(learnt.limit, now, min(1.0, learnt.share + regain))

    def back_off(self, limits: RateLimits | None, now: float) -> None:
        """A quota 429: someone else spends this quota too; take a smaller share of it."""
        for name in ("requests", "tokens"):
            learnt: _Learnt | None = getattr(self, name)
            quota = getattr(limits, name) if limits is not None else None
            spent = quota is not None and quota.remaining is not None and quota.remaining <= 0
            if learnt is not None and (spent or limits is None or not limits.exhausted):
                learnt.relearn(learnt.limit, now, max(_SHARE_FLOOR, learnt.share * _SHARE_CUT))

    def seconds_until(self, tokens: int, now: float) -> float:
        """How long until one request of `tokens` fits both learnt buckets (0: now)."""
        wait = 0.0
        if self.requests is not None:
            wait = max(wait, self.requests.bucket.seconds_until(1.0, now))
        if self.tokens is not None and tokens:
            amount = min(float(tokens), self.tokens.bucket.capacity)  # a big one borrows
            wait = max(wait, self.tokens.bucket.seconds_until(amount, now))
        return wait

    def take(self, tokens: int, now: float) -> None:
        if self.requests is not None:
            self.requests.bucket.take(1.0, now)
        if self.tokens is not None and tokens:
            self.tokens.bucket.take(float(tokens), now)

    def reconcile(self, delta_tokens: float, now: float) -> None:
        """Give back (or charge) the difference between the estimate and the real usage."""
        if self.tokens is not None and delta_tokens:
            self.tokens.bucket.adjust(delta_tokens, now)

    def rates(self) -> tuple[float | None, float | None]:
        """The learnt requests and tokens per minute we take (None: not announced)."""
        return (
            self.requests.limit * self.requests.share if self.requests is not None else None,
            self.tokens.limit * self.tokens.share if self.tokens is not None else None,
        )
