"""One row's LLM call: admission through the limiter, attempts, backoff, and the verdict.

The caller owns retries so that each attempt is reported to the limiter on its own: a fast 429
is congestion, a success is a round trip, a 400 says nothing about capacity. A wait hint on an
overload at capacity (or on a transient error) is this request's own: it sleeps the hint, with
jitter, outside the limit, while the other rows go on; a hint on a spent rate quota closes the
limiter's gate for everyone until the reset, so the retry simply waits for admission. Retries
draw on a process-wide retry budget (a share of recent first attempts plus a small floor):
during an outage a row's retryable failure ends its attempts once the budget is spent, and the
window hold-back in the runner and app takes over instead of multiplying the load.

Backpressure while the provider answers others (replicas or windows contending for one
capacity or quota) is not the row's failure: it uses up none of the row's `max_attempts` and
none of the retry budget, and only the row deadline ends it. Each such retry still waits its
hint and then for a permit, so the limit bounds the load they add, which is what the budget is
for. Ending such rows held their windows back, and a replica held back lost its share of the
capacity to the others; making them wait for budget instead starved a replica whose windows
were all waiting (no first attempts, so no budget). "Answers others" counts the other
replicas too, as they tell (consumer/llm/peers.py): a replica that the others hold at the floor
of its limit gets nothing but 429s, which from its own successes alone looks like an outage.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from consumer.config import RetrySettings
from consumer.llm.budgets import RetryBudget
from consumer.llm.client import ChatClient, Completion
from consumer.llm.errors import FailureKind, LLMFailure
from consumer.llm.limiter import AIMDLimiter
from consumer.retry import Backoff

log = logging.getLogger(__name__)

# A model that answered a request this recently is up: its backpressure is contention. The same
# span as ProviderHealth's default `failing_after_s`, after which readiness calls it failing.
ANSWERING_WITHIN_S = 2.0


@dataclass(frozen=True)
class CallResult:
    """Either a completion or the last failure, with the number of attempts it took."""

    completion: Completion | None
    failure: LLMFailure | None
    attempts: int
    retry_budget_exhausted: bool = False


class AttemptObserver(Protocol):
    """Told whether the provider answered, per attempt (readiness, the hold-back policy)."""

    def record_success(self) -> None: ...

    def record_failure(self, reason: str) -> None: ...


class LLMCaller:
    """Calls the provider for one prompt with retries, under the process-wide limiter."""

    def __init__(
        self,
        client: ChatClient,
        limiter: AIMDLimiter,
        retry: RetrySettings,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        retry_budget: RetryBudget | None = None,
        on_attempt: Callable[[str, float, int], None] | None = None,
        health: AttemptObserver | None = None,
    ) -> None:
        self._client = client
        # Told (status, seconds, attempt) after every attempt: "200", the HTTP code, or the
        # failure reason; attempt 2 and later are retries.
        self._on_attempt = on_attempt
        self._health = health
        self._limiter = limiter
        self._retry = retry
        self._sleep = sleep
        self._clock = clock
        self._backoff = Backoff(retry.initial_backoff_s, retry.max_backoff_s, rng)
        self.retry_budget = (
            retry_budget
            or limiter.retry_budget
            or RetryBudget(
                retry.budget_ratio, retry.budget_min_per_s, retry.budget_window_s, clock=clock
            )
        )
        limiter.retry_budget = self.retry_budget

    def _estimate(self, messages: list[dict[str, str]]) -> int:
        estimate = getattr(self._client, "estimated_tokens", None)
        return int(estimate(messages)) if callable(estimate) else 0

    async def call(self, messages: list[dict[str, str]]) -> CallResult:
        tokens = self._estimate(messages)
        failure: LLMFailure | None = None
        gives_up_at = self._clock() + self._retry.row_deadline_s
        attempt = counted = 0
        while True:
            attempt += 1
            if attempt == 1:
                self.retry_budget.record_request()
            try:
                ticket = await self._limiter.acquire(tokens, retry=attempt > 1)
            except LLMFailure as error:  # bigger than the whole token budget: fail fast
                return CallResult(None, error, attempt - 1)
            reported = False
            own_wait: float | None = None
            started, status = time.monotonic(), "error"
            try:
                completion = await self._client.complete(messages)
                status = "200"
                used = completion.usage.total_tokens or None
                self._limiter.on_success(ticket, used, completion.rate_limits)
                if self._health is not None:
                    self._health.record_success()
                reported = True
                return CallResult(completion, None, attempt)
            except LLMFailure as error:
                failure = error
                status = str(error.status_code) if error.status_code is not None else error.reason
                hint = None
                if error.retry_after_s is not None:
                    hint = min(error.retry_after_s, self._retry.max_retry_after_s)
                own_wait = hint
                if error.kind is FailureKind.BACKPRESSURE and error.quota:
                    self._limiter.on_quota(ticket, hint, error.rate_limits)
                    own_wait = None  # the gate holds every request, this one included
                elif error.kind is FailureKind.BACKPRESSURE:
                    self._limiter.on_congestion(ticket, error.rate_limits)
                else:
                    self._limiter.on_ignore(ticket, rate_limits=error.rate_limits)
                # A 200 is an answer (with an error inside, or garbage): the provider is up.
                if (
                    self._health is not None
                    and error.kind is not FailureKind.ROW
                    and error.status_code != 200
                ):
                    self._health.record_failure(error.reason)
                reported = True
            finally:
                if not reported:
                    self._limiter.on_ignore(ticket)
                if self._on_attempt is not None:
                    self._on_attempt(status, time.monotonic() - started, attempt)
            if not failure.kind.retryable:
                return CallResult(None, failure, attempt)
            contended = self._contended(failure)
            counted += not contended
            if counted >= self._retry.max_attempts:
                return CallResult(None, failure, attempt)
            if self._clock() >= gives_up_at:
                log.debug("row deadline passed: %s ends after %d attempt(s)", failure, attempt)
                return CallResult(None, failure, attempt)
            if not contended and not self.retry_budget.try_spend():
                log.debug("retry budget spent: %s ends after %d attempt(s)", failure, attempt)
                spent = LLMFailure(
                    failure.kind,
                    failure.reason,
                    f"{failure.message} (retry budget exhausted: too many retries recently)",
                    failure.status_code,
                    failure.retry_after_s,
                )
                return CallResult(None, spent, attempt, retry_budget_exhausted=True)
            if own_wait:
                await self._sleep(self._limiter.hint_delay(own_wait))
            elif failure.retry_after_s is None:
                await self._sleep(self._backoff.delay(max(1, counted)))

    def _contended(self, failure: LLMFailure) -> bool:
        """Backpressure while this model still answers others: the limit's business, not the
        row's. Once nothing has succeeded for a while it is an ordinary retryable failure, so
        an outage still ends rows and the window hold-back takes over."""
        return failure.kind is FailureKind.BACKPRESSURE and (
            self._limiter.answered_within(ANSWERING_WITHIN_S)
            or self._limiter.peers_answered_within(ANSWERING_WITHIN_S)
        )
