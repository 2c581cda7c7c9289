"""One row's call: retries, backoff, and what each attempt tells the limiter."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import httpx
import orjson
import pytest

from consumer.config import LLMSettings, RetrySettings
from consumer.llm.budgets import RetryBudget
from consumer.llm.caller import LLMCaller
from consumer.llm.client import ChatClient, Completion, Usage
from consumer.llm.errors import FailureKind, LLMFailure
from consumer.llm.limiter import AIMDLimiter
from tests.support.http_stub import stub_post

MESSAGES = [{"role": "user", "content": "hi"}]
OK_BODY = {
    "model": "gpt-test",
    "choices": [{"message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


class SteppingClock:
    """Every reading is later than the last, so a Retry-After gate has passed by the next look."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 100.0
        return self.now


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


Reply = tuple[int, Any, dict[str, str]]


class Server:
    """A scripted fake provider: one reply per request; the last one repeats."""

    def __init__(self, *replies: Reply | Exception) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        status, body, headers = reply
        return httpx.Response(status, content=orjson.dumps(body), headers=headers)


def ok() -> Reply:
    return (200, OK_BODY, {})


def error(status: int, code: Any = None, headers: dict[str, str] | None = None) -> Reply:
    return (status, {"error": {"message": f"error {status}", "code": code}}, headers or {})


def settings() -> LLMSettings:
    return LLMSettings(
        provider="openai",
        model="gpt-test",
        base_url="http://fake-llm.test/v1",
        api_key="sk-test",
        template="{{ row.t }}",
    )


RETRY = RetrySettings(max_attempts=4, initial_backoff_s=0.5, max_backoff_s=4.0)


def make(
    server: Server | Callable[[httpx.Request], httpx.Response],
    retry: RetrySettings = RETRY,
    initial: int = 10,
) -> tuple[LLMCaller, AIMDLimiter, Sleeps]:
    client = ChatClient(settings(), post=stub_post(server))
    limiter = AIMDLimiter(initial, 1, 100, decrease_factor=0.7, clock=SteppingClock())
    sleeps = Sleeps()
    caller = LLMCaller(client, limiter, retry, sleep=sleeps, rng=lambda: 1.0)
    return caller, limiter, sleeps


async def test_a_success_takes_one_attempt() -> None:
    server = Server(ok())
    caller, limiter, sleeps = make(server)
    result = await caller.call(MESSAGES)
    assert result.failure is None
    assert result.attempts == 1
    assert result.completion is not None
    assert result.completion.content == "hello"
    assert sleeps.delays == []
    assert limiter.state().in_flight == 0


async def test_a_429_then_success_takes_two_attempts_and_reports_congestion() -> None:
    server = Server(error(429), ok())
    caller, limiter, sleeps = make(server)
    result = await caller.call(MESSAGES)
    assert result.completion is not None
    assert result.attempts == 2
    assert len(server.requests) == 2
    assert limiter.state().decreases == 1
    assert limiter.limit < 10
    assert sleeps.delays == [0.5]  # no hint: the caller backs off itself
    assert limiter.state().in_flight == 0


async def test_a_400_is_not_retried() -> None:
    server = Server(error(400), ok())
    caller, limiter, sleeps = make(server)
    result = await caller.call(MESSAGES)
    assert result.completion is None
    assert result.failure is not None
    assert result.failure.kind is FailureKind.ROW
    assert result.attempts == 1
    assert len(server.requests) == 1
    assert sleeps.delays == []
    assert limiter.limit == 10.0  # says nothing about capacity
    assert limiter.state().in_flight == 0


async def test_a_400_context_length_exceeded_is_a_row_error_not_retried() -> None:
    server = Server(error(400, "context_length_exceeded"))
    caller, _, _ = make(server)
    result = await caller.call(MESSAGES)
    assert result.failure is not None
    assert result.failure.reason == "context_length_exceeded"
    assert result.attempts == 1


async def test_a_401_is_systemic_and_not_retried() -> None:
    server = Server(error(401))
    caller, _, _ = make(server)
    result = await caller.call(MESSAGES)
    assert result.failure is not None
    assert result.failure.kind is FailureKind.SYSTEMIC
    assert result.attempts == 1


async def test_503_on_every_attempt_returns_the_failure_after_max_attempts() -> None:
    server = Server(error(503))
    caller, limiter, sleeps = make(server)
    result = await caller.call(MESSAGES)
    assert result.completion is None
    assert result.failure is not None
    assert result.failure.reason == "overloaded"
    assert result.attempts == RETRY.max_attempts
    assert len(server.requests) == RETRY.max_attempts
    assert sleeps.delays == [0.5, 1.0, 2.0]  # no sleep after the last attempt
    assert limiter.state().in_flight == 0


