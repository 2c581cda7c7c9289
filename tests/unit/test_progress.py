"""`run --progress`: the live line and the summary read the app's registry by metric name."""

from __future__ import annotations

import io

import pytest
from prometheus_client import CollectorRegistry, Counter

from consumer.observability.metrics import Metrics
from consumer.progress import ProgressLine, live_line, read, summary


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _work(metrics: Metrics) -> None:
    metrics.consumed(31)
    metrics.rows_produced.inc(30)
    metrics.row_errors.labels("rate_limited").inc(2)
    metrics.row_errors.labels("template_error").inc(1)
    metrics.dead_letter("invalid_json")
    metrics.tokens_used("m1", 100, 20)
    metrics.limiter_limit.set(8)
    metrics.lag.labels("in", "0").set(5)
    metrics.lag.labels("in", "1").set(2)


def test_the_live_line_shows_the_rate_since_the_last_one_and_the_totals() -> None:
    clock = _Clock()
    metrics = Metrics()
    before = read(metrics.registry, clock)
    _work(metrics)
    clock.now += 10
    line = live_line(before, read(metrics.registry, clock))
    assert " ".join(line.split()) == "3.0 rows/s 30 done lag 7 limit 8 errors 3 dlq 1 tokens 120"


def test_the_summary_counts_since_start_with_reasons_and_no_cost_when_unpriced() -> None:
    clock = _Clock()
    metrics = Metrics()
    metrics.rows_produced.inc(5)  # before this run's start: not in its summary
    start = read(metrics.registry, clock)
    _work(metrics)
    clock.now += 12.5
    assert summary(start, read(metrics.registry, clock)) == (
        "run summary: 12.5 s, 31 rows consumed, 30 outputs (2.4 rows/s), 3 row errors "
        "(rate_limited 2, template_error 1), 1 dead letters (invalid_json 1), 120 tokens"
    )


def test_cost_is_shown_when_the_registry_has_it() -> None:
    registry = CollectorRegistry()
    cost = Counter("llm_consumer_llm_cost_usd", "spent", ["model"], registry=registry)
    clock = _Clock()
    start = read(registry, clock)
    cost.labels("m1").inc(0.25)
    cost.labels("m2").inc(0.5)
    clock.now += 1
    end = read(registry, clock)
    assert summary(start, end).endswith(", 0 tokens, $0.7500")
    assert live_line(start, end).endswith("tokens 0, $0.7500")


async def test_the_line_is_redrawn_on_a_terminal_and_cleared_before_the_summary() -> None:
    clock = _Clock()
    metrics = Metrics()
    out = io.StringIO()
    line = ProgressLine(metrics.registry, out, terminal=True, clock=clock)
    turns = 0

    async def sleep(seconds: float) -> None:
        nonlocal turns
        assert seconds == 1.0
        turns += 1
        clock.now += seconds
        metrics.rows_produced.inc(4)
        if turns == 3:
            raise StopAsyncIteration

    with pytest.raises(StopAsyncIteration):
        await line.run(sleep)
    line.finish()
    text = out.getvalue()
    assert text.count("\r") == 2 + 2  # two lines drawn, then cleared (\r blank \r)
    assert "4.0 rows/s" in text
    assert text.endswith("\n") and text.splitlines()[-1].lstrip("\r ").startswith(
        "run summary: 3.0 s, 0 rows consumed, 12 outputs (4.0 rows/s)"
    )


async def test_in_a_file_a_line_is_added_every_ten_seconds() -> None:
    clock = _Clock()
    metrics = Metrics()
    out = io.StringIO()
    line = ProgressLine(metrics.registry, out, terminal=False, clock=clock)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock.now += seconds
        if len(waits) == 3:
            raise StopAsyncIteration

    with pytest.raises(StopAsyncIteration):
        await line.run(sleep)
    line.finish()
    lines = out.getvalue().splitlines()
    assert waits == [10.0] * 3
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[-1].startswith("run summary: 30.0 s")
