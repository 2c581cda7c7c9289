"""Behaviour of the fake LLM server, exercised over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import ClientTimeout, web
from aiohttp.test_utils import TestClient, TestServer

from consumer.fake_llm.config import FakeLLMConfig
from consumer.fake_llm.server import create_app
from tests.support.fake_llm_process import fake_llm_process

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


class FakeClock:
    """Lets quota windows, outages and schedules advance without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[Client] = []

    async def make(clock: Callable[[], float] = time.monotonic, **knobs: Any) -> Client:
        client = TestClient(TestServer(create_app(FakeLLMConfig(**knobs), clock=clock)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": text}], **extra}


async def post(client: Client, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    response = await client.post(path, json=body)
    return response.status, await response.json(), response


async def stats(client: Client) -> dict[str, Any]:
    response = await client.get("/admin/stats")
    result: dict[str, Any] = await response.json()
    return result


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("I love it, great product, would recommend", "POSITIVE"),
        ("Terrible. Arrived broken, I want a refund", "NEGATIVE"),
        ("It is a box with a lid", "NEUTRAL"),
        ("good but bad", "NEUTRAL"),
    ],
)
async def test_sentiment_answer(make_client: MakeClient, text: str, label: str) -> None:
    client = await make_client()
    status, body, _ = await post(client, chat(text))
    assert status == 200
    assert body["choices"][0]["message"] == {"role": "assistant", "content": label}


async def test_response_shape_and_usage(make_client: MakeClient) -> None:
    client = await make_client()
    messages = [
        {"role": "system", "content": "You classify."},  # 13 chars
        {"role": "user", "content": [{"type": "text", "text": "I love it, great product"}]},  # 24
    ]
    status, body, _ = await post(client, {"model": "m1", "messages": messages})
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "m1"
    assert body["choices"][0]["finish_reason"] == "stop"
    # ceil(37 / 4) + 4 * 2 = 18; "POSITIVE" is 8 chars -> 2.
    assert body["usage"] == {"prompt_tokens": 18, "completion_tokens": 2, "total_tokens": 20}
    assert (await stats(client))["tokens"] == 20


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
async def test_json_response_format(make_client: MakeClient, kind: str) -> None:
    client = await make_client()
    body = chat("terrible and broken", response_format={"type": kind})
    _, reply, _ = await post(client, body)
    content = orjson.loads(reply["choices"][0]["message"]["content"])
    assert content == {"sentiment": "NEGATIVE", "confidence": 0.8}


async def test_max_tokens_truncates_with_finish_length(make_client: MakeClient) -> None:
    client = await make_client(answer="echo")
    _, body, _ = await post(client, chat("a fairly long sentence to echo back", max_tokens=2))
    choice = body["choices"][0]
    assert choice["message"]["content"] == "a fairly"
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v1/chat/completions", "gpt-test"),
        ("/api/v1/chat/completions", "gpt-test"),
        ("/chat/completions", "gpt-test"),
        ("/openai/v1/chat/completions", "gpt-test"),
        ("/openai/deployments/my-dep/chat/completions?api-version=2024-10-21", "my-dep"),
    ],
)
async def test_routes(make_client: MakeClient, path: str, model: str) -> None:
    client = await make_client()
    status, body, _ = await post(client, chat("good"), path)
    assert status == 200
    assert body["model"] == model


async def test_azure_classic_requires_api_version(make_client: MakeClient) -> None:
    client = await make_client()
    status, body, _ = await post(client, chat("good"), "/openai/deployments/d/chat/completions")
    assert status == 400
    assert "api-version" in body["error"]["message"]


async def test_auth(make_client: MakeClient) -> None:
    client = await make_client(api_key="sekret")
    path = "/v1/chat/completions"
    for headers, expected in [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": "Bearer sekret"}, 200),
        ({"api-key": "sekret"}, 200),
    ]:
        response = await client.post(path, json=chat("good"), headers=headers)
        assert response.status == expected, headers
        if expected == 401:
            assert (await response.json())["error"]["code"] == "invalid_api_key"


