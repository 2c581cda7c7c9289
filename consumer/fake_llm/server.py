"""The aiohttp app: OpenAI-compatible chat routes with hidden capacity, quota and fault injection.

Everything here runs on one event loop, so the counters are plain ints and need no locks.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import ValidationError

from consumer.fake_llm import answers, faults
from consumer.fake_llm.batch import BATCH_FILE_MAX_BYTES, FakeBatches
from consumer.fake_llm.config import STARTUP_ONLY, FakeLLMConfig, Outage

QUOTA_WINDOW_S = 60.0
HANG_S = 3600.0
# Errors a real provider sends without a wait hint: waiting cannot fix them.
_NO_HINT_DIRECTIVES = frozenset({"insufficient_quota", "request_too_large"})
CHAT_PATHS = (
    "/v1/chat/completions",
    "/api/v1/chat/completions",
    "/chat/completions",
    "/openai/v1/chat/completions",
    "/openai/deployments/{deployment}/chat/completions",
)


class Stats:
    """Counters served by `/admin/stats`."""

    __slots__ = (
        "by_status",
        "cancelled",
        "last_request",
        "max_in_flight",
        "rejected_429",
        "requests",
        "tokens",
    )

    def __init__(self) -> None:
        self.requests = 0
        # The body of the last chat request, for tests that check what the client sent.
        self.last_request: Any = None
        self.by_status: dict[int, int] = {}
        self.max_in_flight = 0
        self.rejected_429 = 0
        self.cancelled = 0
        self.tokens = 0

    def count(self, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if status == 429:
            self.rejected_429 += 1


class FakeLLM:
    """State and handlers of one fake server."""

    def __init__(self, config: FakeLLMConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._rng = random.Random(config.seed)
        self._schedule_origin = clock()
        self._ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self.stats = Stats()
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # (status, until, retry_after_s) of the current outage.
        self._outage: tuple[int, float, float | None] | None = None
        self._prefixes = answers.PrefixCache(config.prefix_cache_min_tokens)
        self._attempts: dict[str, int] = {}
        # Quota admissions inside the sliding window: (time, charged tokens).
        self._quota: deque[tuple[float, int]] = deque()
        self._quota_tokens = 0

    # -- chat ---------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        config = self.config
        dialect = faults.dialect_of(request.path, config.dialect)
        if config.api_key is not None and not self._authorized(request, config.api_key):
            return self._reply(401, faults.INVALID_API_KEY)
        deployment = request.match_info.get("deployment")
        if deployment is not None and "api-version" not in request.query:
            return self._reply(400, faults.MISSING_API_VERSION)
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._invalid("We could not parse the JSON body of your request.")
        self.stats.last_request = payload
        messages = payload.get("messages") if isinstance(payload, dict) else None
        if not isinstance(messages, list) or not messages:
            return self._invalid("'messages' must be a non-empty array.", "messages")
        model = deployment or payload.get("model") or "fake-llm"
        now = self._clock()

        if self._outage is not None:
            status, until, retry_after = self._outage
            if now < until:
                hint = config.retry_after_s if retry_after is None else retry_after
                body = faults.server_error(status, dialect, model)
                return self._reply(status, body, faults.retry_headers(hint))
            self._outage = None
        refusal = self._configuration_error(payload, model, dialect)
        if refusal is not None:
            return refusal

        text = answers.last_user_text(messages)
        directive = faults.find_directive(text) if "[[fake:" in text else None
        if directive is not None:
            known = faults.HTTP_ERRORS | faults.BODY_FAULTS | answers.ANSWER_FAULTS
            if directive.name not in known:
                return self._invalid(f"Unknown fake-llm directive {directive.name!r}.")
            if directive.times is not None and not self._fails_again(directive.times, messages):
                directive = None
        prompt_tokens = answers.prompt_tokens(messages)
        if directive is not None and directive.name in faults.HTTP_ERRORS:
            status, body = faults.directive_error(directive.name, model, prompt_tokens, dialect)
            hinted = status in (429, 503) and directive.name not in _NO_HINT_DIRECTIVES
            return self._reply(status, body, self._retry_for(status) if hinted else None)
        if config.rate_429 or config.rate_500 or config.rate_503:
            status = self._random_failure(config)
            if status:
                body = faults.server_error(status, dialect, model)
                return self._reply(status, body, self._retry_for(status))

        max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            max_tokens = None
        quota_headers: dict[str, str] = {}
        if config.rpm or config.tpm:
            rejection = self._charge_quota(
                config, now, prompt_tokens + (max_tokens or 0), dialect, model
            )
            if rejection is not None:
                return rejection
            quota_headers = self._quota_remaining(config, now, dialect)

        capacity = self._capacity(now)
        if capacity and (self.in_flight >= capacity or self._waiters):
            self._drain(capacity)
            if self.in_flight >= capacity or self._waiters:
                if config.overload == "reject":
                    hint = config.retry_after_s
                    body = _overloaded(dialect, model, hint)
                    return self._reply(429, body, self._retry_for(429))
                await self._wait_for_slot()
            else:
                self.in_flight += 1
        else:
            self.in_flight += 1
        if self.in_flight > self.stats.max_in_flight:
            self.stats.max_in_flight = self.in_flight
        try:
            delay_ms = config.latency_ms + config.latency_per_inflight_ms * self.in_flight
            if config.jitter_ms:
                delay_ms += self._rng.random() * config.jitter_ms
            if delay_ms > 0:
                await asyncio.sleep(delay_ms / 1000)
            fault = directive.name if directive is not None else None
            if fault == "hang":
                await asyncio.sleep(HANG_S)
            if fault == "malformed":
                self.stats.count(200)
                return web.Response(body=faults.MALFORMED_BODY, content_type="application/json")
            if fault == "error200":
                return self._reply(200, faults.ERROR_IN_200)
            json_mode = _wants_json(payload.get("response_format"))
            if fault is None and (config.wrong_rate or config.truncate_rate):
                fault = self._sloppy_fault(config)
            if fault in answers.ANSWER_FAULTS:
                content = answers.spoiled_answer(fault, text, config.answer, json_mode)
            else:
                content = answers.answer(text, config.answer, json_mode)
            completion = self._completion(model, content, fault, max_tokens, prompt_tokens)
            self._account(completion, messages, payload, dialect)
            if payload.get("stream") is True:
                return await self._stream(request, completion, payload, quota_headers)
            return self._reply(200, completion, quota_headers)
        except asyncio.CancelledError:
            self.stats.cancelled += 1
            raise
        finally:
            self._release()

    def _completion(
        self,
        model: str,
        content: str,
        fault: str | None,
        max_tokens: int | None,
        prompt_tokens: int,
    ) -> faults.Body:
        finish_reason = "stop"
        message_content: str | None = content
        reasoning_tokens = None
        if answers.is_reasoning_model(model):
            reasoning_tokens = min(64, max_tokens or 64)
        if fault == "empty":
            message_content = ""
        elif fault == "empty_length":
            # A reasoning model that thought until the budget ran out: no text, all paid.
            message_content = ""
            finish_reason = "length"
            reasoning_tokens = max_tokens or 256
        elif fault == "length":
            message_content = content[: max(1, len(content) // 2)]
            finish_reason = "length"
        elif fault == "finish_content_filter":
            # Azure's filtered output: no text, finish_reason content_filter.
            message_content = None
            finish_reason = "content_filter"
        if (
            message_content
            and max_tokens is not None
            and answers.completion_tokens(message_content) > max_tokens
        ):
            message_content = message_content[: max_tokens * 4]
            finish_reason = "length"
        completion_tokens = answers.completion_tokens(message_content or "")
        usage: dict[str, Any] = {"prompt_tokens": prompt_tokens}
        if reasoning_tokens is not None:
            visible = answers.completion_tokens(message_content) if message_content else 0
            completion_tokens = visible + reasoning_tokens
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        total = prompt_tokens + completion_tokens
        usage["completion_tokens"] = completion_tokens
        usage["total_tokens"] = total
        self.stats.tokens += total
        return {
            "id": f"chatcmpl-fake{next(self._ids):010d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": answers.answered_model(model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": message_content},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                key: usage[key]
                for key in (
                    "prompt_tokens",
                    "completion_tokens",
                    "total_tokens",
                    "completion_tokens_details",
                )
                if key in usage
            },
        }

    def _account(
        self, completion: faults.Body, messages: list[Any], payload: Any, dialect: str
    ) -> None:
        """Cached prompt tokens (prefix caching) and, for OpenRouter's usage accounting, cost."""
        config = self.config
        usage = completion["usage"]
        if config.prefix_cache_min_tokens:
            if self._prefixes.block != config.prefix_cache_min_tokens:
                self._prefixes = answers.PrefixCache(config.prefix_cache_min_tokens)
            cached = min(self._prefixes.cached_tokens(messages), usage["prompt_tokens"])
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        asked = payload.get("usage") if isinstance(payload, dict) else None
        if dialect == "openrouter" and isinstance(asked, dict) and asked.get("include") is True:
            cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            usage["cost"] = (
                (usage["prompt_tokens"] - cached * 0.75) * config.usd_per_million_prompt
                + usage["completion_tokens"] * config.usd_per_million_completion
            ) / 1_000_000

    async def _stream(
        self,
        request: web.Request,
        completion: faults.Body,
        payload: dict[str, Any],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """The completion as server-sent events: a role chunk, content chunks, the finish
        chunk, a usage chunk when `stream_options.include_usage`, then `data: [DONE]`."""
        self.stats.count(200)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "x-request-id": self._request_id(),
                **headers,
            }
        )
        await response.prepare(request)
        choice = completion["choices"][0]
        base = {key: completion[key] for key in ("id", "created", "model")}
        base["object"] = "chat.completion.chunk"
        content = choice["message"]["content"] or ""
        pieces = [content[i : i + 4] for i in range(0, len(content), 4)]
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        deltas += [{"content": piece} for piece in pieces]
        for delta in deltas:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        final = {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
        await response.write(b"data: " + orjson.dumps({**base, "choices": [final]}) + b"\n\n")
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage_chunk = {**base, "choices": [], "usage": completion["usage"]}
            await response.write(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _configuration_error(
        self, payload: dict[str, Any], model: str, dialect: faults.Dialect
    ) -> web.Response | None:
        """What every request of a misconfigured client gets: billing, an unknown model, or
        a parameter a reasoning model rejects."""
        if self.config.quota_exhausted:
            status, body = faults.insufficient_quota(dialect)
            return self._reply(status, body)
        if self.config.models is not None and model not in self.config.models:
            status, body = faults.model_not_found(dialect, model)
            return self._reply(status, body)
        if dialect in ("openai", "azure") and answers.is_reasoning_model(model):
            if "max_tokens" in payload:
                return self._reply(400, faults.unsupported_parameter("max_tokens"))
            temperature = payload.get("temperature", 1)
            if temperature != 1:
                return self._reply(400, faults.unsupported_parameter("temperature", temperature))
        return None

    # -- admission ----------------------------------------------------------------------------

    @staticmethod
    def _authorized(request: web.Request, key: str) -> bool:
        headers = request.headers
        return headers.get("Authorization") == f"Bearer {key}" or headers.get("api-key") == key

    def _fails_again(self, times: int, messages: list[Any]) -> bool:
        key = faults.request_key(messages)
        attempt = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempt
        return attempt <= times

    def _random_failure(self, config: FakeLLMConfig) -> int:
        draw = self._rng.random()
        for status, rate in (
            (429, config.rate_429),
            (500, config.rate_500),
            (503, config.rate_503),
        ):
            if draw < rate:
                return status
            draw -= rate
        return 0

    def _sloppy_fault(self, config: FakeLLMConfig) -> str | None:
        """`wrong`, `length` or None, drawn with the seeded RNG (the sloppy-model mode)."""
        draw = self._rng.random()
        if draw < config.wrong_rate:
            return "wrong"
        if draw < config.wrong_rate + config.truncate_rate:
            return "length"
        return None

    def _retry_for(self, status: int) -> dict[str, str]:
        return faults.retry_headers(self.config.retry_after_s if status in (429, 503) else None)

    def _capacity(self, now: float) -> int:
        schedule = self.config.capacity_schedule
        if not schedule:
            return self.config.capacity
        elapsed = now - self._schedule_origin
        for capacity, seconds in schedule:
            if elapsed < seconds:
                return capacity
            elapsed -= seconds
        return schedule[-1][0]

    def _charge_quota(
        self, config: FakeLLMConfig, now: float, cost: int, dialect: faults.Dialect, model: str
    ) -> web.Response | None:
        """Admit and charge `cost` tokens, or answer the dialect's 429 with the wait until it
        fits (with Retry-After, and Azure's x-ms-retry-after-ms)."""
        window = self._quota
        while window and window[0][0] <= now - QUOTA_WINDOW_S:
            self._quota_tokens -= window.popleft()[1]
        wait = 0.0
        kind = "call"
        if config.rpm and len(window) >= config.rpm:
            wait = window[len(window) - config.rpm][0] + QUOTA_WINDOW_S - now
        if config.tpm:
            excess = self._quota_tokens + cost - config.tpm
            token_wait = 0.0
            if cost > config.tpm:
                token_wait = QUOTA_WINDOW_S
            elif excess > 0:
                for admitted, tokens in window:
                    excess -= tokens
                    if excess <= 0:
                        token_wait = admitted + QUOTA_WINDOW_S - now
                        break
            if token_wait > wait:
                wait, kind = token_wait, "token"
        if wait > 0:
            headers = faults.retry_headers(wait)
            if dialect == "azure":
                headers["x-ms-retry-after-ms"] = headers["retry-after-ms"]
            headers.update(self._quota_remaining(config, now, dialect))
            limit: Literal["requests", "tokens"]
            if kind == "call":
                limit, used = "requests", f"Limit {config.rpm}, Used {len(window)}, Requested 1"
            else:
                limit, used = (
                    "tokens",
                    f"Limit {config.tpm}, Used {self._quota_tokens}, Requested {cost}",
                )
            body = faults.rate_limited(dialect, model, limit, wait, used)
            return self._reply(429, body, headers)
        window.append((now, cost))
        self._quota_tokens += cost
        return None

    def _quota_remaining(
        self, config: FakeLLMConfig, now: float, dialect: faults.Dialect = "openai"
    ) -> dict[str, str]:
        """The dialect's rate-limit headers: OpenAI's x-ratelimit-limit/remaining/reset-*
        (Go durations), Azure's with resets in whole seconds (x-rate-limit-reset-tokens), or
        OpenRouter's X-RateLimit-Limit/Remaining/Reset (requests; epoch milliseconds). Reset is
        when the window is whole again (its newest admission leaves it)."""
        headers = {}
        whole_in = self._quota[-1][0] + QUOTA_WINDOW_S - now if self._quota else 0.0
        if dialect == "openrouter":
            if config.rpm:
                headers["X-RateLimit-Limit"] = str(config.rpm)
                headers["X-RateLimit-Remaining"] = str(max(0, config.rpm - len(self._quota)))
                headers["X-RateLimit-Reset"] = str(int((time.time() + whole_in) * 1000))
            return headers
        if dialect == "azure":
            seconds = str(math.ceil(whole_in))
            if config.rpm:
                headers["x-ratelimit-limit-requests"] = str(config.rpm)
                headers["x-ratelimit-remaining-requests"] = str(
                    max(0, config.rpm - len(self._quota))
                )
            if config.tpm:
                headers["x-ratelimit-limit-tokens"] = str(config.tpm)
                headers["x-ratelimit-remaining-tokens"] = str(
                    max(0, config.tpm - self._quota_tokens)
                )
                headers["x-rate-limit-reset-tokens"] = seconds
            return headers
        reset = answers.go_duration(whole_in) if self._quota else "0s"
        if config.rpm:
            headers["x-ratelimit-limit-requests"] = str(config.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, config.rpm - len(self._quota)))
            headers["x-ratelimit-reset-requests"] = reset
        if config.tpm:
            headers["x-ratelimit-limit-tokens"] = str(config.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, config.tpm - self._quota_tokens))
            headers["x-ratelimit-reset-tokens"] = reset
        return headers

    async def _wait_for_slot(self) -> None:
        """Queue FIFO for a slot; `_drain` hands it over already counted in `in_flight`."""
        slot = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self._release()
            elif slot in self._waiters:
                self._waiters.remove(slot)
            self.stats.cancelled += 1
            raise

    def _drain(self, capacity: int) -> None:
        while self._waiters and (not capacity or self.in_flight < capacity):
            waiter = self._waiters.popleft()
            if waiter.done():  # its request was cancelled while it waited: no slot to count
                continue
            self.in_flight += 1
            waiter.set_result(None)

    def _release(self) -> None:
        self.in_flight -= 1
        if self._waiters:
            self._drain(self._capacity(self._clock()))

    # -- responses ----------------------------------------------------------------------------

    def _reply(
        self, status: int, body: faults.Body, headers: dict[str, str] | None = None
    ) -> web.Response:
        self.stats.count(status)
        return web.Response(
            status=status,
            body=orjson.dumps(body),
            content_type="application/json",
            headers={"x-request-id": self._request_id(), **(headers or {})},
        )

    def _request_id(self) -> str:
        return f"req_fake{next(self._request_ids):012d}"

    def _invalid(self, message: str, param: str | None = None) -> web.Response:
        return self._reply(400, faults.openai_error(message, "invalid_request_error", None, param))

    # -- admin --------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def props(self, request: web.Request) -> web.Response:
        """llama.cpp's GET /props, as far as a client reads it: the slots it serves at once."""
        slots = self._capacity(self._clock())
        if not self.config.announce_slots or slots <= 0:
            return web.json_response({"error": {"code": 404, "message": "Not Found"}}, status=404)
        return web.json_response(
            {
                "total_slots": slots,
                "model_path": "/models/fake-model.gguf",
                "build_info": "fake-llm",
                "default_generation_settings": {"n_ctx": 4096},
            }
        )

    async def get_stats(self, request: web.Request) -> web.Response:
        stats = self.stats
        return _json(
            {
                "requests": stats.requests,
                "by_status": {str(status): n for status, n in sorted(stats.by_status.items())},
                "in_flight": self.in_flight,
                "max_in_flight": stats.max_in_flight,
                "queued": len(self._waiters),
                "rejected_429": stats.rejected_429,
                "cancelled": stats.cancelled,
                "tokens": stats.tokens,
                "capacity": self._capacity(self._clock()),
                "last_request": stats.last_request,
            }
        )

    async def reset(self, request: web.Request) -> web.Response:
        """Fresh counters, `xN` attempts, quota window and RNG, so each test starts clean."""
        self.stats = Stats()
        self.stats.max_in_flight = self.in_flight
        self._attempts.clear()
        self._quota.clear()
        self._quota_tokens = 0
        self._rng.seed(self.config.seed)
        return _json({"reset": True})

    async def get_config(self, request: web.Request) -> web.Response:
        return _json(self._config_view())

    async def patch_config(self, request: web.Request) -> web.Response:
        try:
            patch = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json({"error": "body is not JSON"}, 400)
        if not isinstance(patch, dict):
            return _json({"error": "body must be a JSON object"}, 400)
        outage_patch = patch.pop("outage", ...)
        fixed = sorted(STARTUP_ONLY & patch.keys())
        if fixed:
            return _json({"error": f"cannot change {', '.join(fixed)} at runtime"}, 400)
        try:
            config = FakeLLMConfig.model_validate(self.config.model_dump() | patch)
            outage = None if outage_patch in (None, ...) else Outage.model_validate(outage_patch)
        except ValidationError as exc:
            return _json({"error": orjson.loads(exc.json(include_url=False))}, 400)
        now = self._clock()
        if "capacity_schedule" in patch:
            self._schedule_origin = now
        elif "capacity" in patch:
            config.capacity_schedule = []
        if outage is not None:
            self._outage = (outage.status, now + outage.seconds, outage.retry_after_s)
        elif outage_patch is None:
            self._outage = None
        if "seed" in patch:
            self._rng.seed(config.seed)
        self.config = config
        self._drain(self._capacity(now))
        return _json(self._config_view())

    def _config_view(self) -> dict[str, Any]:
        view = self.config.model_dump(mode="json")
        outage = self._outage
        remaining = outage[1] - self._clock() if outage is not None else 0.0
        view["outage"] = (
            {"status": outage[0], "remaining_s": round(remaining, 3)}
            if outage is not None and remaining > 0
            else None
        )
        return view


