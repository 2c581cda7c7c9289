"""One row's LLM call: admission through the limiter, attempts, backoff, and the verdict.

The caller owns retries so that each attempt is reported to the limiter on its own: a fast 429
is congestion, a success is a round trip, a 400 says nothing about capacity.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from consumer.config import RetrySettings
from consumer.llm.client import ChatClient, Completion
from consumer.llm.errors import FailureKind, LLMFailure
from consumer.llm.limiter import AIMDLimiter


@dataclass(frozen=True)
class CallResult:
    """Either a completion or the last failure, with the number of attempts it took."""

    completion: Completion | None
    failure: LLMFailure | None
    attempts: int


def backoff_delay(attempt: int, retry: RetrySettings, rng: Callable[[], float]) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, capped."""
    ceiling = min(retry.max_backoff_s, retry.initial_backoff_s * 2.0 ** (attempt - 1))
    return ceiling * (0.5 + 0.5 * rng())


class LLMCaller:
    """Calls the provider for one prompt with retries, under the process-wide limiter."""

    def __init__(
        self,
        client: ChatClient,
        limiter: AIMDLimiter,
        retry: RetrySettings,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self._limiter = limiter
        self._retry = retry
        self._sleep = sleep
        self._rng = rng

    async def call(self, messages: list[dict[str, str]]) -> CallResult:
        failure: LLMFailure | None = None
        for attempt in range(1, self._retry.max_attempts + 1):
            ticket = await self._limiter.acquire()
            reported = False
            try:
                completion = await self._client.complete(messages)
                self._limiter.on_success(ticket)
                reported = True
                return CallResult(completion, None, attempt)
            except LLMFailure as error:
                failure = error
                hint = None
                if error.retry_after_s is not None:
                    hint = min(error.retry_after_s, self._retry.max_retry_after_s)
                if error.kind is FailureKind.BACKPRESSURE:
                    self._limiter.on_congestion(ticket, hint)
                else:
                    self._limiter.on_ignore()
                    if hint:
                        self._limiter.defer(hint)
                reported = True
            finally:
                if not reported:
                    self._limiter.on_ignore()
            if not failure.kind.retryable:
                return CallResult(None, failure, attempt)
            if attempt < self._retry.max_attempts and failure.retry_after_s is None:
                await self._sleep(backoff_delay(attempt, self._retry, self._rng))
        return CallResult(None, failure, self._retry.max_attempts)
