"""Every failed request is classified: backpressure, transient, row or systemic."""

from __future__ import annotations

import email.utils
from typing import Any

import httpx
import pytest

from consumer.llm.errors import (
    FailureKind,
    RowError,
    classify_body_error,
    classify_status,
    error_details,
    parse_duration,
    retry_after_seconds,
    wait_in_text,
)

B = FailureKind.BACKPRESSURE
T = FailureKind.TRANSIENT
R = FailureKind.ROW
S = FailureKind.SYSTEMIC


def body(code: Any = None, message: str = "boom", **extra: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, **extra}
    if code is not None:
        error["code"] = code
    return {"error": error}


@pytest.mark.parametrize(
    ("status", "kind", "reason"),
    [
        (429, B, "rate_limited"),
        (503, B, "overloaded"),
        (529, B, "overloaded"),
        (408, B, "timeout"),
        (504, B, "timeout"),
        (401, S, "unauthorized"),
        (404, S, "not_found"),
        (500, T, "server_error"),
        (502, T, "server_error"),
        (409, T, "server_error"),
        (400, R, "bad_request"),
        (403, R, "forbidden"),
        (413, R, "payload_too_large"),
        (422, R, "unprocessable"),
    ],
)
def test_classify_status(status: int, kind: FailureKind, reason: str) -> None:
    failure = classify_status(status, body(message="the message"), None)
    assert failure.kind is kind
    assert failure.reason == reason
    assert failure.status_code == status
    assert failure.message == "the message"


def test_only_backpressure_and_transient_are_retryable() -> None:
    assert B.retryable and T.retryable
    assert not R.retryable and not S.retryable


def test_a_402_with_retry_after_is_backpressure() -> None:
    failure = classify_status(402, body(), 5.0)
    assert failure.kind is B
    assert failure.reason == "budget_in_flight"
    assert failure.retry_after_s == 5.0


def test_a_402_without_retry_after_is_systemic() -> None:
    failure = classify_status(402, body(), None)
    assert failure.kind is S
    assert failure.reason == "payment_required"


def test_the_retry_after_hint_is_kept_on_backpressure() -> None:
    assert classify_status(429, None, 2.5).retry_after_s == 2.5


def test_a_400_with_code_context_length_exceeded_is_a_row_error_not_retried() -> None:
    failure = classify_status(400, body("context_length_exceeded"), None)
    assert failure.kind is R
    assert not failure.kind.retryable
    assert failure.reason == "context_length_exceeded"


def test_an_azure_content_filter_400_is_a_row_error() -> None:
    azure = {
        "error": {
            "message": "The response was filtered",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
        }
    }
    failure = classify_status(400, azure, None)
    assert failure.kind is R
    assert failure.reason == "content_filter"


def test_a_moderation_flag_in_openrouter_metadata_is_a_content_filter() -> None:
    openrouter = body(403, "flagged", metadata={"error_type": "moderation", "reasons": ["x"]})
    failure = classify_status(403, openrouter, None)
    assert failure.kind is R
    assert failure.reason == "content_filter"


def test_an_empty_body_still_gives_a_message() -> None:
    failure = classify_status(500, None, None)
    assert failure.message == "HTTP 500"


@pytest.mark.parametrize(
    ("error_body", "expected"),
    [
        ({"error": {"code": "context_length_exceeded", "message": "too long"}}, "too long"),
        ({"error": {"code": 400, "message": "bad"}}, "bad"),
        ({"code": "rate_limit", "message": "flat"}, "flat"),
        ({"code": 429, "message": "flat int"}, "flat int"),
    ],
)
def test_error_details_accepts_flat_and_nested_bodies_with_int_or_str_code(
    error_body: dict[str, Any], expected: str
) -> None:
    code, message = error_details(error_body)
    assert message == expected
    raw = error_body.get("error", error_body)["code"]
    assert code == str(raw).lower()


def test_error_details_of_a_string_error_and_of_garbage() -> None:
    assert error_details({"error": "just text"}) == ("", "just text")
    assert error_details(None) == ("", "")
    assert error_details(["x"]) == ("", "")


def test_error_details_includes_type_and_metadata_error_type() -> None:
    code, _ = error_details(
        {"error": {"code": 400, "type": "Invalid_Request", "metadata": {"error_type": "X"}}}
    )
    assert code.split() == ["x", "400", "invalid_request"]


def test_retry_after_ms_header() -> None:
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "1500"}), None) == 1.5


def test_azure_x_ms_retry_after_ms_header() -> None:
    assert retry_after_seconds(httpx.Headers({"x-ms-retry-after-ms": "250"}), None) == 0.25


def test_retry_after_ms_wins_over_retry_after() -> None:
    headers = httpx.Headers({"retry-after": "10", "retry-after-ms": "100"})
    assert retry_after_seconds(headers, None) == 0.1


def test_retry_after_seconds_header_is_case_insensitive() -> None:
    assert retry_after_seconds(httpx.Headers({"Retry-After": "7"}), None) == 7.0


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after_seconds(httpx.Headers({"retry-after": date}), None, now=now) == 30.0


def test_a_retry_after_date_in_the_past_is_zero() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now - 30, usegmt=True)
    assert retry_after_seconds(httpx.Headers({"retry-after": date}), None, now=now) == 0.0


def test_a_negative_retry_after_is_zero() -> None:
    assert retry_after_seconds(httpx.Headers({"retry-after": "-3"}), None) == 0.0


def test_an_unparseable_retry_after_is_ignored_not_raised() -> None:
    # A server sending garbage must not crash the consumer: the hint is simply absent.
    assert retry_after_seconds(httpx.Headers({"retry-after": "soon"}), None) is None


