"""Fault directives and the provider error shapes they produce, per dialect (OpenAI, Azure,
OpenRouter, LiteLLM), taken from tests/data/provider_errors.yaml."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson

Body = dict[str, Any]

# Directives answered with an HTTP error before the request takes a capacity slot.
HTTP_ERRORS = frozenset(
    {
        "400",
        "401",
        "404",
        "429",
        "500",
        "502",
        "503",
        "content_filter",
        "context_length",
        "insufficient_quota",
        "model_not_found",
        "request_too_large",
        "unsupported_parameter",
    }
)
# Directives answered after admission and latency, with a 200 (or never, for "hang").
BODY_FAULTS = frozenset(
    {"empty", "empty_length", "error200", "finish_content_filter", "hang", "length", "malformed"}
)

_DIRECTIVE = re.compile(r"\[\[fake:([a-z0-9_]+?)(?:x(\d+))?\]\]")

# A 200 whose body is cut mid-document, as a broken proxy would send it.
MALFORMED_BODY = b'{"id":"chatcmpl-malformed","object":"chat.completion","choices":[{"index":0,'


@dataclass(frozen=True, slots=True)
class Directive:
    """`[[fake:NAME]]` or `[[fake:NAMExN]]`: fail always, or only the first N attempts."""

    name: str
    times: int | None


def find_directive(text: str) -> Directive | None:
    match = _DIRECTIVE.search(text)
    if match is None:
        return None
    times = match.group(2)
    return Directive(match.group(1), int(times) if times is not None else None)


def request_key(messages: list[Any]) -> str:
    """Identity of "the same request" across retries, for `xN` attempt counting."""
    return hashlib.sha256(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)).hexdigest()


def retry_headers(seconds: float | None) -> dict[str, str]:
    """Retry-After in whole seconds (rounded up) plus the precise retry-after-ms."""
    if seconds is None:
        return {}
    return {"Retry-After": str(math.ceil(seconds)), "retry-after-ms": str(round(seconds * 1000))}


def openai_error(message: str, type_: str, code: str | None, param: str | None = None) -> Body:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


INVALID_API_KEY = openai_error(
    "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
)

# Which provider's shapes a route speaks; the `dialect` knob overrides it.
Dialect = Literal["openai", "azure", "openrouter", "litellm"]


def dialect_of(path: str, configured: str) -> Dialect:
    if configured in ("openai", "azure", "openrouter", "litellm"):
        return cast(Dialect, configured)
    if path.startswith("/openai/"):
        return "azure"
    if path.startswith("/api/v1/"):
        return "openrouter"
    return "openai"


def _wait_text(seconds: float) -> str:
    """OpenAI's spelling of a wait: 644ms, 1.574s, 20s."""
    return f"{round(seconds * 1000)}ms" if seconds < 1 else f"{round(seconds, 3):g}s"


def rate_limited(
    dialect: Dialect,
    model: str,
    limit: Literal["requests", "tokens"] = "requests",
    wait: float | None = None,
    figures: str = "",
) -> Body:
    """A 429 for load (capacity or quota) as each provider words it."""
    if dialect == "azure":
        return azure_quota_exceeded("call" if limit == "requests" else "token", wait)
    if dialect == "openrouter":
        return {
            "error": {
                "code": 429,
                "message": "Rate limit exceeded",
                "metadata": {"error_type": "rate_limit_exceeded"},
            }
        }
    if dialect == "litellm":
        return {
            "error": {
                "message": "litellm.RateLimitError: Rate limit exceeded",
                "type": "throttling_error",
                "param": None,
                "code": "429",
            }
        }
    per = "requests per min (RPM)" if limit == "requests" else "tokens per min (TPM)"
    message = f"Rate limit reached for {model} in organization org-fake-llm on {per}"
    message += f": {figures}." if figures else "."
    if wait is not None:
        message += f" Please try again in {_wait_text(wait)}."
    message += " Visit https://platform.openai.com/account/rate-limits to learn more."
    return openai_error(message, limit, "rate_limit_exceeded")


_SERVER_MESSAGES = {
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Bad gateway: the upstream model returned an invalid response",
    503: "The engine is currently overloaded, please try again later",
}
_OPENROUTER_ERROR_TYPES = {502: "provider_unavailable", 503: "provider_overloaded"}


def server_error(status: int, dialect: Dialect = "openai", model: str = "fake-llm") -> Body:
    """Body for a 5xx (or any other injected status): OpenAI's has `code: null`, OpenRouter's
    the status and an error_type, LiteLLM's the status as a string."""
    if status == 429:
        return rate_limited(dialect, model)
    message = _SERVER_MESSAGES.get(status, f"Injected failure with status {status}")
    if dialect == "openrouter":
        error_type = _OPENROUTER_ERROR_TYPES.get(status, "server")
        return {
            "error": {"code": status, "message": message, "metadata": {"error_type": error_type}}
        }
    if dialect == "litellm":
        return {"error": {"message": message, "type": None, "param": None, "code": str(status)}}
    return openai_error(message, "server_error", None)