async def test_a_500_is_retried_without_cutting_the_limit() -> None:
    server = Server(error(500), ok())
    caller, limiter, sleeps = make(server)
    result = await caller.call(MESSAGES)
    assert result.attempts == 2
    assert limiter.limit == 10.0
    assert sleeps.delays == [0.5]


async def test_a_connection_error_is_retried() -> None:
    server = Server(aiohttp.ClientConnectionError("refused"), ok())
    caller, _, sleeps = make(server)
    result = await caller.call(MESSAGES)
    assert result.completion is not None
    assert result.attempts == 2
    assert len(sleeps.delays) == 1


async def test_a_timeout_is_congestion() -> None:
    server = Server(aiohttp.SocketTimeoutError("slow"), ok())
    caller, limiter, _ = make(server)
    result = await caller.call(MESSAGES)
    assert result.attempts == 2
    assert limiter.state().decreases == 1


async def test_a_capacity_429_hint_is_waited_by_that_request_alone() -> None:
    server = Server(error(429, headers={"retry-after": "3"}), ok())
    caller, limiter, sleeps = make(server)
    result = await caller.call(MESSAGES)
    assert result.attempts == 2
    assert len(sleeps.delays) == 1
    assert 3.0 <= sleeps.delays[0] <= 3.0 * 1.2  # the hint plus jitter, outside the limit
    assert limiter.state().decreases == 1
    assert limiter.state().not_before_in_s == 0.0  # no gate: the other rows go on


async def test_a_quota_429_gates_everyone_instead_of_sleeping_and_does_not_cut() -> None:
    spent = {"retry-after": "3", "x-ratelimit-limit-requests": "60"}
    spent["x-ratelimit-remaining-requests"] = "0"
    server = Server(error(429, headers=spent), ok())
    caller, limiter, sleeps = make(server)
    result = await caller.call(MESSAGES)
    assert result.attempts == 2
    assert sleeps.delays == []  # the limiter's gate did the waiting
    assert limiter.state().decreases == 0
    assert limiter.state().quota_gates == 1
    assert limiter.state().learnt_rpm == pytest.approx(60 * 0.7)  # a smaller share after it


async def test_a_retry_after_on_a_transient_error_is_waited_by_that_request() -> None:
    server = Server(error(500, headers={"retry-after-ms": "200"}), ok())
    caller, limiter, sleeps = make(server)
    result = await caller.call(MESSAGES)
    assert result.attempts == 2
    assert len(sleeps.delays) == 1 and 0.2 <= sleeps.delays[0] <= 0.24
    assert limiter.state().decreases == 0


async def test_a_429_with_an_unparseable_retry_after_is_still_retried() -> None:
    server = Server(error(429, headers={"retry-after": "soon"}), ok())
    caller, limiter, _ = make(server)
    result = await caller.call(MESSAGES)
    assert result.completion is not None
    assert result.attempts == 2
    assert limiter.state().in_flight == 0


