"""Fault directives and the provider error shapes they produce (OpenAI, Azure, OpenRouter)."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

Body = dict[str, Any]

# Directives answered with an HTTP error before the request takes a capacity slot.
HTTP_ERRORS = frozenset(
    {"400", "401", "404", "429", "500", "502", "503", "context_length", "content_filter"}
)
# Directives answered after admission and latency, with a 200 (or never, for "hang").
BODY_FAULTS = frozenset(
    {"empty", "error200", "finish_content_filter", "hang", "length", "malformed"}
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


RATE_LIMITED: Body = {
    "error": {"message": "Rate limit exceeded", "type": "rate_limit_exceeded", "code": 429}
}
INVALID_API_KEY = openai_error(
    "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
)


def server_error(status: int) -> Body:
    """Body for a 5xx (or any other injected status), vLLM-newer style with an int code."""
    if status == 429:
        return RATE_LIMITED
    messages = {
        500: "The server had an error while processing your request. Sorry about that!",
        502: "Bad gateway: the upstream model returned an invalid response",
        503: "The engine is currently overloaded, please try again later",
    }
    message = messages.get(status, f"Injected failure with status {status}")
    return {"error": {"message": message, "type": "server_error", "param": None, "code": status}}


def azure_quota_exceeded(kind: str, seconds: float) -> Body:
    """Azure's quota 429: a string code and the wait spelled out in the message."""
    wait = math.ceil(seconds)
    return {
        "error": {
            "code": "429",
            "message": (
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version"
                f" 2024-10-21 have exceeded {kind} rate limit of your current OpenAI S0 pricing"
                f" tier. Please retry after {wait} seconds. Please go here:"
                " https://aka.ms/oai/quotaincrease if you would like to further increase the"
                " default rate limit."
            ),
        }
    }


MISSING_API_VERSION: Body = {
    "error": {"code": "BadRequest", "message": "Missing required query parameter: api-version"}
}


def directive_error(name: str, model: str, prompt_tokens: int) -> tuple[int, Body]:
    """Status and body of an HTTP-error directive (a name in HTTP_ERRORS)."""
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
    return int(name), server_error(int(name))


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