def model_not_found(dialect: Dialect, model: str) -> tuple[int, Body]:
    """A misspelt model (or deployment) name, in each provider's words."""
    if dialect == "azure":
        return 404, {
            "error": {
                "code": "DeploymentNotFound",
                "message": "The API deployment for this resource does not exist. If you created"
                " the deployment within the last 5 minutes, please wait a moment and try again.",
            }
        }
    if dialect == "openrouter":
        return 400, {"error": {"message": f"{model} is not a valid model ID", "code": 400}}
    if dialect == "litellm":
        message = (
            f"{{'error': '/chat/completions: Invalid model name passed in model={model}. Call"
            " `/v1/models` to view available models for your key.'}"
        )
        return 400, {"error": {"message": message, "type": "None", "param": "None", "code": "400"}}
    return 404, openai_error(
        f"The model `{model}` does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    )


def insufficient_quota(dialect: Dialect) -> tuple[int, Body]:
    """Billing: OpenAI's 429 (Azure and LiteLLM pass it on), OpenRouter's 402."""
    if dialect == "openrouter":
        message = (
            "Your account or API key has insufficient credits. Add more credits and retry the"
            " request."
        )
        return 402, {"error": {"code": 402, "message": message}}
    return 429, openai_error(
        "You exceeded your current quota, please check your plan and billing details. For more"
        " information on this error, read the docs:"
        " https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "insufficient_quota",
        "insufficient_quota",
    )


def unsupported_parameter(param: str, value: Any = None) -> Body:
    """What OpenAI's reasoning models answer to max_tokens and to a non-default temperature."""
    if param == "max_tokens":
        return openai_error(
            "Unsupported parameter: 'max_tokens' is not supported with this model. Use"
            " 'max_completion_tokens' instead.",
            "invalid_request_error",
            "unsupported_parameter",
            "max_tokens",
        )
    return openai_error(
        f"Unsupported value: '{param}' does not support {value} with this model. Only the"
        " default (1) value is supported.",
        "invalid_request_error",
        "unsupported_value",
        param,
    )


def request_too_large(model: str, tokens: int) -> Body:
    return openai_error(
        f"Request too large for {model} in organization org-fake-llm on tokens per min (TPM):"
        f" Limit 30000, Requested {max(tokens, 30001)}. The input or output tokens must be"
        " reduced in order to run successfully. Visit"
        " https://platform.openai.com/account/rate-limits to learn more.",
        "tokens",
        "rate_limit_exceeded",
    )


def azure_quota_exceeded(kind: str, seconds: float | None) -> Body:
    """Azure's quota 429: a string code and the wait spelled out in the message."""
    wait = f" Please retry after {math.ceil(seconds)} seconds." if seconds is not None else ""
    return {
        "error": {
            "code": "429",
            "message": (
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version"
                f" 2024-10-21 have exceeded {kind} rate limit of your current OpenAI S0 pricing"
                f" tier.{wait} Please go here:"
                " https://aka.ms/oai/quotaincrease if you would like to further increase the"
                " default rate limit."
            ),
        }
    }


MISSING_API_VERSION: Body = {
    "error": {"code": "BadRequest", "message": "Missing required query parameter: api-version"}
}


def directive_error(
    name: str, model: str, prompt_tokens: int, dialect: Dialect = "openai"
) -> tuple[int, Body]:
    """Status and body of an HTTP-error directive (a name in HTTP_ERRORS)."""
    if name == "insufficient_quota":
        return insufficient_quota(dialect)
    if name == "model_not_found":
        return model_not_found(dialect, model)
    if name == "unsupported_parameter":
        return 400, unsupported_parameter("max_tokens")
    if name == "request_too_large":
        return 429, request_too_large(model, prompt_tokens)
    if name == "400":
        return 400, openai_error(
            "Invalid request (injected by fake-llm).", "invalid_request_error", None
        )
    if name == "context_length":
        return 400, openai_error(
            "This model's maximum context length is 8192 tokens. However, your messages"
            f" resulted in {max(prompt_tokens, 8193)} tokens. Please reduce the length of the"
            " messages.",
            "invalid_request_error",
            "context_length_exceeded",
            "messages",
        )
    if name == "content_filter":
        return 400, _azure_content_filter()
    if name == "401":
        return 401, INVALID_API_KEY
    if name == "404":
        return 404, openai_error(
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        )
    return int(name), server_error(int(name), dialect, model)


def _azure_content_filter() -> Body:
    safe = {"filtered": False, "severity": "safe"}
    return {
        "error": {
            "message": (
                "The response was filtered due to the prompt triggering Azure OpenAI's content"
                " management policy. Please modify your prompt and retry."
            ),
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {
                    "hate": {"filtered": True, "severity": "high"},
                    "self_harm": safe,
                    "sexual": safe,
                    "violence": safe,
                },
            },
        }
    }


# OpenRouter reports most upstream failures as HTTP 200 with a top-level error.
ERROR_IN_200: Body = {
    "error": {
        "code": 502,
        "message": "Provider returned error",
        "metadata": {"provider_name": "fake-llm", "raw": "upstream model failed"},
    }
}
