"""Each provider's URL, auth and body, and what a 200 answer really says."""

from __future__ import annotations

from typing import Any

import pytest

from consumer.config import LLMSettings
from consumer.llm.client import ChatClient, endpoint_url, parse_completion, request_headers
from consumer.llm.errors import FailureKind, LLMFailure

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
