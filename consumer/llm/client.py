"""One OpenAI-compatible chat-completion call, with each provider's URL, auth and error shapes.

The HTTP stack is httpx over the aiohttp transport: plain httpx's pool degrades at high
concurrency (bench/client_overhead.py measures both beside plain aiohttp). The pool is sized to
the limiter's maximum so no hidden queue sits under the limiter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from consumer.config import LLMSettings
from consumer.llm.errors import (
    FailureKind,
    LLMFailure,
    classify_body_error,
    classify_status,
    retry_after_seconds,
)

_DEFAULT_BASE_URLS = {
    "openrouter": "https://openrouter.ai/api/v1",
    "openai": "https://api.openai.com/v1",
}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class Completion:
    """A successful answer: the text (or parsed JSON), and what it cost."""

    content: Any
    model: str
    usage: Usage
    finish_reason: str | None


def endpoint_url(settings: LLMSettings) -> str:
    """The chat-completions URL for the configured provider."""
    if settings.provider == "azure":
        root = (settings.base_url or "").rstrip("/")
        if settings.azure_api_style == "v1":
            return f"{root}/openai/v1/chat/completions"
        return (
            f"{root}/openai/deployments/{settings.deployment}/chat/completions"
            f"?api-version={settings.api_version}"
        )
    root = (settings.base_url or _DEFAULT_BASE_URLS[settings.provider]).rstrip("/")
    return f"{root}/chat/completions"


def request_headers(settings: LLMSettings) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": "application/json"}
    if settings.api_key is not None:
        key = settings.api_key.get_secret_value()
        if settings.provider == "azure":
            headers["api-key"] = key
        else:
            headers["authorization"] = f"Bearer {key}"
    headers.update(settings.headers)
    return headers


def _usage(body: dict[str, Any]) -> Usage:
    found = body.get("usage")
    raw: dict[str, Any] = found if isinstance(found, dict) else {}
    prompt = int(raw.get("prompt_tokens") or 0)
    completion = int(raw.get("completion_tokens") or 0)
    total = int(raw.get("total_tokens") or prompt + completion)
    return Usage(prompt, completion, total)


def parse_completion(body: Any, settings: LLMSettings) -> Completion:
    """Turn a 200 answer into a Completion, or raise the failure hidden inside it."""
    if not isinstance(body, dict):
        raise LLMFailure(
            FailureKind.TRANSIENT, "invalid_response", "answer is not a JSON object", 200
        )
    if body.get("error"):
        raise classify_body_error(body)
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise LLMFailure(FailureKind.TRANSIENT, "invalid_response", "answer has no choices", 200)
    choice = choices[0]
    if choice.get("error"):
        raise classify_body_error({"error": choice["error"]})
    finish_reason = choice.get("finish_reason")
    found = choice.get("message")
    message: dict[str, Any] = found if isinstance(found, dict) else {}
    content = message.get("content")
    if finish_reason == "content_filter":
        raise LLMFailure(
            FailureKind.ROW, "content_filter", "the answer was withheld by a content filter", 200
        )
    if not isinstance(content, str) or not content.strip():
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            raise LLMFailure(FailureKind.ROW, "refused", refusal, 200)
        raise LLMFailure(FailureKind.TRANSIENT, "empty_response", "the answer has no content", 200)
    value: Any = content
    if settings.response_format == "json_object":
        try:
            value = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise LLMFailure(
                FailureKind.ROW,
                "invalid_json_response",
                f"the answer is not JSON: {content[:200]!r}",
                200,
            ) from None
    answered_by = body.get("model")
    model = answered_by if isinstance(answered_by, str) else settings.model_name
    return Completion(value, model, _usage(body), finish_reason)


class ChatClient:
    """Sends chat completions to one configured provider; every failure comes out classified."""

    def __init__(self, settings: LLMSettings, http: httpx.AsyncClient | None = None) -> None:
        self._settings = settings
        self._url = endpoint_url(settings)
        self._headers = request_headers(settings)
        pool = settings.concurrency.max + 8
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        self._http = http or httpx.AsyncClient(
            transport=AiohttpTransport(limits=limits),
            timeout=httpx.Timeout(settings.request_timeout_s, connect=10.0),
        )

    def request_body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        settings = self._settings
        body: dict[str, Any] = {"messages": messages}
        if not (settings.provider == "azure" and settings.azure_api_style == "deployments"):
            body["model"] = settings.model or settings.deployment
        if settings.temperature is not None:
            body["temperature"] = settings.temperature
        if settings.max_tokens is not None:
            body["max_tokens"] = settings.max_tokens
        if settings.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        body.update(settings.extra_body)
        return body

    async def complete(self, messages: list[dict[str, str]]) -> Completion:
        """One attempt. Raises LLMFailure; never retries (the caller owns retries)."""
        payload = orjson.dumps(self.request_body(messages))
        try:
            response = await self._http.post(self._url, content=payload, headers=self._headers)
        except httpx.TimeoutException as error:
            raise LLMFailure(
                FailureKind.BACKPRESSURE, "timeout", f"request timed out: {error!r}"
            ) from None
        except httpx.TransportError as error:
            raise LLMFailure(
                FailureKind.TRANSIENT, "connection_error", f"connection failed: {error!r}"
            ) from None
        try:
            body: Any = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = None
        if response.status_code >= 400:
            hint = retry_after_seconds(response.headers, body)
            raise classify_status(response.status_code, body, hint)
        if body is None:
            raise LLMFailure(
                FailureKind.TRANSIENT,
                "invalid_response",
                "the answer is not valid JSON",
                response.status_code,
            )
        return parse_completion(body, self._settings)

    async def aclose(self) -> None:
        await self._http.aclose()