class StandIn:
    """A client stand-in: fails with the given failures, then answers."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def complete(self, messages: list[dict[str, str]]) -> Completion:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return Completion("ok", "m", Usage(1, 1, 2), "stop")


async def test_a_long_retry_after_hint_is_capped_at_max_retry_after() -> None:
    clock_now = [0.0]
    limiter = AIMDLimiter(10, 1, 100, clock=lambda: clock_now[0], rng=lambda: 0.0)
    retry = RetrySettings(max_attempts=1, max_retry_after_s=5.0)
    hint = LLMFailure(FailureKind.BACKPRESSURE, "rate_limited", "slow down", 429, 3600.0)
    hint.quota = True
    caller = LLMCaller(StandIn(hint), limiter, retry, sleep=Sleeps(), rng=lambda: 0.0)  # type: ignore[arg-type]
    result = await caller.call(MESSAGES)
    assert result.attempts == 1
    assert limiter.state().not_before_in_s == pytest.approx(5.0)
    # at capacity the same cap holds for the request's own wait
    sleeps = Sleeps()
    busy = LLMFailure(FailureKind.BACKPRESSURE, "overloaded", "busy", 503, 3600.0)
    retry = RetrySettings(max_attempts=2, max_retry_after_s=5.0)
    limiter = AIMDLimiter(10, 1, 100, clock=lambda: clock_now[0], rng=lambda: 0.0)
    caller = LLMCaller(StandIn(busy), limiter, retry, sleep=sleeps, rng=lambda: 0.0)  # type: ignore[arg-type]
    await caller.call(MESSAGES)
    assert sleeps.delays == [5.0]


async def test_an_unexpected_exception_releases_the_permit_and_propagates() -> None:
    limiter = AIMDLimiter(2, 1, 10)
    client = StandIn(RuntimeError("bug"))
    caller = LLMCaller(client, limiter, RETRY, sleep=Sleeps())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        await caller.call(MESSAGES)
    assert limiter.state().in_flight == 0


async def test_when_the_retry_budget_is_spent_a_retryable_failure_ends_the_row() -> None:
    now = [0.0]
    budget = RetryBudget(ratio=0.0, min_per_s=0.1, window_s=10.0, clock=lambda: now[0])
    limiter = AIMDLimiter(10, 1, 100, clock=lambda: now[0])
    busy = LLMFailure(FailureKind.BACKPRESSURE, "rate_limited", "slow down", 429)
    client = StandIn(*[busy] * 10)
    caller = LLMCaller(client, limiter, RETRY, sleep=Sleeps(), retry_budget=budget)  # type: ignore[arg-type]
    result = await caller.call(MESSAGES)
    assert result.completion is None
    assert result.retry_budget_exhausted
    assert result.attempts == 2  # the floor allowed one retry, then the budget was spent
    assert result.failure is not None
    assert result.failure.kind is FailureKind.BACKPRESSURE  # still retryable: the window decides
    assert "retry budget exhausted" in result.failure.message
    assert limiter.state().retry_budget_tokens == pytest.approx(0.0)


async def test_a_request_bigger_than_the_token_budget_fails_fast_without_an_attempt() -> None:
    server = Server(ok())
    client = ChatClient(settings(), post=stub_post(server))
    limiter = AIMDLimiter(10, 1, 100, tokens_per_minute=100)  # max_tokens 256 alone is more
    caller = LLMCaller(client, limiter, RETRY, sleep=Sleeps())
    result = await asyncio.wait_for(caller.call(MESSAGES), 1.0)
    assert result.failure is not None
    assert result.failure.reason == "exceeds_token_budget"
    assert result.attempts == 0
    assert server.requests == []


async def test_the_token_budget_is_reconciled_with_the_reported_usage() -> None:
    server = Server(ok())  # reports 4 total tokens
    client = ChatClient(settings(), post=stub_post(server))
    clock_now = [0.0]
    limiter = AIMDLimiter(10, 1, 100, clock=lambda: clock_now[0], tokens_per_minute=10_000)
    caller = LLMCaller(client, limiter, RETRY, sleep=Sleeps())
    await caller.call(MESSAGES)
    assert limiter.state().tpm_tokens == pytest.approx(10_000 - 4)


class Observed:
    def __init__(self) -> None:
        self.events: list[str] = []

    def record_success(self) -> None:
        self.events.append("ok")

    def record_failure(self, reason: str) -> None:
        self.events.append(reason)


async def test_a_row_stops_retrying_once_its_deadline_has_passed() -> None:
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    server = Server(error(500))
    client = ChatClient(settings(), post=stub_post(server))
    limiter = AIMDLimiter(10, 1, 100, clock=lambda: now[0])
    retry = RetrySettings(
        max_attempts=50, initial_backoff_s=10.0, max_backoff_s=10.0, row_deadline_s=35.0
    )
    caller = LLMCaller(client, limiter, retry, sleep=sleep, rng=lambda: 1.0, clock=lambda: now[0])
    result = await caller.call(MESSAGES)
    assert result.failure is not None and result.failure.reason == "server_error"
    assert result.attempts == 5, "attempts at 0, 10, 20, 30 and 40 s; none after the deadline"
    assert len(server.requests) == 5


async def test_the_health_hears_of_provider_failures_and_successes_but_not_row_errors() -> None:
    server = Server(error(500), error(400), ok())
    client = ChatClient(settings(), post=stub_post(server))
    limiter = AIMDLimiter(10, 1, 100, clock=SteppingClock())
    observed = Observed()
    caller = LLMCaller(client, limiter, RETRY, sleep=Sleeps(), health=observed)
    first = await caller.call(MESSAGES)  # 503, then a 400 ends the row
    second = await caller.call(MESSAGES)
    assert first.failure is not None and first.failure.kind is FailureKind.ROW
    assert second.completion is not None
    assert observed.events == ["server_error", "ok"]


async def test_each_attempt_is_reported_with_its_number() -> None:
    attempts: list[tuple[str, int]] = []
    server = Server(error(500), error(500), ok())
    client = ChatClient(settings(), post=stub_post(server))
    limiter = AIMDLimiter(10, 1, 100, clock=SteppingClock())
    caller = LLMCaller(
        client,
        limiter,
        RETRY,
        sleep=Sleeps(),
        on_attempt=lambda status, _seconds, attempt: attempts.append((status, attempt)),
    )
    await caller.call(MESSAGES)
    assert attempts == [("500", 1), ("500", 2), ("200", 3)]


async def test_an_error_inside_a_200_is_an_answer_not_a_provider_failure() -> None:
    """A provider that answers 200 with garbage for one row is up: readiness must not say it
    is failing (the row itself gets its error)."""
    server = Server((200, {"error": {"message": "upstream hiccup"}}, {}))
    client = ChatClient(settings(), post=stub_post(server))
    limiter = AIMDLimiter(10, 1, 100, clock=SteppingClock())
    observed = Observed()
    retry = RetrySettings(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)
    caller = LLMCaller(client, limiter, retry, sleep=Sleeps(), health=observed)
    result = await caller.call(MESSAGES)
    assert result.failure is not None and result.failure.status_code == 200
    assert observed.events == []


class Script:
    """A client stand-in that plays its script in order: an exception fails that attempt, None
    answers it. Every row's call takes the next step, so rows can interleave."""

    def __init__(self, *steps: BaseException | None) -> None:
        self.steps = list(steps)

    async def complete(self, messages: list[dict[str, str]]) -> Completion:
        step = self.steps.pop(0)
        if step is not None:
            raise step
        return Completion("ok", "m", Usage(1, 1, 2), "stop")