def _overloaded(dialect: faults.Dialect, model: str, wait: float | None) -> faults.Body:
    """A 429 at capacity as each provider words it: overload, not a spent quota."""
    if dialect == "azure":
        retry = f" Please retry after {math.ceil(wait)} seconds." if wait is not None else ""
        message = (
            "The system is currently experiencing high demand and cannot process your request."
        )
        return {"error": {"code": "429", "message": message + retry}}
    if dialect == "openrouter":
        return {
            "error": {
                "code": 429,
                "message": f"{model} is temporarily rate-limited upstream",
                "metadata": {"error_type": "capacity_exhausted"},
            }
        }
    if dialect == "litellm":
        return faults.rate_limited(dialect, model, wait=wait)
    message = (
        "That model is currently overloaded with other requests. You can retry your request, "
        "or contact us through our help center at help.openai.com if the error persists."
    )
    return faults.openai_error(message, "server_error", None)


def _wants_json(response_format: Any) -> bool:
    return isinstance(response_format, dict) and response_format.get("type") in (
        "json_object",
        "json_schema",
    )


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def _models(request: web.Request) -> web.Response:
    """`GET /v1/models`: OpenAI clients and UIs probe it before their first call. Any model name
    is answered, so the list names only the one reported when a request names none."""
    model = {"id": "fake-llm", "object": "model", "created": 0, "owned_by": "llm-consumer"}
    return _json({"object": "list", "data": [model]})


