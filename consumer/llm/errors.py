"""What can go wrong with one LLM request, and what the consumer should do about it.

Four kinds, each with its own remedy: backpressure (retry, and the limiter backs off once),
transient (retry with backoff), row (the row gets an error field, no retry) and systemic
(every row would fail the same way: the window is held back and tried again later, offsets stay
uncommitted, so a broken key, a misspelt model or a spent budget never floods the output with
errors).

Classification is one table, `RULES`, read top to bottom: the first rule whose status, words
(the body's `code`, `type` and OpenRouter's `metadata.error_type`) and message pattern match
decides. Each provider's real shapes are in `tests/data/provider_errors.yaml`; recognising a
new shape is adding a row here and a case there.
"""

from __future__ import annotations

import datetime
import email.utils
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consumer.llm.ratelimit import RateLimits


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
        # Set by the client on an HTTP answer: its rate-limit headers, and whether a 429 spent
        # a rate quota (gate everyone until the reset) rather than met capacity (cut the limit).
        self.rate_limits: RateLimits | None = None
        self.quota = False

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
    # A systemic failure's own word on when it may pass (a budget: when its period ends); the
    # hold-back waits no longer than that. Not part of the output.
    retry_after_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason, "message": self.message}
        if self.status_code is not None:
            out["status_code"] = self.status_code
        out["attempts"] = self.attempts
        out["retryable"] = self.retryable
        return out


def _error_object(body: Any) -> dict[str, Any] | None:
    """The error object of a body: nested under `error`, or the body itself (flat, vLLM-old,
    Azure API Management's `{statusCode, message}`)."""
    if not isinstance(body, dict):
        return None
    error = body.get("error", body)
    return error if isinstance(error, dict) else None


def error_details(body: Any) -> tuple[str, str]:
    """Pull (words, message) out of an error body, flat or nested, with `code` as int or str.

    The words are OpenRouter's `metadata.error_type`, then `code`, then `type`, lowercased.
    """
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return "", body["error"]
    error = _error_object(body)
    if error is None:
        return "", ""
    metadata = error.get("metadata")
    error_type = metadata.get("error_type") if isinstance(metadata, dict) else None
    parts = (error_type, error.get("code"), error.get("type"))
    words = [str(part) for part in parts if part not in (None, "")]
    return " ".join(words).lower(), str(error.get("message") or "")


# -- wait hints -------------------------------------------------------------------------------

_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# "Please retry after 6 seconds" (Azure), "Try again in 50 seconds" (API Management, LiteLLM
# cooldowns), "Please try again in 1.574s" / "in 644ms" / "in 6m0s" (OpenAI).
_WAIT_IN_TEXT = re.compile(
    r"(?:retry after|try again in)\s+(\d+(?:\.\d+)?)\s*(?:seconds?\b|secs?\b)"
    r"|try again in\s+((?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+)",
    re.IGNORECASE,
)
# API Management's quota policy: "Quota will be replenished in 5.03:23:11" ([d.]hh:mm:ss).
_REPLENISHED_IN = re.compile(r"replenished in (?:(\d+)\.)?(\d+):(\d{2}):(\d{2})", re.IGNORECASE)


def parse_duration(text: str) -> float | None:
    """Seconds in a reset header: a Go duration (`2ms`, `1s`, `6m0s`, `1h2m3.5s`) or a number
    of seconds (Azure sends `6`)."""
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _GO_DURATION_PART.findall(text)
    if not parts or "".join(value + unit for value, unit in parts) != text:
        return None
    return sum(float(value) * _GO_UNITS[unit] for value, unit in parts)


def wait_in_text(message: str) -> float | None:
    """The wait a provider spelt out in its error message, if any."""
    match = _WAIT_IN_TEXT.search(message)
    if match:
        if match.group(1) is not None:
            return float(match.group(1))
        return parse_duration(match.group(2))
    replenished = _REPLENISHED_IN.search(message)
    if replenished:
        days, hours, minutes, seconds = (int(part or 0) for part in replenished.groups())
        return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _seconds_header(headers: Mapping[str, str], name: str, now: float) -> float | None:
    raw = _header(headers, name)
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return max(0.0, parsed.timestamp() - now)


