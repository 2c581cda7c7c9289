"""One OpenAI-compatible chat-completion call, with each provider's URL, auth and error shapes.

The HTTP stack is aiohttp, called directly: bench/client_overhead.py measured httpx (even over
the aiohttp transport) at 0.30 of plain aiohttp's requests per second, its request and response
models costing as much CPU as the request itself, and plain httpx's pool degrading at high
concurrency. The one POST the client makes sits behind a small `Post` callable, so unit tests
serve it in process. The pool is sized to the limiter's maximum so no hidden queue sits under
the limiter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from consumer.config import LLMSettings
from consumer.llm.budgets import estimate_prompt_tokens
from consumer.llm.errors import (
    FailureKind,
    LLMFailure,
    classify_body_error,
    classify_status,
    retry_after_seconds,
)
from consumer.llm.jsonshape import schema_errors
from consumer.llm.ratelimit import RateLimits, is_quota_overload, parse_rate_limits

log = logging.getLogger(__name__)

_DEFAULT_BASE_URLS = {
    "openrouter": "https://openrouter.ai/api/v1",
    "openai": "https://api.openai.com/v1",
}


@dataclass(frozen=True)
class HttpReply:
    """What the client reads of an HTTP answer; `headers` look up names case-insensitively."""

    status: int
    headers: Mapping[str, str]
    content: bytes


# POST (url, body, headers) -> reply; raises aiohttp.ClientError or TimeoutError.
Post = Callable[[str, bytes, Mapping[str, str]], Awaitable[HttpReply]]


class AiohttpPost:
    """POSTs through one aiohttp session, opened on first use inside the running loop."""

    def __init__(self, pool_size: int, timeout_s: float, connect_timeout_s: float = 10.0) -> None:
        self._pool_size = pool_size
        # The whole request is bounded by timeout_s; connecting alone by connect_timeout_s (its
        # expiry is ConnectionTimeoutError, told apart from a slow answer).
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, url: str, payload: bytes, headers: Mapping[str, str]) -> HttpReply:
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size),
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        async with session.post(url, data=payload, headers=headers) as response:
            content = await response.read()
            return HttpReply(response.status, response.headers, content)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(frozen=True)
class Usage:
    """Tokens of one answer; reasoning and cached tokens only where the provider reports them,
    so outputs of providers that do not keep their shape."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None

    def as_dict(self) -> dict[str, int]:
        out = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.reasoning_tokens is not None:
            out["reasoning_tokens"] = self.reasoning_tokens
        if self.cached_tokens is not None:
            out["cached_tokens"] = self.cached_tokens
        return out


@dataclass(frozen=True)
class Completion:
    """A successful answer: the text (or parsed JSON), and what it cost."""

    content: Any
    model: str
    usage: Usage
    finish_reason: str | None
    # What the provider says the request cost (OpenRouter's usage.cost, in USD credits).
    provider_cost_usd: float | None = None
    # The reply's rate-limit headers, which the limiter paces by (None: it sent none).
    rate_limits: RateLimits | None = None
    # The model (or Azure deployment) the request named: prices are keyed by it when the
    # answered name (a dated snapshot, the deployment's model) has no price of its own.
    requested_model: str | None = None

    @property
    def truncated(self) -> bool:
        """The answer was cut by max_tokens (`finish_reason: length`)."""
        return self.finish_reason == "length"


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


def request_headers(settings: LLMSettings, azure_ad_token: str | None = None) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": "application/json"}
    if azure_ad_token is not None:
        headers["authorization"] = f"Bearer {azure_ad_token}"
    elif settings.api_key is not None:
        key = settings.api_key.get_secret_value()
        if settings.provider == "azure":
            headers["api-key"] = key
        else:
            headers["authorization"] = f"Bearer {key}"
    headers.update(settings.headers)
    return headers


