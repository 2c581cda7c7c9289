"""Metrics facade, health and readiness, the HTTP endpoints, and secrets kept out of logs."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
from typing import Any

import aiohttp
import pytest

from consumer.config import Settings, parse_settings
from consumer.enrich.outcome import RowOutcome
from consumer.llm.caller import LLMCaller
from consumer.llm.client import Completion, Usage
from consumer.llm.errors import FailureKind, LLMFailure, RowError
from consumer.llm.limiter import AIMDLimiter
from consumer.observability import BrokerHealth, Metrics, Observability
from consumer.observability.logs import JsonFormatter, TextFormatter
from consumer.observability.metrics import attempt_status, parse_exposition
from consumer.records import DeadLetter, Item, SourceRecord
from consumer.window import CloseReason, Window

API_KEY = "sk-test-SECRET-api-key-0123456789"
SASL_PASSWORD = "sasl-SECRET-password-9876"


def make_settings(**observability: Any) -> Settings:
    return parse_settings(
        {
            "kafka": {
                "bootstrap_servers": "127.0.0.1:9092",
                "input_topic": "in",
                "output_topic": "out",
                "group_id": "g",
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "user",
                "sasl_password": "${SASL_PASSWORD}",
            },
            "llm": {
                "provider": "openai",
                "model": "m1",
                "api_key": "${API_KEY}",
                "template": "{{ row.text }}",
            },
            "observability": observability,
        },
        environ={"API_KEY": API_KEY, "SASL_PASSWORD": SASL_PASSWORD},
    )


def record(offset: int, partition: int = 0) -> SourceRecord:
    return SourceRecord("in", partition, offset, b"k", b"{}", 0)


def completion(prompt: int, answer: int, model: str = "m1") -> RowOutcome:
    done = Completion("POSITIVE", model, Usage(prompt, answer, prompt + answer), "stop")
    return RowOutcome(done, None, None, "h")


def failed(reason: str) -> RowOutcome:
    return RowOutcome(None, RowError(reason, "x", None, 1, False), FailureKind.ROW, "h")


def scrape(metrics: Metrics) -> dict[str, float]:
    return parse_exposition(metrics.exposition().decode())


def test_a_window_with_two_rows_an_error_and_a_dead_letter_is_counted_by_reason() -> None:
    metrics = Metrics(make_settings())
    items = [
        Item(record(0), row={"text": "a"}),
        Item(record(1), dead_letter=DeadLetter("invalid_json", "bad")),
        Item(record(2), row={"text": "b"}),
        Item(record(3), row={}),
    ]
    window = Window("w-1", items, 0.0, close_reason=CloseReason.COUNT)
    outcomes = [completion(10, 2), completion(5, 1), failed("template_error")]
    metrics.window_done(window, outcomes, 1.5)
    values = scrape(metrics)
    assert values["llm_consumer_rows_produced_total"] == 3
    assert values['llm_consumer_dead_letters_total{reason="invalid_json"}'] == 1
    assert values['llm_consumer_row_errors_total{reason="template_error"}'] == 1
    assert values['llm_consumer_windows_total{close_reason="count"}'] == 1
    assert values["llm_consumer_window_rows_sum"] == 4
    assert values["llm_consumer_window_seconds_sum"] == 1.5
    assert values['llm_consumer_llm_tokens_total{kind="prompt",model="m1"}'] == 15
    assert values['llm_consumer_llm_tokens_total{kind="completion",model="m1"}'] == 3


def test_retries_are_counted_as_they_are_attempted_not_per_window() -> None:
    metrics = Metrics(make_settings())
    values = scrape(metrics)
    assert values['llm_consumer_llm_retries_total{provider="openai"}'] == 0  # before any event
    assert values['llm_consumer_llm_rate_limited_total{provider="openai"}'] == 0
    assert values['llm_consumer_windows_total{close_reason="revoke"}'] == 0
    hook = metrics.attempt_hook()
    hook("503", 0.1, 1)
    hook("503", 0.1, 2)
    assert scrape(metrics)['llm_consumer_llm_retries_total{provider="openai"}'] == 1
    hook("200", 0.1, 3)
    values = scrape(metrics)
    assert values['llm_consumer_llm_retries_total{provider="openai"}'] == 2
    assert values['llm_consumer_llm_request_seconds_count{provider="openai",status="503"}'] == 2


def test_every_app_has_its_own_registry() -> None:
    first, second = Metrics(make_settings()), Metrics(make_settings())
    first.consumed(5)
    assert scrape(first)["llm_consumer_rows_consumed_total"] == 5
    assert scrape(second)["llm_consumer_rows_consumed_total"] == 0


def test_limiter_gauges_are_read_at_scrape_time() -> None:
    metrics = Metrics(make_settings())
    limiter = AIMDLimiter(initial=8, minimum=1, maximum=16)
    metrics.watch_limiter(limiter)
    assert scrape(metrics)["llm_consumer_limiter_limit"] == 8
    ticket = limiter.try_acquire()
    assert ticket is not None
    assert scrape(metrics)["llm_consumer_limiter_in_flight"] == 1
    limiter.on_congestion(ticket)
    values = scrape(metrics)
    assert limiter.limit < 8
    assert values["llm_consumer_limiter_limit"] == pytest.approx(limiter.limit)
    assert values["llm_consumer_limiter_in_flight"] == 0
    assert values["llm_consumer_limiter_decreases"] == 1


class _FakeClient:
    def __init__(self, failures: list[LLMFailure]) -> None:
        self.failures = failures

    async def complete(self, messages: list[dict[str, str]]) -> Completion:
        if self.failures:
            raise self.failures.pop(0)
        return Completion("ok", "m1", Usage(1, 1, 2), "stop")


async def test_each_llm_attempt_is_recorded_by_status() -> None:
    settings = make_settings()
    metrics = Metrics(settings)
    client = _FakeClient(
        [
            LLMFailure(FailureKind.BACKPRESSURE, "rate_limited", "slow down", 429),
            LLMFailure(FailureKind.BACKPRESSURE, "timeout", "timed out"),
        ]
    )

    async def no_sleep(_: float) -> None:
        return None

    caller = LLMCaller(
        client,  # type: ignore[arg-type]
        AIMDLimiter.from_settings(settings.llm.concurrency),
        settings.llm.retry,
        sleep=no_sleep,
        on_attempt=metrics.attempt_hook(),
    )
    result = await caller.call([])
    assert result.completion is not None and result.attempts == 3
    values = scrape(metrics)
    count = "llm_consumer_llm_request_seconds_count"
    assert values[f'{count}{{provider="openai",status="429"}}'] == 1
    assert values[f'{count}{{provider="openai",status="timeout"}}'] == 1
    assert values[f'{count}{{provider="openai",status="200"}}'] == 1
    assert values['llm_consumer_llm_rate_limited_total{provider="openai"}'] == 1
    assert values['llm_consumer_llm_retries_total{provider="openai"}'] == 2


def test_attempt_status_prefers_the_http_code() -> None:
    assert attempt_status(503, "overloaded") == "503"
    assert attempt_status(None, "connection_error") == "connection_error"
    assert attempt_status(None, None) == "error"


def test_lag_series_follow_the_assignment() -> None:
    metrics = Metrics(make_settings())
    metrics.set_lag([("in", 0, 5), ("in", 1, 0)])
    metrics.set_lag([("in", 1, 7)])
    values = scrape(metrics)
    assert 'llm_consumer_consumer_lag{partition="0",topic="in"}' not in values
    assert values['llm_consumer_consumer_lag{partition="1",topic="in"}'] == 7
    assert values["llm_consumer_assigned_partitions"] == 1


def test_commits_set_the_last_commit_time() -> None:
    metrics = Metrics(make_settings())
    assert scrape(metrics)["llm_consumer_last_commit_timestamp_seconds"] == 0
    metrics.committed(0.02)
    values = scrape(metrics)
    assert values["llm_consumer_last_commit_timestamp_seconds"] > 0
    assert values["llm_consumer_seconds_since_last_commit"] < 5
    assert values["llm_consumer_commit_seconds_count"] == 1


# A request that hangs (another server took the port) fails the test fast instead of at 300 s.
_CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)


class _FakeConsumer:
    def __init__(self) -> None:
        self.assigned: set[Any] = set()
        self.high: dict[Any, int] = {}
        self.committed_offsets: dict[Any, int | None] = {}
        self.broken: Exception | None = None  # what every broker call raises
        self.hanging: set[Any] = set()  # partitions whose committed() never answers
        self.cancelled: list[Any] = []

    def assignment(self) -> set[Any]:
        return self.assigned

    def highwater(self, tp: Any) -> int | None:
        return self.high.get(tp)

    async def committed(self, tp: Any) -> int | None:
        if tp in self.hanging:
            try:
                await asyncio.Event().wait()
            finally:
                self.cancelled.append(tp)
        if self.broken is not None:
            raise self.broken
        return self.committed_offsets.get(tp)

    async def topics(self) -> set[str]:
        if self.broken is not None:
            raise self.broken
        return {"in"}


class _FakeApp:
    def __init__(self) -> None:
        self.held_back_reason: str | None = None
        self.limiter = AIMDLimiter(initial=4, minimum=1, maximum=8)

    @property
    def held_back(self) -> bool:
        return self.held_back_reason is not None


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_healthz_fails_when_the_poll_loop_stops_making_progress() -> None:
    clock = _Clock()
    settings = make_settings(stale_after_s=30)
    obs = Observability(settings, Metrics(settings), _FakeApp(), _FakeConsumer(), clock=clock)
    obs.beat()
    clock.now += 29
    assert obs.health()[0]
    clock.now += 2
    ok, body = obs.health()
    assert not ok and body["status"] == "stuck"
    obs.beat()
    assert obs.health()[0]


def test_readyz_needs_partitions_and_no_outage() -> None:
    from aiokafka import TopicPartition

    settings = make_settings()
    app, consumer = _FakeApp(), _FakeConsumer()
    metrics = Metrics(settings)
    obs = Observability(settings, metrics, app, consumer)
    ok, body = obs.readiness()
    assert not ok and body["problems"] == ["no partitions assigned"]
    consumer.assigned = {TopicPartition("in", 0)}
    assert obs.readiness()[0]
    assert scrape(metrics)["llm_consumer_ready"] == 1
    app.held_back_reason = "systemic failure: auth_error"
    ok, body = obs.readiness()
    assert not ok and body["problems"] == ["held back: systemic failure: auth_error"]
    assert body["held_back"] is True
    values = scrape(metrics)
    assert values["llm_consumer_ready"] == 0
    assert values["llm_consumer_held_back"] == 1


async def test_lag_is_high_watermark_minus_committed() -> None:
    from aiokafka import TopicPartition

    settings = make_settings()
    consumer = _FakeConsumer()
    p0, p1, p2 = (TopicPartition("in", p) for p in range(3))
    consumer.assigned = {p0, p1, p2}
    consumer.high = {p0: 100, p1: 10}
    consumer.committed_offsets = {p0: 40, p1: None}
    obs = Observability(settings, Metrics(settings), _FakeApp(), consumer)
    assert await obs.measure_lag() == [("in", 0, 60), ("in", 1, 10)]


async def test_a_failed_lag_probe_cancels_the_questions_still_waiting() -> None:
    settings = make_settings()
    consumer = _FakeConsumer()
    p0, p1 = _assigned(consumer, 0, 1)
    consumer.high = {p0: 5, p1: 5}
    consumer.hanging = {p0}
    consumer.broken = ConnectionError("coordinator gone")
    obs = Observability(settings, Metrics(settings), _FakeApp(), consumer)
    with pytest.raises(ConnectionError):
        await obs.measure_lag()
    await asyncio.sleep(0)
    assert consumer.cancelled == [p0]


def _assigned(consumer: _FakeConsumer, *partitions: int) -> list[Any]:
    from aiokafka import TopicPartition

    tps = [TopicPartition("in", p) for p in partitions]
    consumer.assigned = set(tps)
    return tps


def test_readyz_reports_a_failing_provider_within_its_threshold() -> None:
    clock = _Clock()
    settings = make_settings()
    consumer = _FakeConsumer()
    _assigned(consumer, 0)
    metrics = Metrics(settings)
    obs = Observability(settings, metrics, _FakeApp(), consumer, clock=clock)
    obs.provider.record_failure("server_error")
    clock.now += 1.0
    assert obs.readiness()[0]
    clock.now += 1.5
    ok, body = obs.readiness()
    assert not ok
    assert body["problems"] == ["LLM provider failing for 2.5 s: server_error"]
    assert body["provider"] == {"failing": True, "reason": body["problems"][0]}
    values = scrape(metrics)
    assert values["llm_consumer_provider_failing"] == 1
    assert values["llm_consumer_ready"] == 0
    obs.provider.record_success()
    ok, body = obs.readiness()
    assert ok and body["provider"] == {"failing": False, "reason": None}
    assert scrape(metrics)["llm_consumer_provider_failing"] == 0


async def test_readyz_reports_an_unreachable_broker_from_the_probe_and_the_lag_probe() -> None:
    clock = _Clock()
    settings = make_settings()
    consumer = _FakeConsumer()
    tp = _assigned(consumer, 0)[0]
    consumer.high, consumer.committed_offsets = {tp: 10}, {tp: 10}
    metrics = Metrics(settings)
    obs = Observability(settings, metrics, _FakeApp(), consumer, clock=clock)
    consumer.broken = TimeoutError()
    await obs.probe_lag()  # a lag probe that times out is a broker error
    clock.now += 3.0
    ok, body = obs.readiness()
    assert not ok and body["problems"] == ["broker unreachable for 3.0 s: lag probe: TimeoutError"]
    assert body["broker"]["unreachable"] is True
    assert scrape(metrics)["llm_consumer_broker_unreachable"] == 1
    consumer.broken = None
    assert await obs.broker.probe(consumer.topics, timeout_s=1.0)
    ok, body = obs.readiness()
    assert ok and body["broker"] == {"unreachable": False, "reason": None}
    assert scrape(metrics)["llm_consumer_broker_unreachable"] == 0


async def test_a_stuck_partition_is_reported_within_stuck_after_plus_one_lag_interval() -> None:
    clock = _Clock()
    settings = make_settings(stuck_partition_after_s=120, lag_interval_s=10)
    consumer = _FakeConsumer()
    p0, p1 = _assigned(consumer, 0, 1)
    consumer.high = {p0: 50, p1: 50}
    consumer.committed_offsets = {p0: 40, p1: 40}
    metrics = Metrics(settings)
    obs = Observability(settings, metrics, _FakeApp(), consumer, clock=clock)
    obs.progress.advanced(p0)
    obs.progress.advanced(p1)
    clock.now += 9.0  # the lag probe runs 9 s after the partitions' last commit
    await obs.probe_lag()
    clock.now += 111.0  # 120 s after the last commit, before the next probe (at 19 s)
    obs.progress.advanced(p1)
    obs.beat()
    ok, body = obs.readiness()
    assert not ok
    assert body["stuck_partitions"] == ["in/0"]
    assert body["problems"] == ["partitions stuck: in/0 (no progress for 120 s with lag)"]
    assert scrape(metrics)["llm_consumer_stuck_partitions"] == 1
    consumer.assigned = {p1}  # p0 revoked: not this member's problem any more
    obs.progress.reset()
    assert obs.readiness()[0]
    assert scrape(metrics)["llm_consumer_stuck_partitions"] == 0


async def test_a_partition_first_seen_with_lag_waits_from_that_probe() -> None:
    clock = _Clock()
    settings = make_settings(stuck_partition_after_s=120, lag_interval_s=10)
    consumer = _FakeConsumer()
    tp = _assigned(consumer, 3)[0]
    consumer.high, consumer.committed_offsets = {tp: 7}, {tp: None}
    obs = Observability(settings, Metrics(settings), _FakeApp(), consumer, clock=clock)
    await obs.probe_lag()
    clock.now += 119.0
    obs.beat()
    assert obs.readiness()[0]
    clock.now += 1.0
    assert obs.readiness()[1]["stuck_partitions"] == ["in/3"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_the_server_answers_metrics_healthz_and_readyz() -> None:
    port = _free_port()
    settings = make_settings(host="127.0.0.1", port=port)
    metrics = Metrics(settings)
    obs = Observability(settings, metrics, _FakeApp(), _FakeConsumer())
    await obs.start()
    try:
        assert obs.port == port
        assert obs.port == port, "another process took the port between picking and binding"
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{port}", timeout=_CLIENT_TIMEOUT
        ) as http:
            async with http.get("/metrics") as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain")
                text = await response.text()
                assert "llm_consumer_rows_consumed_total 0.0" in text
                assert 'llm_consumer_info{group="g"' in text
            async with http.get("/healthz") as response:
                assert response.status == 200
            async with http.get("/readyz") as response:
                assert response.status == 503
                assert (await response.json())["problems"] == ["no partitions assigned"]
    finally:
        await obs.stop()


async def test_the_broker_probe_turns_readyz_not_ready_while_the_broker_is_down() -> None:
    port = _free_port()
    settings = make_settings(host="127.0.0.1", port=port, broker_probe_interval_s=0.02)
    consumer = _FakeConsumer()
    _assigned(consumer, 0)
    broker = BrokerHealth(unreachable_after_s=0.1)
    obs = Observability(settings, Metrics(settings), _FakeApp(), consumer, broker=broker)
    await obs.start()
    try:
        assert obs.port == port, "another process took the port between picking and binding"
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{port}", timeout=_CLIENT_TIMEOUT
        ) as http:

            async def readyz_status() -> tuple[int, Any]:
                async with http.get("/readyz") as response:
                    return response.status, await response.json()

            async def readyz_until(status: int) -> Any:
                # Bounded polling, not a fixed sleep: the probe's timing is the machine's.
                for _ in range(200):
                    seen, body = await readyz_status()
                    if seen == status:
                        return body
                    await asyncio.sleep(0.05)
                raise AssertionError(f"/readyz never answered {status}: {body}")

            consumer.broken = ConnectionRefusedError("Connect call failed")
            body = await readyz_until(503)
            assert body["broker"]["unreachable"] is True
            assert body["problems"][0].startswith("broker unreachable for ")
            assert body["problems"][0].endswith(": metadata probe: Connect call failed")
            async with http.get("/metrics") as response:
                assert "llm_consumer_broker_unreachable 1.0" in await response.text()
            consumer.broken = None
            await readyz_until(200)
    finally:
        await obs.stop()


async def test_port_zero_turns_the_server_off() -> None:
    settings = make_settings(port=0)
    obs = Observability(settings, Metrics(settings), _FakeApp(), _FakeConsumer())
    await obs.start()
    assert obs.port is None
    await obs.stop()


async def test_a_busy_port_does_not_stop_the_consumer(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = make_settings(host="127.0.0.1", port=busy.getsockname()[1])
        obs = Observability(settings, Metrics(settings), _FakeApp(), _FakeConsumer())
        with caplog.at_level(logging.ERROR):
            await obs.start()
        await obs.stop()
    assert obs.port is None
    assert "could not listen" in caplog.text


def test_secrets_never_reach_a_log_line() -> None:
    """Settings, even dumped or passed whole into a log line, show only masked secrets."""
    settings = make_settings()
    assert settings.llm.api_key is not None
    assert settings.llm.api_key.get_secret_value() == API_KEY  # the key itself is there
    stream = io.StringIO()
    logger = logging.getLogger("test.secrets")
    logger.propagate = False
    for formatter in (JsonFormatter(), TextFormatter("%(message)s")):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        logger.handlers[:] = [handler]
        logger.warning("settings %s %r", settings, settings)
        logger.warning(
            "dumped",
            extra={"settings": settings.model_dump(), "llm": settings.llm, "kafka": settings.kafka},
        )
    text = stream.getvalue()
    assert "**********" in text
    assert API_KEY not in text
    assert SASL_PASSWORD not in text
