"""Enriches the rows of a window concurrently; results come back in input order.

Concurrency is bounded by the process-wide limiter inside the caller, not here: every row of
the window is started at once and waits for admission, so one window can use the whole limit
and a slow row never blocks the rows behind it from being sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from consumer import audit
from consumer.enrich.cache import CachedCalls
from consumer.enrich.outcome import RowOutcome
from consumer.enrich.template import PromptTemplate, TemplateRenderError
from consumer.enrich.validate import InvalidAnswer
from consumer.llm.caller import CallResult
from consumer.llm.client import Completion
from consumer.llm.errors import FailureKind, RowError
from consumer.llm.pricing import FREE_HIT, UNKNOWN, Pricing

log = logging.getLogger(__name__)


class Caller(Protocol):
    """The LLM caller, or the budget in front of it (`enrich/spend.py`)."""

    async def call(self, messages: list[dict[str, str]]) -> CallResult: ...


class WindowEnricher:
    def __init__(
        self,
        template: PromptTemplate,
        caller: Caller,
        request_key: Callable[[list[dict[str, str]]], str],
        cache: CachedCalls | None = None,
        pricing: Pricing | None = None,
        *,
        accept: Callable[[Completion], Completion | None] | None = None,
        closers: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        self._template = template
        self._caller = caller
        self._request_key = request_key
        self._cache = cache
        self._pricing = pricing
        # Answer validation's check of cache hits (`enrich/validate.py`).
        self._accept = accept
        # Closes what the caller holds beyond the app's client (the fallbacks' clients).
        self._closers = closers

    async def aclose(self) -> None:
        for close in self._closers:
            await close()

    async def enrich_row(self, row: dict[str, Any]) -> RowOutcome:
        """Never raises for the row's sake: anything unexpected is that row's `internal_error`."""
        variables_hash = ""
        try:
            variables_hash = self._template.variables_hash(row)
            return await self._call(row, variables_hash)
        except Exception as error:
            log.warning("row failed inside the consumer", exc_info=True)
            message = f"{type(error).__name__}: {error}"
            row_error = RowError("internal_error", message, None, 0, False)
            return RowOutcome(None, row_error, FailureKind.ROW, variables_hash)

    async def _call(self, row: dict[str, Any], variables_hash: str) -> RowOutcome:
        try:
            messages = self._template.render(row)
        except TemplateRenderError as error:
            row_error = RowError("template_error", str(error), None, 0, False)
            return RowOutcome(None, row_error, FailureKind.ROW, variables_hash)
        key = self._request_key(messages)
        audit.enter_row(row, key)
        cache: str | None = None
        if self._cache is None:
            result = await self._caller.call(messages)
        else:
            answer = await self._cache.answer(
                key, lambda: self._caller.call(messages), self._accept
            )
            result, cache = answer.result, "hit" if answer.hit else "miss"
        if result.completion is not None:
            cost = UNKNOWN
            if cache == "hit":
                cost = FREE_HIT
            elif self._pricing is not None:
                cost = self._pricing.cost(result.completion)
            return RowOutcome(result.completion, None, None, variables_hash, key, cache, cost)
        failure = result.failure
        assert failure is not None
        reason = failure.reason
        if failure.kind.retryable:
            reason = "retries_exhausted"
        message = (
            failure.message if reason == failure.reason else f"{failure.reason}: {failure.message}"
        )
        row_error = RowError(
            reason,
            message,
            failure.status_code,
            result.attempts,
            failure.kind.retryable,
            failure.retry_after_s if failure.kind is FailureKind.SYSTEMIC else None,
        )
        if isinstance(failure, InvalidAnswer) and failure.completion is not None:
            # A paid answer that failed validation: kept in the row, and what it cost.
            rejected = failure.completion
            cost = self._pricing.cost(rejected) if self._pricing is not None else UNKNOWN
            return RowOutcome(
                None, row_error, failure.kind, variables_hash, key, cache, cost, rejected=rejected
            )
        return RowOutcome(None, row_error, failure.kind, variables_hash, key, cache)

    async def enrich(self, rows: Sequence[dict[str, Any]]) -> list[RowOutcome]:
        """All rows at once (the limiter admits them), outcomes in input order."""
        return list(await asyncio.gather(*(self.enrich_row(row) for row in rows)))