async def test_capacity_rejects_with_retry_after(make_client: MakeClient) -> None:
    client = await make_client(capacity=2, latency_ms=200)
    results = await asyncio.gather(*(post(client, chat(f"row {i}")) for i in range(6)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200, 429, 429, 429, 429]
    for status, body, response in results:
        if status == 429:
            assert response.headers["Retry-After"] == "1"
            assert response.headers["retry-after-ms"] == "500"
            # OpenAI's overload shape: at capacity, not a spent quota (no limit kind, no count)
            assert body["error"]["type"] == "server_error"
            assert "currently overloaded" in body["error"]["message"]
    counters = await stats(client)
    assert counters["max_in_flight"] == 2
    assert counters["rejected_429"] == 4
    assert counters["by_status"] == {"200": 2, "429": 4}
    assert counters["in_flight"] == 0


async def test_queue_overload_waits_instead_of_rejecting(make_client: MakeClient) -> None:
    client = await make_client(capacity=1, overload="queue", latency_ms=50)
    started = time.monotonic()
    results = await asyncio.gather(*(post(client, chat(f"row {i}")) for i in range(4)))
    assert [status for status, _, _ in results] == [200] * 4
    assert time.monotonic() - started >= 0.2
    counters = await stats(client)
    assert counters["max_in_flight"] == 1
    assert counters["queued"] == 0


async def test_queued_request_that_gives_up_leaves_the_queue(make_client: MakeClient) -> None:
    client = await make_client(capacity=1, overload="queue", latency_ms=300)
    first = asyncio.create_task(post(client, chat("first")))
    await asyncio.sleep(0.05)
    with pytest.raises(asyncio.TimeoutError):
        await client.post(
            "/v1/chat/completions", json=chat("second"), timeout=ClientTimeout(total=0.1)
        )
    await asyncio.sleep(0.05)
    counters = await stats(client)
    assert (counters["queued"], counters["cancelled"], counters["in_flight"]) == (0, 1, 1)
    assert (await first)[0] == 200
    assert (await post(client, chat("third")))[0] == 200
    assert (await stats(client))["max_in_flight"] == 1


async def test_capacity_schedule_follows_the_clock(make_client: MakeClient) -> None:
    clock = FakeClock()
    client = await make_client(clock=clock, capacity_schedule="4:10,1:5,7:5")
    seen = []
    for step in (0, 9, 11, 16, 100):
        clock.now = 1000.0 + step
        seen.append((await stats(client))["capacity"])
    assert seen == [4, 4, 1, 7, 7]


async def test_latency_per_inflight_slows_concurrent_requests(make_client: MakeClient) -> None:
    client = await make_client(latency_per_inflight_ms=40)
    started = time.monotonic()
    await asyncio.gather(*(post(client, chat(f"row {i}")) for i in range(5)))
    # The last admitted request saw 5 in flight: 200 ms.
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize(("directive", "status", "times"), [("503x2", 503, 2), ("429x3", 429, 3)])
async def test_directive_fails_exactly_n_times(
    make_client: MakeClient, directive: str, status: int, times: int
) -> None:
    client = await make_client()
    body = chat(f"great stuff [[fake:{directive}]]")
    for _ in range(times):
        got, _, response = await post(client, body)
        assert got == status
        assert response.headers["Retry-After"] == "1"
    got, reply, _ = await post(client, body)
    assert got == 200
    assert reply["choices"][0]["message"]["content"] == "POSITIVE"
    # Another request with the same directive has its own count.
    got, _, _ = await post(client, chat(f"other [[fake:{directive}]]"))
    assert got == status


async def test_directive_without_count_always_fails(make_client: MakeClient) -> None:
    client = await make_client()
    for _ in range(3):
        status, body, _ = await post(client, chat("x [[fake:500]]"))
        assert status == 500
        assert body["error"]["type"] == "server_error"


@pytest.mark.parametrize(
    ("directive", "status", "code"),
    [
        ("400", 400, None),
        ("context_length", 400, "context_length_exceeded"),
        ("content_filter", 400, "content_filter"),
        ("401", 401, "invalid_api_key"),
        ("404", 404, "model_not_found"),
        ("502", 502, None),
        ("insufficient_quota", 429, "insufficient_quota"),
        ("model_not_found", 404, "model_not_found"),
        ("unsupported_parameter", 400, "unsupported_parameter"),
        ("request_too_large", 429, "rate_limit_exceeded"),
    ],
)
async def test_error_directive_shapes(
    make_client: MakeClient, directive: str, status: int, code: Any
) -> None:
    client = await make_client()
    got, body, _ = await post(client, chat(f"[[fake:{directive}]]"))
    assert got == status
    assert body["error"]["code"] == code
    if directive == "content_filter":
        assert body["error"]["innererror"]["code"] == "ResponsibleAIPolicyViolation"


async def test_malformed_and_error200(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post("/v1/chat/completions", json=chat("[[fake:malformed]]"))
    assert response.status == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(await response.read())
    status, body, _ = await post(client, chat("[[fake:error200]]"))
    assert status == 200
    assert "choices" not in body
    assert body["error"]["code"] == 502
    assert body["error"]["message"]


@pytest.mark.parametrize(
    ("directive", "content", "finish_reason"),
    [
        ("empty", "", "stop"),
        ("length", "POSI", "length"),
        ("finish_content_filter", None, "content_filter"),
    ],
)
async def test_body_directives(
    make_client: MakeClient, directive: str, content: str | None, finish_reason: str
) -> None:
    client = await make_client()
    status, body, _ = await post(client, chat(f"great [[fake:{directive}]]"))
    assert status == 200
    assert body["choices"][0]["message"]["content"] == content
    assert body["choices"][0]["finish_reason"] == finish_reason


async def test_retry_after_can_be_switched_off(make_client: MakeClient) -> None:
    client = await make_client(retry_after_s=None)
    _, _, response = await post(client, chat("[[fake:503]]"))
    assert "Retry-After" not in response.headers
    assert "retry-after-ms" not in response.headers


async def test_unknown_directive_is_rejected(make_client: MakeClient) -> None:
    client = await make_client()
    status, body, _ = await post(client, chat("[[fake:teapot]]"))
    assert status == 400
    assert "teapot" in body["error"]["message"]


async def test_hang_frees_its_slot_when_the_client_gives_up(make_client: MakeClient) -> None:
    client = await make_client(capacity=1)
    with pytest.raises(asyncio.TimeoutError):
        await client.post(
            "/v1/chat/completions", json=chat("[[fake:hang]]"), timeout=ClientTimeout(total=0.2)
        )
    for _ in range(100):
        counters = await stats(client)
        if counters["in_flight"] == 0:
            break
        await asyncio.sleep(0.01)
    assert counters["in_flight"] == 0
    assert counters["cancelled"] == 1
    status, _, _ = await post(client, chat("good"))
    assert status == 200


async def test_outage_then_recovery(make_client: MakeClient) -> None:
    clock = FakeClock()
    client = await make_client(clock=clock, retry_after_s=2)
    response = await client.post("/admin/config", json={"outage": {"status": 503, "seconds": 20}})
    assert (await response.json())["outage"] == {"status": 503, "remaining_s": 20.0}
    status, body, reply = await post(client, chat("good"))
    assert status == 503
    assert body["error"]["code"] is None
    assert reply.headers["Retry-After"] == "2"
    clock.now += 20
    status, _, _ = await post(client, chat("good"))
    assert status == 200
    config = await (await client.get("/admin/config")).json()
    assert config["outage"] is None


async def test_rpm_quota(make_client: MakeClient) -> None:
    clock = FakeClock()
    client = await make_client(clock=clock, rpm=2)
    azure = "/openai/v1/chat/completions"
    first = await post(client, chat("good"), azure)
    assert first[2].headers["x-ratelimit-remaining-requests"] == "1"
    clock.now += 10
    assert (await post(client, chat("good"), azure))[0] == 200
    status, body, response = await post(client, chat("good"), azure)
    assert status == 429
    assert body["error"]["code"] == "429"
    assert "Please retry after 50 seconds" in body["error"]["message"]
    assert response.headers["Retry-After"] == "50"
    assert response.headers["x-ms-retry-after-ms"] == "50000"
    clock.now += 50
    assert (await post(client, chat("good")))[0] == 200


async def test_tpm_quota_charges_prompt_plus_max_tokens(make_client: MakeClient) -> None:
    clock = FakeClock()
    client = await make_client(clock=clock, tpm=100)
    body = chat("hello", max_tokens=40)  # prompt ceil(5 / 4) + 4 = 6, charged 46
    assert (await post(client, body))[0] == 200
    assert (await post(client, body))[0] == 200
    status, reply, response = await post(client, body)
    assert status == 429
    assert "on tokens per min (TPM): Limit 100, Used 92, Requested 46." in reply["error"]["message"]
    assert reply["error"]["type"] == "tokens"
    assert response.headers["Retry-After"] == "60"
    clock.now += 60
    assert (await post(client, body))[0] == 200


async def test_random_failures_are_seeded(make_client: MakeClient) -> None:
    async def run() -> list[int]:
        client = await make_client(seed=7, rate_429=0.3, rate_500=0.2, rate_503=0.2)
        return [(await post(client, chat(f"row {i}")))[0] for i in range(40)]

    first = await run()
    assert first == await run()
    assert {200, 429, 500, 503} <= set(first)


async def test_admin_config_and_reset(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post("/admin/config", json={"capacity": 5, "rate_500": 1.0})
    config = await response.json()
    assert (config["capacity"], config["rate_500"]) == (5, 1.0)
    assert (await post(client, chat("good")))[0] == 500
    for bad in ({"nope": 1}, {"port": 1}, {"rate_500": 2}):
        assert (await client.post("/admin/config", json=bad)).status == 400
    await client.post("/admin/reset")
    counters = await stats(client)
    assert (counters["requests"], counters["by_status"]) == (0, {})


def test_subprocess_helper() -> None:
    with fake_llm_process("--capacity", "3", "--answer", "echo") as llm:
        assert llm.configure(latency_ms=5)["latency_ms"] == 5
        response = httpx.post(llm.url("/v1/chat/completions"), json=chat("hi"))
        assert response.json()["choices"][0]["message"]["content"] == "hi"
        counters = llm.stats()
        assert (counters["requests"], counters["capacity"]) == (1, 3)
        llm.reset()
        assert llm.stats()["requests"] == 0
    assert llm.process.returncode == 0


async def test_openai_quota_headers_and_429(make_client: MakeClient) -> None:
    clock = FakeClock()
    client = await make_client(clock=clock, rpm=2)
    _, _, first = await post(client, chat("good"))
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.now += 10
    await post(client, chat("good"))
    status, body, response = await post(client, chat("good"))
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "requests"
    assert "Limit 2, Used 2, Requested 1. Please try again in 50s." in body["error"]["message"]
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "x-ms-retry-after-ms" not in response.headers


@pytest.mark.parametrize(
    ("path", "dialect", "status", "code"),
    [
        ("/v1/chat/completions", "auto", 404, "model_not_found"),
        ("/openai/v1/chat/completions", "auto", 404, "DeploymentNotFound"),
        ("/api/v1/chat/completions", "auto", 400, 400),
        ("/v1/chat/completions", "litellm", 400, "400"),
    ],
)
async def test_unknown_models_get_each_dialects_not_found(
    make_client: MakeClient, path: str, dialect: str, status: int, code: Any
) -> None:
    client = await make_client(models=["gpt-4o-mini"], dialect=dialect)
    assert (await post(client, chat("good", model="gpt-4o-mini"), path))[0] == 200
    got, body, _ = await post(client, chat("good", model="gpt-4o-mni"), path)
    assert (got, body["error"]["code"]) == (status, code)
    await client.post("/admin/config", json={"models": None})
    assert (await post(client, chat("good", model="gpt-4o-mni"), path))[0] == 200


@pytest.mark.parametrize(
    ("path", "dialect", "status", "code"),
    [
        ("/v1/chat/completions", "auto", 429, "insufficient_quota"),
        ("/api/v1/chat/completions", "auto", 402, 402),
    ],
)
async def test_quota_exhausted(
    make_client: MakeClient, path: str, dialect: str, status: int, code: Any
) -> None:
    client = await make_client(quota_exhausted=True, dialect=dialect)
    got, body, response = await post(client, chat("good"), path)
    assert (got, body["error"]["code"]) == (status, code)
    assert "Retry-After" not in response.headers


@pytest.mark.parametrize(
    ("dialect", "code"), [("openai", None), ("openrouter", 503), ("litellm", "503")]
)
async def test_server_error_codes_per_dialect(
    make_client: MakeClient, dialect: str, code: Any
) -> None:
    client = await make_client(dialect=dialect)
    _, body, _ = await post(client, chat("[[fake:503]]"))
    assert body["error"]["code"] == code


async def test_litellm_throttling_error(make_client: MakeClient) -> None:
    client = await make_client(dialect="litellm")
    status, body, _ = await post(client, chat("[[fake:429]]"))
    assert status == 429
    assert (body["error"]["type"], body["error"]["code"]) == ("throttling_error", "429")


async def test_every_answer_has_a_request_id(make_client: MakeClient) -> None:
    client = await make_client()
    ids = set()
    for text in ("good", "[[fake:500]]", "[[fake:context_length]]"):
        _, _, response = await post(client, chat(text))
        ids.add(response.headers["x-request-id"])
    assert len(ids) == 3


@pytest.mark.parametrize(
    ("requested", "answered"),
    [
        ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
        ("openai/gpt-4o", "openai/gpt-4o-2024-08-06"),
        ("my-model", "my-model"),
    ],
)
async def test_answered_model_is_a_dated_snapshot(
    make_client: MakeClient, requested: str, answered: str
) -> None:
    client = await make_client()
    _, body, _ = await post(client, chat("good", model=requested))
    assert body["model"] == answered


async def test_reasoning_models_reject_max_tokens_and_temperature(make_client: MakeClient) -> None:
    client = await make_client()
    status, body, _ = await post(client, chat("good", model="o3-mini", max_tokens=50))
    assert (status, body["error"]["code"]) == (400, "unsupported_parameter")
    status, body, _ = await post(
        client, chat("good", model="o3-mini", max_completion_tokens=50, temperature=0.0)
    )
    assert (status, body["error"]["code"]) == (400, "unsupported_value")
    status, body, _ = await post(client, chat("good", model="o3-mini", max_completion_tokens=50))
    assert status == 200
    assert body["model"] == "o3-mini-2025-01-31"
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 50
    assert (await stats(client))["last_request"]["max_completion_tokens"] == 50


async def test_empty_length_directive(make_client: MakeClient) -> None:
    client = await make_client()
    status, body, _ = await post(client, chat("[[fake:empty_length]]", max_tokens=30))
    assert status == 200
    choice = body["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("", "length")
    assert body["usage"]["completion_tokens"] == 30
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 30}


async def test_streaming_answer(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post(
        "/v1/chat/completions",
        json=chat("great product", stream=True, stream_options={"include_usage": True}),
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = [line for line in (await response.text()).split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    chunks = [orjson.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "POSITIVE"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] > 0
