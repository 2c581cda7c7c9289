"""What can go wrong with one LLM request, and what the consumer should do about it.

Four kinds, each with its own remedy: backpressure (retry, and the limiter backs off once),
transient (retry with backoff), row (the row gets an error field, no retry) and systemic
(nothing this row can fix: the window is held back and tried again later, offsets stay
uncommitted, so a broken key or a missing deployment never floods the output with errors).
"""

from __future__ import annotations

import datetime
import email.utils
import re
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

_RETRY_AFTER_IN_TEXT = re.compile(r"retry after (\d+(?:\.\d+)?) seconds?", re.IGNORECASE)


class FailureKind(StrEnum):
    BACKPRESSURE = "backpressure"
    TRANSIENT = "transient"
    ROW = "row"
    SYSTEMIC = "systemic"

    @property
    def retryable(self) -> bool:
        return self in (FailureKind.BACKPRESSURE, FailureKind.TRANSIENT)


class LLMFailure(Exception):
    """One failed attempt, classified; `reason` is a stable snake_case word for dashboards."""

    def __init__(
        self,
        kind: FailureKind,
        reason: str,
        message: str,
        status_code: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason
        self.message = message
        self.status_code = status_code
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"LLMFailure({self.kind}, {self.reason!r}, status={self.status_code})"


@dataclass(frozen=True)
class RowError:
    """The error recorded in a row's `{rf}_error` field."""

    reason: str
    message: str
    status_code: int | None
    attempts: int
    retryable: bool

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason, "message": self.message}
        if self.status_code is not None:
            out["status_code"] = self.status_code
        out["attempts"] = self.attempts
        out["retryable"] = self.retryable
        return out


def error_details(body: Any) -> tuple[str, str]:
    """Pull (code, message) out of an error body, flat or nested, with `code` as int or str."""
    if not isinstance(body, dict):
        return "", ""
    error = body.get("error", body)
    if isinstance(error, str):
        return "", error
    if not isinstance(error, dict):
        return "", ""
    code = error.get("code")
    kind = error.get("type")
    metadata = error.get("metadata")
    error_type = metadata.get("error_type") if isinstance(metadata, dict) else None
    words = [str(part) for part in (error_type, code, kind) if part not in (None, "")]
    return " ".join(words).lower(), str(error.get("message") or "")


def retry_after_seconds(headers: Any, body: Any, now: float | None = None) -> float | None:
    """The server's wait hint: retry-after-ms, x-ms-retry-after-ms, Retry-After, or the body's."""
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        raw = headers.get(name)
        if raw:
            try:
                return max(0.0, float(raw) / 1000.0)
            except ValueError:
                pass
    raw = headers.get("retry-after")
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            try:
                parsed = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                parsed = None
            if parsed is not None:
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=datetime.UTC)
                return max(0.0, parsed.timestamp() - (time.time() if now is None else now))
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        availability = error.get("availability")
        if isinstance(availability, dict) and isinstance(
            availability.get("retry_after"), int | float
        ):
            return max(0.0, float(availability["retry_after"]))
        # Azure spells it out in the message: "... Please retry after 6 seconds."
        message = error.get("message")
        if isinstance(message, str):
            match = _RETRY_AFTER_IN_TEXT.search(message)
            if match:
                return float(match.group(1))
    return None


_ROW_REASONS_BY_CODE = (
    ("context_length", "context_length_exceeded"),
    ("content_filter", "content_filter"),
    ("content_policy", "content_filter"),
    ("moderation", "content_filter"),
)


def classify_status(status: int, body: Any, retry_after_s: float | None) -> LLMFailure:
    """Map an HTTP error answer to a failure kind and reason."""
    code, message = error_details(body)
    message = message or f"HTTP {status}"
    if status == 429 or status in (503, 529):
        return LLMFailure(
            FailureKind.BACKPRESSURE,
            "rate_limited" if status == 429 else "overloaded",
            message,
            status,
            retry_after_s,
        )
    if status in (408, 504):
        return LLMFailure(FailureKind.BACKPRESSURE, "timeout", message, status, retry_after_s)
    if status == 402:
        if retry_after_s is not None:
            return LLMFailure(
                FailureKind.BACKPRESSURE, "budget_in_flight", message, status, retry_after_s
            )
        return LLMFailure(FailureKind.SYSTEMIC, "payment_required", message, status)
    if status in (401, 404):
        reason = "unauthorized" if status == 401 else "not_found"
        return LLMFailure(FailureKind.SYSTEMIC, reason, message, status)
    if status >= 500 or status == 409:
        return LLMFailure(FailureKind.TRANSIENT, "server_error", message, status, retry_after_s)
    for needle, reason in _ROW_REASONS_BY_CODE:
        if needle in code:
            return LLMFailure(FailureKind.ROW, reason, message, status)
    row_reasons = {403: "forbidden", 413: "payload_too_large", 422: "unprocessable"}
    return LLMFailure(FailureKind.ROW, row_reasons.get(status, "bad_request"), message, status)


def classify_body_error(body: dict[str, Any]) -> LLMFailure:
    """An error that came with HTTP 200 (OpenRouter does this): classify by its own code."""
    error = body.get("error")
    raw_code = error.get("code") if isinstance(error, dict) else None
    try:
        status = int(raw_code) if raw_code is not None else 0
    except (TypeError, ValueError):
        status = 0
    if status >= 400:
        return classify_status(status, body, retry_after_seconds({}, body))
    _, message = error_details(body)
    return LLMFailure(
        FailureKind.TRANSIENT, "provider_error", message or "error in a 200 answer", 200
    )