def _reset_hint(headers: Mapping[str, str], words: str, now: float) -> float | None:
    """On a 429, the reset of the limit that was hit: x-ratelimit-reset-requests/-tokens
    (OpenAI durations; Azure's x-rate-limit-reset-tokens in seconds), picked by which one is
    exhausted or by OpenAI's `type: requests|tokens`; else OpenRouter's X-RateLimit-Reset (epoch
    milliseconds)."""
    waits = []
    for limit in ("requests", "tokens"):
        remaining = _header(headers, f"x-ratelimit-remaining-{limit}")
        if remaining == "0" or limit in words.split():
            for name in (f"x-ratelimit-reset-{limit}", f"x-rate-limit-reset-{limit}"):
                raw = _header(headers, name)
                wait = parse_duration(raw) if raw is not None else None
                if wait is not None:
                    waits.append(wait)
                    break
    if waits:
        return max(waits)
    epoch_ms = _header(headers, "x-ratelimit-reset")
    if epoch_ms is not None:
        try:
            return max(0.0, float(epoch_ms) / 1000.0 - now)
        except ValueError:
            return None
    return None


def retry_after_seconds(
    headers: Mapping[str, str], body: Any, now: float | None = None, status: int | None = None
) -> float | None:
    """The server's wait for this request, from the most precise place it gives one.

    retry-after-ms, x-ms-retry-after-ms, Retry-After (seconds or an HTTP date), the body's
    `availability.retry_after` or `metadata.retry_after_seconds` (OpenRouter), the wait spelt out
    in the message, and on a 429 the reset of the exhausted limit (also inside OpenRouter's
    `metadata.headers`).
    """
    clock = time.time() if now is None else now
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        raw = _header(headers, name)
        if raw is not None:
            try:
                return max(0.0, float(raw) / 1000.0)
            except ValueError:
                pass
    wait = _seconds_header(headers, "retry-after", clock)
    if wait is not None:
        return wait
    error = _error_object(body)
    words, message = error_details(body)
    if error is not None:
        for holder, key in (("availability", "retry_after"), ("metadata", "retry_after_seconds")):
            found = error.get(holder)
            value = found.get(key) if isinstance(found, dict) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                return max(0.0, float(value))
    wait = wait_in_text(message) if message else None
    if wait is not None:
        return wait
    if status == 429:
        wait = _reset_hint(headers, words, clock)
        metadata = error.get("metadata") if error is not None else None
        echoed = metadata.get("headers") if isinstance(metadata, dict) else None
        if wait is None and isinstance(echoed, dict):
            lowered = {str(k).lower(): str(v) for k, v in echoed.items()}
            wait = _reset_hint(lowered, words, clock)
        return wait
    return None


# -- the table --------------------------------------------------------------------------------

B = FailureKind.BACKPRESSURE
T = FailureKind.TRANSIENT
R = FailureKind.ROW
S = FailureKind.SYSTEMIC


@dataclass(frozen=True)
class Rule:
    """Matches when every condition given holds: one of `statuses`, one of `words` among the
    body's words, `message` found in the message; `hint` None, True (a wait hint was given) or
    False (none was)."""

    kind: FailureKind
    reason: str
    statuses: frozenset[int] = frozenset()
    words: frozenset[str] = frozenset()
    message: re.Pattern[str] | None = None
    hint: bool | None = None

    def matches(self, status: int, words: set[str], message: str, hinted: bool) -> bool:
        return (
            (not self.statuses or status in self.statuses)
            and (not self.words or not self.words.isdisjoint(words))
            and (self.message is None or self.message.search(message) is not None)
            and (self.hint is None or self.hint == hinted)
        )


def _rule(
    kind: FailureKind,
    reason: str,
    statuses: tuple[int, ...] = (),
    words: tuple[str, ...] = (),
    message: str | None = None,
    hint: bool | None = None,
) -> Rule:
    pattern = re.compile(message, re.IGNORECASE) if message is not None else None
    return Rule(kind, reason, frozenset(statuses), frozenset(words), pattern, hint)


# Only statuses a client error can have: a body word never overrides a 5xx or a 429's meaning
# unless the rule says so.
_4XX = tuple(range(400, 429)) + tuple(range(430, 500))