FAKE_LLM_KEY = web.AppKey("fake_llm", FakeLLM)


def create_app(
    config: FakeLLMConfig, *, clock: Callable[[], float] = time.monotonic
) -> web.Application:
    """Build the app; `clock` lets tests move quota windows and schedules without sleeping."""
    fake = FakeLLM(config, clock)
    # Batch input files are up to 200 MB (aiohttp's default limit is 1 MB).
    app = web.Application(client_max_size=BATCH_FILE_MAX_BYTES)
    app[FAKE_LLM_KEY] = fake
    for path in CHAT_PATHS:
        app.router.add_post(path, fake.chat)
    for path in ("/v1/models", "/api/v1/models", "/models", "/openai/v1/models"):
        app.router.add_get(path, _models)
    FakeBatches(fake, clock).register(app)
    app.router.add_get("/health", fake.health)
    app.router.add_get("/props", fake.props)
    app.router.add_get("/admin/stats", fake.get_stats)
    app.router.add_post("/admin/reset", fake.reset)
    app.router.add_get("/admin/config", fake.get_config)
    app.router.add_post("/admin/config", fake.patch_config)
    return app


async def serve(config: FakeLLMConfig) -> None:
    """Serve until SIGTERM or SIGINT, then close within about a second."""
    runner = web.AppRunner(
        create_app(config), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=4096)
        await site.start()
        port = runner.addresses[0][1]
        print(f"fake-llm listening on http://{config.host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(config: FakeLLMConfig) -> None:
    asyncio.run(serve(config))
