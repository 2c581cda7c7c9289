"""Enriches the rows of a window concurrently; results come back in input order.

Concurrency is bounded by the process-wide limiter inside the caller, not here: every row of
the window is started at once and waits for admission, so one window can use the whole limit
and a slow row never blocks the rows behind it from being sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from consumer.enrich.outcome import RowOutcome
from consumer.enrich.template import PromptTemplate, TemplateRenderError
from consumer.llm.caller import LLMCaller
from consumer.llm.errors import FailureKind, RowError


class WindowEnricher:
    def __init__(self, template: PromptTemplate, caller: LLMCaller) -> None:
        self._template = template
        self._caller = caller

    async def enrich_row(self, row: dict[str, Any]) -> RowOutcome:
        variables_hash = self._template.variables_hash(row)
        try:
            messages = self._template.render(row)
        except TemplateRenderError as error:
            row_error = RowError("template_error", str(error), None, 0, False)
            return RowOutcome(None, row_error, FailureKind.ROW, variables_hash)
        result = await self._caller.call(messages)
        if result.completion is not None:
            return RowOutcome(result.completion, None, None, variables_hash)
        failure = result.failure
        assert failure is not None
        reason = failure.reason
        if failure.kind.retryable:
            reason = "retries_exhausted"
        message = (
            failure.message if reason == failure.reason else f"{failure.reason}: {failure.message}"
        )
        row_error = RowError(
            reason, message, failure.status_code, result.attempts, failure.kind.retryable
        )
        return RowOutcome(None, row_error, failure.kind, variables_hash)

    async def enrich(self, rows: Sequence[dict[str, Any]]) -> list[RowOutcome]:
        """All rows at once (the limiter admits them), outcomes in input order."""
        return list(await asyncio.gather(*(self.enrich_row(row) for row in rows)))


def window_failed_systemically(outcomes: Sequence[RowOutcome]) -> bool:
    """Hold a window back rather than emit error rows when the provider, not the rows, failed.

    Any systemic failure (bad key, missing deployment) holds it; so does a window in which every
    row that reached the provider ran out of retries (the provider is down).
    """
    if any(o.failure_kind is FailureKind.SYSTEMIC for o in outcomes):
        return True
    reached = [o for o in outcomes if o.error is None or o.error.reason != "template_error"]
    return bool(reached) and all(o.needs_retry_later for o in reached)
