"""Rate-limit headers of each provider, the two kinds of overload, and pacing by the headers."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from consumer.fake_llm.config import FakeLLMConfig
from consumer.fake_llm.server import create_app
from consumer.llm.limiter import AIMDLimiter
from consumer.llm.ratelimit import (
    Quota,
    QuotaPacer,
    RateLimits,
    is_quota_overload,
    parse_rate_limits,
)

NOW = 1_764_590_000.0  # an epoch second

# Real samples (OpenAI community thread 1268905; OpenAI rate-limit guide; Azure Q&A 5625878).
OPENAI = {
    "x-ratelimit-limit-requests": "5000",
    "x-ratelimit-limit-tokens": "160000",
    "x-ratelimit-remaining-requests": "4999",
    "x-ratelimit-remaining-tokens": "159976",
    "x-ratelimit-reset-requests": "12ms",
    "x-ratelimit-reset-tokens": "9ms",
}
OPENAI_TPM_SPENT = {
    "x-ratelimit-limit-requests": "60",
    "x-ratelimit-limit-tokens": "150000",
    "x-ratelimit-remaining-requests": "59",
    "x-ratelimit-remaining-tokens": "0",
    "x-ratelimit-reset-requests": "1s",
    "x-ratelimit-reset-tokens": "6m0s",
}
AZURE = {
    "x-ratelimit-remaining-requests": "119",
    "x-ratelimit-remaining-tokens": "119968",
    "x-ratelimit-limit-requests": "120",
    "x-ratelimit-limit-tokens": "120000",
    "x-rate-limit-reset-tokens": "6",
}
AZURE_UNKNOWN = {
    "x-ratelimit-limit-tokens": "-1",
    "x-ratelimit-remaining-tokens": "-1",
    "x-ratelimit-reset-tokens": "0",
}
OPENROUTER = {
    "X-RateLimit-Limit": "20",
    "X-RateLimit-Remaining": "0",
    "X-RateLimit-Reset": str(int((NOW + 30.5) * 1000)),
}


def test_openai_counts_and_go_durations() -> None:
    limits = parse_rate_limits(OPENAI, NOW)
    assert limits is not None and limits.requests is not None and limits.tokens is not None
    assert (limits.requests.limit, limits.requests.remaining) == (5000, 4999)
    assert limits.requests.reset_s == pytest.approx(0.012)
    assert (limits.tokens.limit, limits.tokens.remaining) == (160000, 159976)
    assert limits.tokens.reset_s == pytest.approx(0.009)
    assert not limits.exhausted


def test_openai_minutes_and_seconds_durations_and_the_spent_dimension() -> None:
    limits = parse_rate_limits(OPENAI_TPM_SPENT, NOW)
    assert limits is not None
    assert limits.tokens == Quota(150000, 0, 360.0)
    assert limits.exhausted
    assert limits.reset_of_exhausted() == 360.0  # the tokens reset, not the requests'


def test_azure_seconds_resets_and_its_other_header_name() -> None:
    limits = parse_rate_limits(AZURE, NOW)
    assert limits is not None
    assert limits.requests == Quota(120, 119, None)
    assert limits.tokens == Quota(120000, 119968, 6.0)


def test_azure_minus_one_means_unknown() -> None:
    assert parse_rate_limits(AZURE_UNKNOWN, NOW) is None


def test_openrouter_epoch_milliseconds_and_mixed_case_names() -> None:
    limits = parse_rate_limits(OPENROUTER, NOW)
    assert limits is not None
    assert limits.requests is not None
    assert limits.requests.limit == 20 and limits.requests.remaining == 0
    assert limits.requests.reset_s == pytest.approx(30.5, abs=0.01)
    assert limits.tokens is None
    assert limits.exhausted


def test_no_rate_limit_headers_is_none() -> None:
    assert parse_rate_limits({"content-type": "application/json"}, NOW) is None


# ---- two kinds of overload -------------------------------------------------------------------

OPENAI_RPM_BODY = {
    "error": {
        "message": "Rate limit reached for gpt-4o in organization org-x on requests per min "
        "(RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}
AZURE_QUOTA_BODY = {
    "error": {
        "code": "429",
        "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API "
        "version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing "
        "tier. Please retry after 37 seconds.",
    }
}
OPENROUTER_QUOTA_BODY = {
    "error": {
        "code": 429,
        "message": "Rate limit exceeded: free-models-per-min.",
        "metadata": {"error_type": "rate_limit_exceeded"},
    }
}
AZURE_BUSY_BODY = {
    "error": {
        "code": "429",
        "message": "The system is currently experiencing high demand and cannot process your "
        "request. Please retry after 2 seconds.",
    }
}
OPENROUTER_BUSY_BODY = {
    "error": {
        "code": 429,
        "message": "Provider returned error",
        "metadata": {"error_type": "capacity_exhausted"},
    }
}
LITELLM_BODY = {
    "error": {"message": "litellm.RateLimitError", "type": "throttling_error", "code": "429"}
}


@pytest.mark.parametrize(
    "body",
    [OPENAI_RPM_BODY, AZURE_QUOTA_BODY, OPENROUTER_QUOTA_BODY],
    ids=["openai-rpm", "azure-token-rate", "openrouter-rate-limit"],
)
def test_a_spent_quota_is_told_by_the_body(body: object) -> None:
    assert is_quota_overload(429, None, body)


def test_a_spent_quota_is_told_by_a_remaining_count_at_zero() -> None:
    assert is_quota_overload(429, parse_rate_limits(OPENROUTER, NOW), {})
    assert is_quota_overload(429, parse_rate_limits(OPENAI_TPM_SPENT, NOW), LITELLM_BODY)


@pytest.mark.parametrize(
    "status, body",
    [
        (429, AZURE_BUSY_BODY),
        (429, OPENROUTER_BUSY_BODY),
        (429, LITELLM_BODY),  # a 429 that says nothing more: capacity, the cautious reading
        (429, None),
        (503, {"error": {"message": "The engine is currently overloaded"}}),
        (529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        (503, OPENAI_RPM_BODY),  # only a 429 spends a quota
    ],
    ids=["azure-high-demand", "openrouter-capacity", "litellm", "bare", "503", "529", "503-rpm"],
)
def test_capacity_overloads_are_not_quota(status: int, body: object) -> None:
    assert not is_quota_overload(status, parse_rate_limits(OPENAI, NOW), body)


# ---- pacing ----------------------------------------------------------------------------------


def test_the_pacer_learns_the_per_minute_rate_and_a_ten_second_burst() -> None:
    pacer = QuotaPacer()
    pacer.observe(RateLimits(Quota(600, 600, 0.0)), now=0.0)
    assert pacer.rates() == (600, None)
    admitted = 0
    while pacer.seconds_until(0, 0.0) == 0.0:
        pacer.take(0, 0.0)
        admitted += 1
    assert admitted == 100  # 10 s of 600 per minute
    assert pacer.seconds_until(0, 0.0) == pytest.approx(0.1)  # then 10 a second


def test_the_pacer_follows_the_providers_remaining_count_down_only() -> None:
    pacer = QuotaPacer()
    pacer.observe(RateLimits(Quota(600, 600, 0.0)), now=0.0)
    # another replica spent most of the quota: 5 left, and we sent 2 since that answer
    pacer.observe(RateLimits(Quota(600, 5, 50.0)), now=1.0, sent_since=2)
    assert pacer.requests is not None
    assert pacer.requests.bucket.level(1.0) == pytest.approx(3.0)
    # a later answer saying more is left does not raise our own count
    pacer.observe(RateLimits(Quota(600, 500, 10.0)), now=1.0)
    assert pacer.requests.bucket.level(1.0) == pytest.approx(3.0)


def test_the_pacer_charges_tokens_and_reconciles_with_usage() -> None:
    pacer = QuotaPacer()
    pacer.observe(RateLimits(None, Quota(6000, 6000, 0.0)), now=0.0)  # 1000 a 10 s burst
    pacer.take(800, 0.0)
    assert pacer.seconds_until(400, 0.0) == pytest.approx(200 / 100)  # 100 tokens a second
    pacer.reconcile(600, 0.0)  # the answer used 200, not 800
    assert pacer.seconds_until(400, 0.0) == 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_limiter_admits_at_the_announced_rate_with_no_budget_configured() -> None:
    clock = Clock()
    lim = AIMDLimiter(50, 1, 100, clock=clock, rng=lambda: 0.0)
    first = lim.try_acquire()
    assert first is not None
    lim.on_success(first, None, RateLimits(Quota(60, 0, 1.0)))  # 60/min, nothing left
    assert lim.state().learnt_rpm == 60
    assert lim.try_acquire() is None  # the provider's count says wait
    clock.now = 0.99
    assert lim.try_acquire() is None
    clock.now = 1.0
    assert lim.try_acquire() is not None  # one a second
    assert lim.try_acquire() is None
    clock.now = 2.0
    assert lim.try_acquire() is not None


def test_a_reply_corrects_for_what_was_sent_after_it() -> None:
    clock = Clock()
    lim = AIMDLimiter(50, 1, 100, clock=clock, rng=lambda: 0.0)
    answered = lim.try_acquire()
    later = [lim.try_acquire() for _ in range(3)]
    assert answered is not None and all(later)
    # it said 3 left; the 3 sent after it took them
    lim.on_success(answered, None, RateLimits(Quota(600, 3, 1.0)))
    assert lim.try_acquire() is None
    clock.now = 0.1  # 10 a second
    assert lim.try_acquire() is not None


# ---- the fake LLM speaks each provider's quota --------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/api/v1/chat/completions",
        "/openai/deployments/d/chat/completions?api-version=2024-10-21",
    ],
    ids=["openai", "openrouter", "azure"],
)
async def test_the_fakes_quota_headers_and_429s_read_as_a_spent_quota(path: str) -> None:
    app = create_app(FakeLLMConfig(rpm=2, tpm=100_000 if "openrouter" not in path else 0))
    async with TestClient(TestServer(app)) as client:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        replies = []
        for _ in range(3):
            response = await client.post(path, json=body)
            replies.append((response.status, dict(response.headers), await response.json()))
    first, _, last = replies
    limits = parse_rate_limits(first[1], time.time())
    assert first[0] == 200 and limits is not None and limits.requests is not None
    assert (limits.requests.limit, limits.requests.remaining) == (2, 1)
    assert last[0] == 429
    spent = parse_rate_limits(last[1], time.time())
    assert spent is not None and spent.exhausted
    assert is_quota_overload(429, spent, last[2])
    assert is_quota_overload(429, None, last[2])  # the body alone says so too


async def test_the_fakes_capacity_429_reads_as_capacity() -> None:
    app = create_app(FakeLLMConfig(capacity=1, latency_ms=200))
    async with TestClient(TestServer(app)) as client:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        first = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
        await asyncio.sleep(0.05)
        refused = await client.post("/v1/chat/completions", json=body)
        status, headers, payload = refused.status, dict(refused.headers), await refused.json()
        await first
    assert status == 429
    assert not is_quota_overload(429, parse_rate_limits(headers, time.time()), payload)