def test_retry_after_from_the_body_availability() -> None:
    error_body = {"error": {"message": "busy", "availability": {"retry_after": 3}}}
    assert retry_after_seconds(httpx.Headers(), error_body) == 3.0


def test_no_hint_at_all() -> None:
    assert retry_after_seconds(httpx.Headers(), body()) is None
    assert retry_after_seconds(httpx.Headers(), None) is None


def test_a_200_body_with_error_code_429_is_backpressure() -> None:
    failure = classify_body_error(body(429, "rate limited upstream"))
    assert failure.kind is B
    assert failure.status_code == 429
    assert failure.message == "rate limited upstream"


def test_a_200_body_with_error_code_502_as_string_is_transient() -> None:
    failure = classify_body_error(body("502", "upstream down"))
    assert failure.kind is T
    assert failure.status_code == 502


def test_a_200_body_error_carries_the_bodys_retry_after() -> None:
    failure = classify_body_error(body(429, availability={"retry_after": 4}))
    assert failure.retry_after_s == 4.0


def test_a_200_body_error_without_a_status_code_is_transient() -> None:
    failure = classify_body_error(body("weird", "something"))
    assert failure.kind is T
    assert failure.reason == "provider_error"
    assert failure.message == "something"


def test_row_error_as_dict() -> None:
    assert RowError("r", "m", 429, 6, True).as_dict() == {
        "reason": "r",
        "message": "m",
        "status_code": 429,
        "attempts": 6,
        "retryable": True,
    }


def test_azure_spells_the_wait_out_in_the_message() -> None:
    body = {"error": {"code": "429", "message": "... Please retry after 6 seconds. Please go"}}
    assert retry_after_seconds({}, body) == 6.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2ms", 0.002),
        ("12ms", 0.012),
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("1h2m3.5s", 3723.5),
        ("0.5s", 0.5),
        ("6", 6.0),
        ("0", 0.0),
        ("soon", None),
        ("1x", None),
    ],
)
def test_parse_duration_reads_go_durations_and_seconds(text: str, seconds: float | None) -> None:
    # OpenAI's x-ratelimit-reset-* (thoughtbot: 1s, 6m0s; community: 12ms, 9ms), Azure's seconds
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("message", "seconds"),
    [
        ("... Please try again in 1.574s. Visit https://platform.openai.com", 1.574),
        ("... Please try again in 644ms.", 0.644),
        ("... Please try again in 20s. Visit", 20.0),
        ("Rate limit is exceeded. Try again in 50 seconds.", 50.0),
        ("... tier. Please retry after 86400 seconds. Please go here", 86400.0),
        ("No deployments available for selected model, Try again in 60 seconds. Passed", 60.0),
        ("Out of call volume quota. Quota will be replenished in 03:30:56.", 12656.0),
        ("Out of call volume quota. Quota will be replenished in 5.03:23:11", 444191.0),
        ("Rate limit exceeded", None),
    ],
)
def test_wait_in_text(message: str, seconds: float | None) -> None:
    assert wait_in_text(message) == seconds


def test_a_429_takes_the_reset_of_the_exhausted_limit() -> None:
    headers = httpx.Headers(
        {
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-remaining-tokens": "1200",
            "x-ratelimit-reset-requests": "2ms",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    assert retry_after_seconds(headers, body(), status=429) == 0.002


def test_a_429_of_type_tokens_takes_the_token_reset() -> None:
    headers = httpx.Headers({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6s"})
    assert retry_after_seconds(headers, body(type="tokens"), status=429) == 6.0


def test_azures_x_rate_limit_reset_tokens_in_seconds() -> None:
    headers = httpx.Headers({"x-ratelimit-remaining-tokens": "0", "x-rate-limit-reset-tokens": "6"})
    assert retry_after_seconds(headers, body(), status=429) == 6.0


def test_openrouters_reset_is_epoch_milliseconds() -> None:
    now = 1_700_000_000.0
    headers = httpx.Headers({"X-RateLimit-Reset": str(int((now + 12) * 1000))})
    assert retry_after_seconds(headers, body(), now=now, status=429) == pytest.approx(12.0)


def test_reset_headers_are_not_a_wait_outside_a_429() -> None:
    headers = httpx.Headers(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}
    )
    assert retry_after_seconds(headers, body(), status=500) is None


def test_openrouter_metadata_retry_after_seconds() -> None:
    error_body = {"error": {"code": 429, "message": "busy", "metadata": {"retry_after_seconds": 7}}}
    assert retry_after_seconds(httpx.Headers(), error_body) == 7.0


@pytest.mark.parametrize(
    ("status", "error_body", "reason"),
    [
        (
            429,
            {"error": {"code": "insufficient_quota", "type": "insufficient_quota"}},
            "insufficient_quota",
        ),
        (400, {"error": {"code": "unsupported_parameter"}}, "unsupported_parameter"),
        (400, {"error": {"message": "x is not a valid model ID", "code": 400}}, "model_not_found"),
        (403, {"error": {"code": "unsupported_country_region_territory"}}, "region_not_supported"),
    ],
)
def test_configuration_errors_are_systemic_and_not_retried(
    status: int, error_body: dict[str, Any], reason: str
) -> None:
    failure = classify_status(status, error_body, 5.0)
    assert (failure.kind, failure.reason) == (S, reason)
    assert not failure.kind.retryable


def test_a_row_error_carries_no_wait_hint() -> None:
    # a hint on a row error would only hold back the other rows
    assert classify_status(400, body("context_length_exceeded"), 5.0).retry_after_s is None