RULES: tuple[Rule, ...] = (
    # Billing: waiting cannot fix it, so no retry and no limiter cut (OpenAI sends it as a 429).
    _rule(S, "insufficient_quota", words=("insufficient_quota",)),
    _rule(S, "insufficient_quota", message=r"exceeded your current quota"),
    _rule(S, "budget_exceeded", words=("budget_exceeded",)),
    _rule(S, "budget_exceeded", message=r"budget has been exceeded"),
    # API Management's quota policy: a 403 with the refill time in the message; an upstream
    # spend cap passed through a gateway.
    _rule(S, "quota_exceeded", (403,), message=r"out of (call volume|token) quota"),
    _rule(S, "quota_exceeded", message=r"reached your specified api usage limits"),
    # A request bigger than the whole per-minute budget never fits: the row's own fault.
    _rule(R, "request_too_large", (429,), message=r"request too large"),
    # The row's prompt is too long for the model.
    _rule(
        R,
        "context_length_exceeded",
        _4XX,
        words=("context_length_exceeded", "exceed_context_size_error", "string_too_long"),
    ),
    _rule(
        R,
        "context_length_exceeded",
        _4XX,
        message=r"contextwindowexceedederror|maximum context length|"
        r"exceeds the available context size|input tokens exceed the configured limit",
    ),
    # The row's content was refused by a filter, a moderation check or a guardrail.
    _rule(
        R,
        "content_filter",
        _4XX,
        words=("content_filter", "content_policy_violation", "moderation"),
    ),
    _rule(
        R, "content_filter", _4XX, message=r"contentpolicyviolationerror|flagged|request blocked"
    ),
    # Configuration: every row would fail the same way.
    _rule(S, "unsupported_parameter", _4XX, words=("unsupported_parameter", "unsupported_value")),
    _rule(S, "unsupported_parameter", _4XX, message=r"unsupported (parameter|value)"),
    _rule(S, "model_not_found", _4XX, words=("model_not_found", "deploymentnotfound")),
    _rule(
        S,
        "model_not_found",
        _4XX,
        message=r"invalid model name|is not a valid model id|model .{0,200} (does not exist|not "
        r"found)|no endpoints found|deployment for this resource does not exist",
    ),
    _rule(S, "region_not_supported", _4XX, words=("unsupported_country_region_territory",)),
    _rule(S, "region_not_supported", _4XX, message=r"(country|region).{0,40}not supported"),
    _rule(S, "forbidden", (403,), words=("permission_denied", "permissiondenied")),
    _rule(S, "unauthorized", (401,)),
    _rule(B, "budget_in_flight", (402,), hint=True),
    _rule(S, "payment_required", (402,)),
    _rule(S, "not_found", (404,)),
    # Capacity and time: retry, and the limiter backs off once per round trip.
    _rule(B, "rate_limited", (429,)),
    _rule(B, "overloaded", (503, 529)),
    _rule(B, "timeout", (408, 504)),
    _rule(T, "server_error", (409, *range(500, 600))),
    _rule(R, "forbidden", (403,)),
    _rule(R, "payload_too_large", (413,)),
    _rule(R, "unprocessable", (422,)),
    _rule(R, "bad_request"),
)


def classify_status(status: int, body: Any, retry_after_s: float | None) -> LLMFailure:
    """Map an HTTP error answer to a failure kind and reason: the first matching rule."""
    words, message = error_details(body)
    message = message or f"HTTP {status}"
    word_set = set(words.split())
    rule = next(r for r in RULES if r.matches(status, word_set, message, retry_after_s is not None))
    # A row error's wait hint would only hold back other rows; a row is never retried anyway.
    hint = None if rule.kind is FailureKind.ROW else retry_after_s
    return LLMFailure(rule.kind, rule.reason, message, status, hint)


def classify_body_error(body: dict[str, Any]) -> LLMFailure:
    """An error that came with HTTP 200 (OpenRouter does this): classify by its own code."""
    error = body.get("error")
    raw_code = error.get("code") if isinstance(error, dict) else None
    try:
        status = int(raw_code) if raw_code is not None else 0
    except (TypeError, ValueError):
        status = 0
    if status >= 400:
        return classify_status(status, body, retry_after_seconds({}, body, status=status))
    _, message = error_details(body)
    return LLMFailure(
        FailureKind.TRANSIENT, "provider_error", message or "error in a 200 answer", 200
    )