def _detail(raw: dict[str, Any], section: str, key: str) -> int | None:
    details = raw.get(section)
    value = details.get(key) if isinstance(details, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _provider_cost(body: dict[str, Any]) -> float | None:
    usage = body.get("usage")
    cost = usage.get("cost") if isinstance(usage, dict) else None
    if isinstance(cost, int | float) and not isinstance(cost, bool) and cost >= 0:
        return float(cost)
    return None


def _usage(body: dict[str, Any]) -> Usage:
    found = body.get("usage")
    raw: dict[str, Any] = found if isinstance(found, dict) else {}
    prompt = int(raw.get("prompt_tokens") or 0)
    completion = int(raw.get("completion_tokens") or 0)
    total = int(raw.get("total_tokens") or prompt + completion)
    return Usage(
        prompt,
        completion,
        total,
        _detail(raw, "completion_tokens_details", "reasoning_tokens"),
        _detail(raw, "prompt_tokens_details", "cached_tokens"),
    )


def _parse_json_answer(content: str, settings: LLMSettings, finish_reason: Any) -> Any:
    """The parsed object of a JSON-mode answer, checked against `json_schema` when set."""
    cut = " (cut by max_tokens)" if finish_reason == "length" else ""
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise LLMFailure(
            FailureKind.ROW,
            "invalid_json_response",
            f"the answer is not JSON{cut}: {content[:200]!r}",
            200,
        ) from None
    if settings.response_format == "json_schema":
        problems = schema_errors(value, settings.json_schema)
        if problems:
            raise LLMFailure(
                FailureKind.ROW,
                "schema_mismatch",
                "the answer does not match json_schema: " + "; ".join(problems[:5]),
                200,
            )
    return value


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
    if finish_reason == "error":
        # OpenRouter: the provider failed mid-answer (native_finish_reason says how)
        native = choice.get("native_finish_reason")
        raise LLMFailure(
            FailureKind.TRANSIENT,
            "provider_error",
            f"the provider failed while answering ({native or 'no detail'})",
            200,
        )
    if not isinstance(content, str) or not content.strip():
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            raise LLMFailure(FailureKind.ROW, "refused", refusal, 200)
        if finish_reason == "length":
            # A reasoning model spent the whole budget thinking (vLLM puts the thoughts in
            # `reasoning_content`): asking again costs as much and ends the same way.
            raise LLMFailure(
                FailureKind.ROW,
                "empty_answer",
                "the answer is empty: max_tokens was used up before any text (raise it, or "
                "lower reasoning_effort)",
                200,
            )
        raise LLMFailure(FailureKind.TRANSIENT, "empty_response", "the answer has no content", 200)
    value: Any = content
    if settings.response_format != "text":
        value = _parse_json_answer(content, settings, finish_reason)
    answered_by = body.get("model")
    model = answered_by if isinstance(answered_by, str) else settings.model_name
    return Completion(
        value,
        model,
        _usage(body),
        finish_reason,
        _provider_cost(body),
        requested_model=settings.model_name,
    )


def _accepts_prompt_cache_key(settings: LLMSettings) -> bool:
    """OpenAI's own API only: other OpenAI-compatible servers may reject unknown fields."""
    if settings.provider != "openai":
        return False
    return settings.base_url is None or "api.openai.com" in settings.base_url


def _is_event_stream(headers: Mapping[str, str]) -> bool:
    return "text/event-stream" in (headers.get("content-type") or "")


def assemble_stream(content: bytes) -> dict[str, Any] | None:
    """The answer of an SSE stream (`stream: true` in extra_body) as one chat.completion body.

    Deltas are joined, the last finish_reason, model and usage win, and an error chunk
    (OpenRouter's mid-stream error) becomes the body's error; comments such as OpenRouter's
    `: OPENROUTER PROCESSING` are skipped. None when no chunk could be read.
    """
    text: list[str] = []
    reasoning: list[str] = []
    body: dict[str, Any] = {}
    choice: dict[str, Any] = {}
    for line in content.decode("utf-8", "replace").splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(chunk, dict):
            continue
        for key in ("id", "model", "usage", "error"):
            if chunk.get(key):
                body[key] = chunk[key]
        choices = chunk.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(first, dict):
            continue
        delta = first.get("delta")
        if isinstance(delta, dict):
            if isinstance(delta.get("content"), str):
                text.append(delta["content"])
            if isinstance(delta.get("reasoning_content"), str):
                reasoning.append(delta["reasoning_content"])
        for key in ("finish_reason", "native_finish_reason", "error"):
            if first.get(key):
                choice[key] = first[key]
    if not body and not choice and not text:
        return None
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    body["choices"] = [{"index": 0, "message": message, **choice}]
    return body


class AzureTokenSource:
    """An Entra ID bearer token from the settings, an env variable, a file or a command.

    Read at start; read again (once per 401 wave, shared by all requests that saw the same
    token) when the provider rejects it, since tokens expire after about an hour.
    """

    def __init__(self, settings: LLMSettings) -> None:
        self._settings = settings
        self._lock = asyncio.Lock()
        self.generation = 0
        self.token: str | None = None

    @staticmethod
    def configured(settings: LLMSettings) -> bool:
        return settings.provider == "azure" and any(
            source is not None
            for source in (
                settings.azure_ad_token,
                settings.azure_ad_token_env,
                settings.azure_ad_token_file,
                settings.azure_ad_token_command,
            )
        )

    def read_static(self) -> str | None:
        """The token from the settings, env or file (not the command: that one is async)."""
        settings = self._settings
        if settings.azure_ad_token is not None:
            return settings.azure_ad_token.get_secret_value()
        if settings.azure_ad_token_env is not None:
            return os.environ.get(settings.azure_ad_token_env, "").strip() or None
        if settings.azure_ad_token_file is not None:
            try:
                return settings.azure_ad_token_file.read_text(encoding="utf-8").strip() or None
            except OSError as error:
                log.warning("cannot read azure_ad_token_file: %s", error.strerror)
        return None

    async def read(self) -> str | None:
        command = self._settings.azure_ad_token_command
        if command is None:
            return self.read_static()
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            log.warning(
                "azure_ad_token_command failed (exit %s): %s",
                process.returncode,
                err.decode(errors="replace")[-300:],
            )
            return None
        return out.decode().strip() or None

    async def ensure(self) -> None:
        if self.token is None:
            await self.refresh(self.generation)

    async def refresh(self, seen_generation: int) -> None:
        """Read the token again unless another request already did since `seen_generation`."""
        async with self._lock:
            if self.generation != seen_generation:
                return
            self.token = await self.read()
            self.generation += 1
            log.debug("azure token read (generation %d)", self.generation)


class ChatClient:
    """Sends chat completions to one configured provider; every failure comes out classified."""

    def __init__(self, settings: LLMSettings, post: Post | None = None) -> None:
        self._settings = settings
        self._url = endpoint_url(settings)
        self._token = AzureTokenSource(settings) if AzureTokenSource.configured(settings) else None
        if self._token is not None:
            self._token.token = self._token.read_static()
        self._headers = request_headers(settings)
        self._session: AiohttpPost | None = None
        if post is None:
            post = self._session = AiohttpPost(self.pool_size, settings.request_timeout_s)
        self._post_raw = post
        # Sent as OpenAI's `prompt_cache_key` (the template hash, set by build_parts): requests
        # sharing a prompt prefix land on the same cache shard.
        self.prompt_cache_key: str | None = None
        # Told (model, seconds, completion, failure) after each attempt (consumer/audit.py).
        self.on_attempt: (
            Callable[[str, float, Completion | None, LLMFailure | None], None] | None
        ) = None

    @property
    def pool_size(self) -> int:
        """At least the limiter's max, so no hidden queue sits under the limiter; a few more for
        connections that are closing."""
        return self._settings.concurrency.max + 8

    def estimated_tokens(self, messages: list[dict[str, str]]) -> int:
        """What a TPM budget charges at admission: prompt chars/4 + max_tokens."""
        return estimate_prompt_tokens(messages) + (self._settings.max_tokens or 0)

    def request_body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        settings = self._settings
        body: dict[str, Any] = {"messages": messages}
        if not (settings.provider == "azure" and settings.azure_api_style == "deployments"):
            body["model"] = settings.model or settings.deployment
        if settings.sends_temperature:
            body["temperature"] = settings.temperature
        if settings.max_tokens is not None:
            body[settings.token_parameter_name] = settings.max_tokens
        if settings.reasoning_effort is not None:
            body["reasoning_effort"] = settings.reasoning_effort
        if settings.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif settings.response_format == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": settings.json_schema_name,
                    "schema": settings.json_schema,
                    "strict": settings.json_schema_strict,
                },
            }
        if settings.provider == "openrouter" and settings.pricing.provider_cost:
            # usage accounting: usage.cost and the token details in the answer (OpenRouter now
            # always includes them and ignores this; older deployments need it)
            body["usage"] = {"include": True}
        if self.prompt_cache_key is not None and _accepts_prompt_cache_key(settings):
            body["prompt_cache_key"] = self.prompt_cache_key
        body.update(settings.extra_body)
        return body

    def _auth_headers(self) -> dict[str, str]:
        if self._token is None or self._token.token is None:
            return self._headers
        return {**self._headers, "authorization": f"Bearer {self._token.token}"}

    async def _post(self, payload: bytes) -> HttpReply:
        try:
            return await self._post_raw(self._url, payload, self._auth_headers())
        except aiohttp.ConnectionTimeoutError as error:
            # connecting (or waiting for a pooled connection) says nothing about the provider's
            # capacity: transient, not congestion
            raise LLMFailure(
                FailureKind.TRANSIENT, "connect_timeout", f"no connection in time: {error!r}"
            ) from None
        except TimeoutError as error:  # the answer did not come in time (aiohttp's are too)
            raise LLMFailure(
                FailureKind.BACKPRESSURE, "timeout", f"request timed out: {error!r}"
            ) from None
        except aiohttp.ClientError as error:
            raise LLMFailure(
                FailureKind.TRANSIENT, "connection_error", f"connection failed: {error!r}"
            ) from None

    async def complete(self, messages: list[dict[str, str]]) -> Completion:
        """One attempt. Raises LLMFailure; never retries (the caller owns retries).

        The one exception: a 401 with an Entra ID token reads the token again and repeats the
        request once, since an expired token is not the row's fault. `on_attempt` (the audit
        trail) is told of every attempt, answered or not.
        """
        report = self.on_attempt
        if report is None:
            return await self._complete(messages)
        started = time.monotonic()
        try:
            completion = await self._complete(messages)
        except LLMFailure as failure:
            report(self._settings.model_name, time.monotonic() - started, None, failure)
            raise
        report(self._settings.model_name, time.monotonic() - started, completion, None)
        return completion

    async def _complete(self, messages: list[dict[str, str]]) -> Completion:
        payload = orjson.dumps(self.request_body(messages))
        token = self._token
        if token is not None:
            await token.ensure()
        generation = token.generation if token is not None else 0
        response = await self._post(payload)
        if response.status == 401 and token is not None:
            await token.refresh(generation)
            response = await self._post(payload)
        try:
            body: Any = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = None
        if response.status >= 400:
            if body is None and response.content.strip():
                # a gateway's plain-text answer (API Management: "Rate limit is exceeded. Try
                # again in 60 seconds."): its text is the message, and may hold the wait
                text = response.content.decode("utf-8", "replace").strip()
                body = {"message": text[:1000]}
            hint = retry_after_seconds(response.headers, body, status=response.status)
            failure = classify_status(response.status, body, hint)
            failure.rate_limits = parse_rate_limits(response.headers, time.time())
            failure.quota = is_quota_overload(response.status, failure.rate_limits, body)
            raise failure
        if body is None and _is_event_stream(response.headers):
            body = assemble_stream(response.content)
        if body is None:
            raise LLMFailure(
                FailureKind.TRANSIENT,
                "invalid_response",
                "the answer is not valid JSON",
                response.status,
            )
        completion = parse_completion(body, self._settings)
        limits = parse_rate_limits(response.headers, time.time())
        return completion if limits is None else dataclasses.replace(completion, rate_limits=limits)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.aclose()
