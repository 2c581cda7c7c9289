"""Each provider's URL, auth and body, and what a 200 answer really says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest

from consumer.config import LLMSettings
from consumer.llm.client import ChatClient, endpoint_url, parse_completion, request_headers
from consumer.llm.errors import FailureKind, LLMFailure
from tests.support.http_stub import stub_post

MESSAGES = [{"role": "user", "content": "hi"}]


def settings(**overrides: Any) -> LLMSettings:
    values: dict[str, Any] = {"provider": "openrouter", "model": "openai/gpt-4o-mini"}
    values["template"] = "{{ row.t }}"
    values.update(overrides)
    return LLMSettings(**values)


def azure(**overrides: Any) -> LLMSettings:
    values: dict[str, Any] = {
        "provider": "azure",
        "model": None,
        "base_url": "https://res.openai.azure.com/",
        "deployment": "gpt4o-prod",
        "api_key": "az-key",
    }
    values.update(overrides)
    return settings(**values)


def answer(content: Any = "hello", finish_reason: str = "stop", **extra: Any) -> dict[str, Any]:
    return {
        "id": "x",
        "model": "openai/gpt-4o-mini-2024",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
        **extra,
    }


def failure_of(body: Any, llm: LLMSettings | None = None) -> LLMFailure:
    with pytest.raises(LLMFailure) as caught:
        parse_completion(body, llm or settings())
    return caught.value


def test_a_normal_answer_gives_content_model_and_usage() -> None:
    completion = parse_completion(answer(), settings())
    assert completion.content == "hello"
    assert completion.model == "openai/gpt-4o-mini-2024"
    assert completion.usage.as_dict() == {
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "total_tokens": 17,
    }
    assert completion.finish_reason == "stop"


def test_without_a_model_in_the_answer_the_configured_name_is_used() -> None:
    body = answer()
    del body["model"]
    assert parse_completion(body, settings()).model == "openai/gpt-4o-mini"


def test_missing_usage_counts_as_zero_and_total_is_derived() -> None:
    body = answer()
    body["usage"] = {"prompt_tokens": 4, "completion_tokens": 2}
    assert parse_completion(body, settings()).usage.total_tokens == 6
    del body["usage"]
    assert parse_completion(body, settings()).usage.as_dict() == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
    }


def test_a_content_filter_finish_is_a_row_failure() -> None:
    failure = failure_of(answer(content=None, finish_reason="content_filter"))
    assert failure.kind is FailureKind.ROW
    assert failure.reason == "content_filter"


@pytest.mark.parametrize("content", ["", "   \n", None])
def test_empty_content_is_transient(content: Any) -> None:
    failure = failure_of(answer(content=content))
    assert failure.kind is FailureKind.TRANSIENT
    assert failure.reason == "empty_response"


def test_a_refusal_is_a_row_failure() -> None:
    body = answer(content=None)
    body["choices"][0]["message"]["refusal"] = "I can't help with that."
    failure = failure_of(body)
    assert failure.kind is FailureKind.ROW
    assert failure.message == "I can't help with that."


def test_a_top_level_error_in_a_200_is_classified_by_its_code() -> None:
    failure = failure_of({"error": {"code": 429, "message": "rate limited upstream"}})
    assert failure.kind is FailureKind.BACKPRESSURE
    assert failure.status_code == 429
    assert failure_of({"error": {"code": 401, "message": "no key"}}).kind is FailureKind.SYSTEMIC


def test_a_choice_level_error_is_classified() -> None:
    body = answer()
    body["choices"][0]["error"] = {"code": 502, "message": "provider went away"}
    failure = failure_of(body)
    assert failure.kind is FailureKind.TRANSIENT
    assert failure.status_code == 502
    assert failure.message == "provider went away"


@pytest.mark.parametrize("body", [None, [], {"choices": []}, {"choices": ["x"]}, {}])
def test_an_answer_without_choices_is_transient(body: Any) -> None:
    assert failure_of(body).kind is FailureKind.TRANSIENT


def test_json_object_format_parses_the_content() -> None:
    llm = settings(response_format="json_object")
    completion = parse_completion(answer('{"label": "spam", "score": 0.9}'), llm)
    assert completion.content == {"label": "spam", "score": 0.9}


def test_json_object_format_with_non_json_content_is_a_row_failure() -> None:
    failure = failure_of(answer("Sure! Here is JSON: {"), settings(response_format="json_object"))
    assert failure.kind is FailureKind.ROW
    assert failure.reason == "invalid_json_response"


def test_text_format_keeps_json_looking_content_as_text() -> None:
    assert parse_completion(answer('{"a": 1}'), settings()).content == '{"a": 1}'


def test_endpoint_url_openrouter_default() -> None:
    assert endpoint_url(settings()) == "https://openrouter.ai/api/v1/chat/completions"


def test_endpoint_url_openai_default_and_custom_base_url() -> None:
    assert endpoint_url(settings(provider="openai")) == "https://api.openai.com/v1/chat/completions"
    custom = settings(provider="openai", base_url="http://localhost:8000/v1/")
    assert endpoint_url(custom) == "http://localhost:8000/v1/chat/completions"


def test_endpoint_url_azure_deployments_has_the_api_version() -> None:
    assert endpoint_url(azure(api_version="2024-10-21")) == (
        "https://res.openai.azure.com/openai/deployments/gpt4o-prod/chat/completions"
        "?api-version=2024-10-21"
    )


def test_endpoint_url_azure_v1() -> None:
    assert endpoint_url(azure(azure_api_style="v1")) == (
        "https://res.openai.azure.com/openai/v1/chat/completions"
    )


@pytest.mark.parametrize("provider", ["openrouter", "openai"])
def test_request_headers_use_a_bearer_token(provider: str) -> None:
    headers = request_headers(settings(provider=provider, api_key="sk-1"))
    assert headers["authorization"] == "Bearer sk-1"
    assert "api-key" not in headers
    assert headers["content-type"] == "application/json"


def test_request_headers_use_api_key_for_azure() -> None:
    headers = request_headers(azure())
    assert headers["api-key"] == "az-key"
    assert "authorization" not in headers


def test_request_headers_without_a_key_send_no_auth() -> None:
    headers = request_headers(settings())
    assert "authorization" not in headers
    assert "api-key" not in headers


def test_extra_headers_are_merged() -> None:
    headers = request_headers(
        settings(api_key="sk-1", headers={"HTTP-Referer": "https://me", "X-Title": "app"})
    )
    assert headers["HTTP-Referer"] == "https://me"
    assert headers["X-Title"] == "app"
    assert headers["authorization"] == "Bearer sk-1"


def test_request_body_includes_model_and_generation_settings() -> None:
    body = ChatClient(settings(temperature=0.2, max_tokens=50)).request_body(MESSAGES)
    assert body == {
        "messages": MESSAGES,
        "model": "openai/gpt-4o-mini",
        "temperature": 0.2,
        "max_tokens": 50,
        "usage": {"include": True},  # OpenRouter's usage accounting (llm.pricing.provider_cost)
    }


def test_request_body_asks_for_json_when_configured() -> None:
    body = ChatClient(settings(response_format="json_object")).request_body(MESSAGES)
    assert body["response_format"] == {"type": "json_object"}


def test_request_body_omits_the_model_for_azure_deployments_style() -> None:
    body = ChatClient(azure()).request_body(MESSAGES)
    assert "model" not in body
    assert body["messages"] == MESSAGES


def test_request_body_names_the_deployment_as_model_for_azure_v1() -> None:
    body = ChatClient(azure(azure_api_style="v1")).request_body(MESSAGES)
    assert body["model"] == "gpt4o-prod"
    named = ChatClient(azure(azure_api_style="v1", model="gpt-4o")).request_body(MESSAGES)
    assert named["model"] == "gpt-4o"


def test_request_body_includes_extra_body() -> None:
    extra = {"provider": {"order": ["openai"]}, "models": ["a", "b"]}
    body = ChatClient(settings(extra_body=extra)).request_body(MESSAGES)
    assert body["provider"] == {"order": ["openai"]}
    assert body["models"] == ["a", "b"]
    assert body["messages"] == MESSAGES


SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["POSITIVE", "NEGATIVE", "NEUTRAL"]},
        "confidence": {"type": "number"},
    },
    "required": ["sentiment", "confidence"],
    "additionalProperties": False,
}


def schema_settings() -> LLMSettings:
    return settings(response_format="json_schema", json_schema=SCHEMA)


def test_request_body_asks_for_a_json_schema_when_configured() -> None:
    body = ChatClient(schema_settings()).request_body(MESSAGES)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": SCHEMA, "strict": True},
    }


def test_json_schema_format_gives_the_parsed_object() -> None:
    content = '{"sentiment": "POSITIVE", "confidence": 0.9}'
    completion = parse_completion(answer(content=content), schema_settings())
    assert completion.content == {"sentiment": "POSITIVE", "confidence": 0.9}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"sentiment": "POSITIVE"}', "missing required key 'confidence'"),
        ('{"sentiment": "GREAT", "confidence": 1}', "is not one of"),
        ('{"sentiment": "POSITIVE", "confidence": "high"}', "expected number"),
        ('{"sentiment": "POSITIVE", "confidence": 1, "x": 1}', "unexpected key 'x'"),
        ('["POSITIVE"]', "expected object"),
    ],
)
def test_an_answer_that_breaks_the_schema_is_a_row_failure(content: str, problem: str) -> None:
    failure = failure_of(answer(content=content), schema_settings())
    assert failure.kind is FailureKind.ROW
    assert failure.reason == "schema_mismatch"
    assert problem in failure.message


def test_json_cut_by_max_tokens_says_so() -> None:
    failure = failure_of(
        answer(content='{"sentiment": "POS', finish_reason="length"), schema_settings()
    )
    assert failure.reason == "invalid_json_response"
    assert "cut by max_tokens" in failure.message


def test_json_schema_needs_a_schema() -> None:
    with pytest.raises(ValueError):
        settings(response_format="json_schema")


def test_a_length_finish_is_kept_and_marked_truncated() -> None:
    completion = parse_completion(answer(finish_reason="length"), settings())
    assert completion.finish_reason == "length"
    assert completion.truncated
    assert not parse_completion(answer(), settings()).truncated


def test_an_openrouter_finish_reason_error_is_transient() -> None:
    body = answer()
    body["choices"][0]["finish_reason"] = "error"
    body["choices"][0]["native_finish_reason"] = "upstream_error"
    failure = failure_of(body)
    assert failure.kind is FailureKind.TRANSIENT
    assert "upstream_error" in failure.message


def test_estimated_tokens_are_prompt_chars_over_four_plus_max_tokens() -> None:
    client = ChatClient(settings(max_tokens=100))
    assert client.estimated_tokens([{"role": "user", "content": "x" * 40}]) == 10 + 4 + 100


def test_the_pool_is_at_least_the_limiters_max() -> None:
    llm = settings(concurrency={"initial": 10, "min": 1, "max": 300})
    assert ChatClient(llm).pool_size >= 300


async def test_a_connect_or_pool_timeout_is_transient_not_congestion() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise aiohttp.ConnectionTimeoutError("no connection in time")

    client = ChatClient(settings(), post=stub_post(handler))
    with pytest.raises(LLMFailure) as caught:
        await client.complete(MESSAGES)
    assert caught.value.kind is FailureKind.TRANSIENT


async def test_a_read_timeout_is_congestion() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise aiohttp.SocketTimeoutError("slow")

    client = ChatClient(settings(), post=stub_post(handler))
    with pytest.raises(LLMFailure) as caught:
        await client.complete(MESSAGES)
    assert caught.value.kind is FailureKind.BACKPRESSURE


def ok_response() -> httpx.Response:
    return httpx.Response(200, content=orjson.dumps(answer()))


async def test_azure_entra_token_is_sent_as_bearer_and_read_again_once_on_401(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("old-token\n")
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        if request.headers["authorization"] == "Bearer old-token":
            return httpx.Response(401, json={"error": {"code": "401", "message": "expired"}})
        return ok_response()

    llm = azure(api_key=None, azure_ad_token_file=token_file)
    client = ChatClient(llm, post=stub_post(handler))
    token_file.write_text("new-token\n")
    completion = await client.complete(MESSAGES)
    assert completion.content == "hello"
    assert seen == ["Bearer old-token", "Bearer new-token"]
    assert "api-key" not in request_headers(llm, "t")


async def test_a_401_that_survives_the_refresh_is_systemic(tmp_path: Path) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers["authorization"])
        return httpx.Response(401, json={"error": {"code": "401", "message": "no"}})

    llm = azure(api_key=None, azure_ad_token_command=["echo", "cmd-token"])
    client = ChatClient(llm, post=stub_post(handler))
    with pytest.raises(LLMFailure) as caught:
        await client.complete(MESSAGES)
    assert caught.value.kind is FailureKind.SYSTEMIC
    assert calls == ["Bearer cmd-token", "Bearer cmd-token"]  # read once more, then given up


def test_token_settings_are_azure_only_and_exclusive() -> None:
    with pytest.raises(ValueError):
        settings(azure_ad_token="t")
    with pytest.raises(ValueError):
        azure(azure_ad_token="t")  # api_key is set too


def _body(**overrides: Any) -> dict[str, Any]:
    llm = settings(provider="openai", **overrides)
    return ChatClient(llm, post=stub_post(lambda _: httpx.Response(500))).request_body(MESSAGES)


@pytest.mark.parametrize("model", ["o3-mini", "o1", "gpt-5", "gpt-5.1", "openai/o4-mini"])
def test_reasoning_models_get_max_completion_tokens_and_no_default_temperature(
    model: str,
) -> None:
    body = _body(model=model)
    assert body["max_completion_tokens"] == 256
    assert "max_tokens" not in body
    assert "temperature" not in body


def test_other_models_keep_max_tokens_and_temperature() -> None:
    body = _body(model="gpt-4o-mini")
    assert (body["max_tokens"], body["temperature"]) == (256, 0.0)
    assert "max_completion_tokens" not in body


def test_token_parameter_and_temperature_can_be_set_explicitly() -> None:
    body = _body(model="o3-mini", token_parameter="max_tokens", temperature=1.0)
    assert (body["max_tokens"], body["temperature"]) == (256, 1.0)
    body = _body(model="llama3", token_parameter="max_completion_tokens", temperature=None)
    assert body["max_completion_tokens"] == 256
    assert "temperature" not in body


def test_reasoning_effort_is_passed_through() -> None:
    assert _body(model="o3-mini", reasoning_effort="low")["reasoning_effort"] == "low"
    assert "reasoning_effort" not in _body(model="o3-mini")


def test_reasoning_and_cached_tokens_are_reported_only_when_present() -> None:
    body = answer()
    body["usage"]["completion_tokens_details"] = {"reasoning_tokens": 3}
    body["usage"]["prompt_tokens_details"] = {"cached_tokens": 8}
    assert parse_completion(body, settings()).usage.as_dict() == {
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "total_tokens": 17,
        "reasoning_tokens": 3,
        "cached_tokens": 8,
    }
    assert set(parse_completion(answer(), settings()).usage.as_dict()) == {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
    }


@pytest.mark.parametrize("content", ["", None])
def test_an_empty_answer_cut_by_length_is_a_row_error_never_retried(content: Any) -> None:
    body = answer(content=content, finish_reason="length")
    body["choices"][0]["message"]["reasoning_content"] = "Let me think"
    failure = failure_of(body)
    assert (failure.kind, failure.reason) == (FailureKind.ROW, "empty_answer")


async def test_a_streamed_answer_is_assembled() -> None:
    events = [
        ": OPENROUTER PROCESSING",
        'data: {"id":"g","model":"m-1","choices":[{"index":0,"delta":{"content":"POSI"}}]}',
        'data: {"id":"g","model":"m-1","choices":[{"index":0,"delta":{"content":"TIVE"},'
        '"finish_reason":"stop"}]}',
        'data: {"id":"g","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,'
        '"total_tokens":5}}',
        "data: [DONE]",
    ]
    reply = httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        content=("\n\n".join(events) + "\n\n").encode(),
    )
    client = ChatClient(settings(), post=stub_post(lambda _: reply))
    completion = await client.complete(MESSAGES)
    assert (completion.content, completion.model, completion.finish_reason) == (
        "POSITIVE",
        "m-1",
        "stop",
    )
    assert completion.usage.total_tokens == 5
