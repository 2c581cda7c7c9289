"""The fallback chain: which model a row goes to, with an injected clock."""

from __future__ import annotations

from typing import Any

import pytest

from consumer.config import LLMSettings
from consumer.llm.caller import CallResult
from consumer.llm.client import Completion, Usage
from consumer.llm.errors import FailureKind, LLMFailure
from consumer.llm.fallback import FallbackChain, Route

MESSAGES = [{"role": "user", "content": "Review: great"}]
OUTAGE = LLMFailure(FailureKind.TRANSIENT, "server_error", "down", 503)
BAD_KEY = LLMFailure(FailureKind.SYSTEMIC, "auth", "bad key", 401)
QUOTA = LLMFailure(FailureKind.SYSTEMIC, "insufficient_quota", "billing", 429)
TOO_LONG = LLMFailure(FailureKind.ROW, "context_length_exceeded", "8192 tokens", 400)
FILTERED = LLMFailure(FailureKind.ROW, "content_filter", "filtered", 400)
BUDGET = LLMFailure(FailureKind.SYSTEMIC, "budget_exhausted", "spent", None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Model:
    """A model that answers, or fails with `failure` while it is set."""

    def __init__(self, name: str, failure: LLMFailure | None = None, attempts: int = 1) -> None:
        self.name = name
        self.failure = failure
        self.attempts = attempts
        self.calls = 0

    async def call(self, messages: list[dict[str, str]]) -> CallResult:
        self.calls += 1
        if self.failure is not None:
            return CallResult(None, self.failure, self.attempts)
        return CallResult(Completion("POSITIVE", self.name, Usage(5, 1, 6), "stop"), None, 1)


def chain(*models: Model, clock: Clock, after_s: float = 60.0, probe_s: float = 30.0) -> Any:
    routes = [Route(model.name, model) for model in models]
    return FallbackChain(routes, after_s, probe_s, clock)


async def answered_by(fallbacks: FallbackChain) -> str | None:
    result = await fallbacks.call(MESSAGES)
    return result.completion.model if result.completion is not None else None


async def test_a_healthy_primary_answers_and_the_fallback_is_never_called() -> None:
    primary, backup = Model("primary"), Model("backup")
    fallbacks = chain(primary, backup, clock=Clock())
    assert await answered_by(fallbacks) == "primary"
    assert backup.calls == 0


@pytest.mark.parametrize("failure", [OUTAGE, BAD_KEY])
async def test_a_primary_failing_for_less_than_after_s_gives_its_failure_so_the_window_holds(
    failure: LLMFailure,
) -> None:
    clock = Clock()
    primary, backup = Model("primary", failure, attempts=3), Model("backup")
    fallbacks = chain(primary, backup, clock=clock, after_s=60)
    result = await fallbacks.call(MESSAGES)
    assert result.failure is failure and result.attempts == 3
    clock.now += 59
    assert (await fallbacks.call(MESSAGES)).failure is failure
    assert backup.calls == 0


async def test_after_after_s_of_failures_rows_go_to_the_fallback_and_skip_the_primary() -> None:
    clock = Clock()
    primary, backup = Model("primary", OUTAGE), Model("backup")
    fallbacks = chain(primary, backup, clock=clock, after_s=60, probe_s=30)
    await fallbacks.call(MESSAGES)
    clock.now += 60
    result = await fallbacks.call(MESSAGES)
    assert result.completion is not None and result.completion.model == "backup"
    assert result.attempts == 2, "the primary's attempt and the fallback's"
    assert fallbacks.passed_over() == ["primary"]
    calls = primary.calls
    for _ in range(5):
        assert await answered_by(fallbacks) == "backup"
    assert primary.calls == calls, "a passed-over model is not paid again for every row"


async def test_one_row_every_probe_s_tries_the_passed_over_primary_and_its_answer_restores_it() -> (
    None
):
    clock = Clock()
    primary, backup = Model("primary", OUTAGE), Model("backup")
    fallbacks = chain(primary, backup, clock=clock, after_s=0, probe_s=30)
    assert await answered_by(fallbacks) == "backup"
    clock.now += 29
    assert await answered_by(fallbacks) == "backup"
    assert primary.calls == 1
    clock.now += 1
    assert await answered_by(fallbacks) == "backup"  # the probe failed
    assert primary.calls == 2
    primary.failure = None
    clock.now += 30
    assert await answered_by(fallbacks) == "primary"
    assert fallbacks.passed_over() == []
    assert await answered_by(fallbacks) == "primary"


async def test_over_quota_goes_to_the_fallback_at_once() -> None:
    clock = Clock()
    primary, backup = Model("primary", QUOTA), Model("backup")
    fallbacks = chain(primary, backup, clock=clock, after_s=3600)
    assert await answered_by(fallbacks) == "backup"
    assert await answered_by(fallbacks) == "backup"
    assert primary.calls == 1


async def test_a_row_too_long_for_the_primary_tries_the_next_model_and_the_primary_stays() -> None:
    clock = Clock()
    primary, backup = Model("primary", TOO_LONG), Model("big-context")
    fallbacks = chain(primary, backup, clock=clock)
    assert await answered_by(fallbacks) == "big-context"
    assert fallbacks.passed_over() == []
    primary.failure = None
    assert await answered_by(fallbacks) == "primary"


async def test_a_row_too_long_for_every_model_is_a_row_error() -> None:
    primary, backup = Model("primary", TOO_LONG), Model("backup", TOO_LONG)
    result = await chain(primary, backup, clock=Clock()).call(MESSAGES)
    assert result.failure is TOO_LONG and result.attempts == 2


@pytest.mark.parametrize("failure", [FILTERED, BUDGET])
async def test_the_rows_own_errors_and_a_spent_budget_stay_with_the_primary(
    failure: LLMFailure,
) -> None:
    clock = Clock()
    primary, backup = Model("primary", failure), Model("backup")
    fallbacks = chain(primary, backup, clock=clock, after_s=0)
    assert (await fallbacks.call(MESSAGES)).failure is failure
    assert backup.calls == 0


async def test_every_model_failing_gives_the_last_ones_failure_so_the_window_holds() -> None:
    clock = Clock()
    primary, second, third = Model("p", QUOTA), Model("s", OUTAGE), Model("t", BAD_KEY)
    fallbacks = chain(primary, second, third, clock=clock, after_s=0)
    result = await fallbacks.call(MESSAGES)
    assert result.failure is BAD_KEY
    assert result.failure.kind is FailureKind.SYSTEMIC
    assert (primary.calls, second.calls, third.calls) == (1, 1, 1)
    # all passed over but the last, which is always tried
    result = await fallbacks.call(MESSAGES)
    assert result.failure is BAD_KEY
    assert (primary.calls, second.calls, third.calls) == (1, 1, 2)


async def test_the_chain_goes_on_to_the_third_model() -> None:
    clock = Clock()
    fallbacks = chain(Model("p", QUOTA), Model("s", QUOTA), Model("t"), clock=clock)
    assert await answered_by(fallbacks) == "t"


def settings(**llm: Any) -> LLMSettings:
    base: dict[str, Any] = {
        "provider": "openai",
        "model": "gpt-4o",
        "base_url": "http://127.0.0.1:1/v1",
        "api_key": "primary-key",
        "template": "{{ row.text }}",
        "temperature": 0.2,
        "concurrency": {"max": 32},
    }
    return LLMSettings.model_validate(base | llm)


def test_a_fallback_inherits_the_primary_settings_it_does_not_change() -> None:
    llm = settings(fallbacks=[{"model": "gpt-4o-mini", "concurrency": {"initial": 2, "max": 4}}])
    backup = llm.fallback_settings(0)
    assert (backup.model_name, backup.base_url, backup.temperature) == (
        "gpt-4o-mini",
        "http://127.0.0.1:1/v1",
        0.2,
    )
    assert backup.api_key is not None and backup.api_key.get_secret_value() == "primary-key"
    assert backup.concurrency.max == 4 and llm.concurrency.max == 32
    assert backup.fallbacks == []


def test_a_fallback_at_another_endpoint_does_not_inherit_the_connection() -> None:
    llm = settings(fallbacks=[{"provider": "openrouter", "model": "openai/gpt-4o"}])
    backup = llm.fallback_settings(0)
    assert backup.base_url is None and backup.api_key is None
    assert backup.provider == "openrouter" and backup.temperature == 0.2


def test_a_reasoning_fallback_gets_its_own_parameters() -> None:
    llm = LLMSettings.model_validate(
        {"provider": "openai", "model": "gpt-4o", "template": "x", "fallbacks": [{"model": "o3"}]}
    )
    backup = llm.fallback_settings(0)
    assert backup.token_parameter_name == "max_completion_tokens"
    assert not backup.sends_temperature


def test_a_broken_fallback_is_a_settings_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"fallbacks\.0: provider azure needs base_url"):
        settings(fallbacks=[{"provider": "azure", "deployment": "d"}])


async def test_a_failure_long_after_the_previous_one_starts_a_new_streak() -> None:
    clock = Clock()
    primary, backup = Model("primary", OUTAGE), Model("backup")
    routes = [Route(m.name, m) for m in (primary, backup)]
    fallbacks = FallbackChain(routes, after_s=60, probe_s=30, clock=clock, forget_s=300)
    await fallbacks.call(MESSAGES)
    clock.now += 3600  # a blip an hour after another
    assert (await fallbacks.call(MESSAGES)).failure is OUTAGE, "not an hour-long outage"
    clock.now += 59
    assert (await fallbacks.call(MESSAGES)).failure is OUTAGE
    clock.now += 1  # failing without a gap for after_s
    assert await answered_by(fallbacks) == "backup"