def busy() -> LLMFailure:
    return LLMFailure(FailureKind.BACKPRESSURE, "rate_limited", "at capacity", 429)


async def test_contention_while_the_model_answers_others_uses_up_none_of_the_rows_attempts() -> (
    None
):
    now = [0.0]
    limiter = AIMDLimiter(10, 1, 100, clock=lambda: now[0])
    client = Script(None, *[busy() for _ in range(6)], None)
    caller = LLMCaller(client, limiter, RETRY, sleep=Sleeps(), clock=lambda: now[0])  # type: ignore[arg-type]
    assert (await caller.call(MESSAGES)).completion is not None  # the model answers
    result = await caller.call(MESSAGES)
    assert result.completion is not None
    assert result.attempts == 7 > RETRY.max_attempts


async def test_contention_spends_no_retry_budget_and_does_not_end_when_it_is_spent() -> None:
    now = [0.0]
    budget = RetryBudget(ratio=0.0, min_per_s=0.0, window_s=10.0, clock=lambda: now[0])
    limiter = AIMDLimiter(10, 1, 100, clock=lambda: now[0])
    client = Script(None, busy(), busy(), busy(), None)
    caller = LLMCaller(
        client,  # type: ignore[arg-type]
        limiter,
        RETRY,
        sleep=Sleeps(),
        clock=lambda: now[0],
        retry_budget=budget,
    )
    assert budget.tokens() == 0.0  # an empty budget: an outage's retry would end the row
    assert (await caller.call(MESSAGES)).completion is not None  # the model answers
    result = await caller.call(MESSAGES)
    assert result.completion is not None
    assert not result.retry_budget_exhausted
    assert result.attempts == 4


async def test_backpressure_after_the_model_stopped_answering_ends_the_row_as_before() -> None:
    now = [0.0]
    limiter = AIMDLimiter(10, 1, 100, clock=lambda: now[0])
    client = Script(None, *[busy() for _ in range(10)])
    caller = LLMCaller(client, limiter, RETRY, sleep=Sleeps(), clock=lambda: now[0])  # type: ignore[arg-type]
    assert (await caller.call(MESSAGES)).completion is not None
    now[0] = 60.0  # nothing answered since: an outage, not contention
    result = await caller.call(MESSAGES)
    assert result.completion is None
    assert result.attempts == RETRY.max_attempts


async def test_backpressure_while_another_replica_is_answered_is_contention() -> None:
    """A replica held at the floor by its peers gets nothing but 429s: its own successes alone
    would call that an outage and end its rows; the peers told it the provider answers them."""
    now = [0.0]
    limiter = AIMDLimiter(10, 1, 100, clock=lambda: now[0])
    client = Script(*[busy() for _ in range(6)], None)
    caller = LLMCaller(client, limiter, RETRY, sleep=Sleeps(), clock=lambda: now[0])  # type: ignore[arg-type]
    now[0] = 60.0  # this replica has never been answered
    limiter.peers_told([5.0], answering=True)
    result = await caller.call(MESSAGES)
    assert result.completion is not None
    assert result.attempts == 7 > RETRY.max_attempts


async def test_peers_that_told_no_answer_lately_do_not_make_it_contention() -> None:
    now = [0.0]
    limiter = AIMDLimiter(10, 1, 100, clock=lambda: now[0])
    client = Script(*[busy() for _ in range(10)])
    caller = LLMCaller(client, limiter, RETRY, sleep=Sleeps(), clock=lambda: now[0])  # type: ignore[arg-type]
    limiter.peers_told([5.0], answering=True)
    now[0] = 60.0  # long ago: an outage for every replica since
    limiter.peers_told([5.0], answering=False)
    result = await caller.call(MESSAGES)
    assert result.completion is None
    assert result.attempts == RETRY.max_attempts
