"""A row's outcome, and the output fields of the contract built from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from consumer.enrich.template import PromptTemplate
from consumer.llm.client import Completion
from consumer.llm.errors import FailureKind, RowError
from consumer.llm.pricing import UNKNOWN, Cost

# Row errors raised before the row reached the provider.
LOCAL_REASONS = frozenset({"template_error", "internal_error"})


@dataclass(frozen=True)
class RowOutcome:
    """What happened to one row: a completion, or an error with the kind of its last failure."""

    completion: Completion | None
    error: RowError | None
    failure_kind: FailureKind | None
    variables_hash: str
    # The request's cache key (None when no request was made), and "hit" or "miss" (None
    # when the cache is off).
    request_hash: str | None = None
    cache: str | None = None
    # What the row's request cost (a cache hit: 0); unknown for failed rows and unpriced models.
    cost: Cost = UNKNOWN
    # How the answer was asked for: "live" (one request) or "batch" (a provider batch job).
    mode: str = "live"
    # An answer that failed validation (`invalid_answer`): paid for, kept for inspection.
    rejected: Completion | None = None

    @property
    def needs_retry_later(self) -> bool:
        """Failed for a reason outside the row (provider down, auth): worth another window try."""
        return self.failure_kind is not None and (
            self.failure_kind is FailureKind.SYSTEMIC or self.failure_kind.retryable
        )

    @property
    def reached_provider(self) -> bool:
        """False for rows that failed before any request (their template, an internal error)."""
        return self.error is None or self.error.reason not in LOCAL_REASONS


class OutputFields:
    """Builds `{rf}`, `{rf}_model`, `{rf}_usage`, hashes and `{rf}_error` for each row."""

    def __init__(self, response_field: str, model_name: str, template: PromptTemplate) -> None:
        rf = response_field
        self.response_field = rf
        self._model_name = model_name
        self._keys = {
            "model": f"{rf}_model",
            "usage": f"{rf}_usage",
            "finish_reason": f"{rf}_finish_reason",
            "truncated": f"{rf}_truncated",
            "error": f"{rf}_error",
            "request_hash": f"{rf}_request_hash",
            "cache": f"{rf}_cache",
            "mode": f"{rf}_mode",
            "cost_usd": f"{rf}_cost_usd",
            "cost_source": f"{rf}_cost_source",
        }
        self._static: dict[str, Any] = {f"{rf}_template_hash": template.template_hash}
        if template.template_source is not None:
            self._static[f"{rf}_template_source"] = template.template_source
        if template.lookup_hash is not None:
            self._static[f"{rf}_lookup_hash"] = template.lookup_hash
            self._static[f"{rf}_lookup_source"] = template.lookup_source
        self._variables_key = f"{rf}_variables_hash"

    def for_outcome(self, outcome: RowOutcome) -> dict[str, Any]:
        """The response fields added to the input object (they win over its keys on a clash)."""
        keys = self._keys
        completion = outcome.completion
        out: dict[str, Any] = {}
        if completion is not None:
            out[self.response_field] = completion.content
            out[keys["model"]] = completion.model
            out[keys["usage"]] = completion.usage.as_dict()
            out[keys["finish_reason"]] = completion.finish_reason
            out[keys["truncated"]] = completion.truncated
            out[keys["error"]] = None
        else:
            out[self.response_field] = None
            out[keys["model"]] = self._model_name
            out[keys["usage"]] = None
            out[keys["finish_reason"]] = None
            out[keys["truncated"]] = None
            out[keys["error"]] = outcome.error.as_dict() if outcome.error else None
            rejected = outcome.rejected
            if rejected is not None and out[keys["error"]] is not None:
                out[keys["model"]] = rejected.model
                out[keys["usage"]] = rejected.usage.as_dict()
                out[keys["finish_reason"]] = rejected.finish_reason
                out[keys["truncated"]] = rejected.truncated
                out[keys["error"]]["answer"] = rejected.content
        out.update(self._static)
        out[self._variables_key] = outcome.variables_hash
        out[keys["request_hash"]] = outcome.request_hash
        out[keys["cache"]] = outcome.cache
        out[keys["mode"]] = outcome.mode
        out[keys["cost_usd"]] = outcome.cost.usd
        out[keys["cost_source"]] = outcome.cost.source
        return out
