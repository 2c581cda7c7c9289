"""Budgets that hold: a spent budget holds windows back (no error rows), resumes next period,
survives a SIGKILL and is shared by replicas."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from tests.support.fake_llm_process import fake_llm_process
from tests.support.kafka_broker import free_port
from tests.support.ledger import account
from tests.support.pipeline import (
    ConsumerProcess,
    Topics,
    create_topics,
    publish,
    read_topic,
    readiness,
    rows_to_messages,
    settings_file,
    spend_per_period,
    wait_for_commits,
)

# 100 USD per million tokens either way: a row of ~13 prompt and 2 answer tokens costs about
# 0.0015 USD, and is admitted at 0.0017 (max_tokens 4).
PRICES = {"fake-model": {"input_per_million": 100.0, "output_per_million": 100.0}}
WINDOW = 20


async def until(check: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"not within {timeout_s:g} s: {what}")


async def held_for_budget(port: int) -> bool:
    status, body = await readiness(port)
    return status == 503 and "budget_exhausted" in orjson.dumps(body).decode()


def budget_settings(
    tmp_path: Path, bootstrap: str, base_url: str, topics: Topics, port: int, **budget: Any
) -> Path:
    return settings_file(
        tmp_path,
        bootstrap,
        base_url,
        topics,
        kafka={"session_timeout_ms": 6_000, "heartbeat_interval_ms": 1_000},
        window={"max_messages": WINDOW, "max_wait_ms": 300},
        llm={"max_tokens": 4, "pricing": {"models": PRICES}, "budget": budget},
        observability={"host": "127.0.0.1", "port": port},
        state={"directory": str(tmp_path / f"state-{port}")},
    )


async def test_a_spent_budget_holds_the_window_and_the_next_period_finishes_every_row(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """200 rows at ~0.0015 USD, 0.05 USD per 4 s 'hour': spending stops at the budget in
    every period, nothing becomes an error row, /readyz says why, and all rows come out."""
    topics = Topics.unique("budget-period")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=2)
    rows = [{"id": i, "text": f"review {i}: it works fine"} for i in range(200)]
    positions = await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    port = free_port()
    budget_usd, period_s = 0.05, 4.0
    with fake_llm_process() as llm:
        settings = budget_settings(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            port,
            usd_per_hour=budget_usd,
            hour_s=period_s,
        )
        proc = ConsumerProcess(settings, tmp_path / "consumer.log").start()
        try:
            started = time.monotonic()
            await until(lambda: held_for_budget(port), "/readyz says budget_exhausted")
            outputs = await read_topic(kafka_bootstrap, topics.output, expect=200, timeout_s=150)
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input, timeout_s=60)
            elapsed = time.monotonic() - started
            assert proc.stop() == 0
        finally:
            proc.kill()
        requests = llm.stats()["requests"]
    entry = account("B1. budget per short period", positions, outputs)
    assert entry.missing == 0, entry.missing_examples
    bodies = [orjson.loads(m.value or b"") for m in outputs]
    assert all(b["llm_response_error"] is None for b in bodies), "no error rows for a budget"
    assert requests == 200, "a refused request is never sent"
    cost = max(b["llm_response_cost_usd"] for b in bodies)
    periods = await spend_per_period(kafka_bootstrap, topics.group)
    overshoot = max(spent - budget_usd for spent in periods.values())
    spend = sorted(round(v, 4) for v in periods.values())
    print(
        f"\n{len(periods)} periods, spend per period {spend} USD, budget {budget_usd}, "
        f"overshoot {overshoot:+.4f} USD ({requests} requests, {elapsed:.1f} s)"
    )
    assert len(periods) >= 3
    assert overshoot <= WINDOW * cost, "spending stops within one window of the budget"
    paid = sum(b["llm_response_cost_usd"] for b in bodies)
    assert math.isclose(sum(periods.values()), paid, rel_tol=1e-6), "the ledger is the rows' cost"
    warned = [m for m in proc.log_lines() if m.get("msg", "").startswith("budget exhausted")]
    assert 1 <= len(warned) <= 1 + elapsed / 60, "logged at most once a minute"


async def test_the_spend_survives_a_sigkill_and_two_replicas_share_one_budget(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A replica spends the budget and is SIGKILLed; two new replicas (fresh local stores)
    read its spend from the topic and send (almost) nothing more."""
    period_s = 3600.0
    if period_s - time.time() % period_s < 90:  # never straddle a period boundary
        await asyncio.sleep(period_s - time.time() % period_s + 1)
    topics = Topics.unique("budget-replicas")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=3)
    rows = [{"id": i, "text": f"review {i}: it works fine"} for i in range(300)]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    budget_usd = 0.05
    with fake_llm_process() as llm:
        first_port = free_port()
        first = ConsumerProcess(
            budget_settings(
                tmp_path, kafka_bootstrap, llm.base_url, topics, first_port, usd_per_hour=budget_usd
            ),
            tmp_path / "first.log",
        ).start()
        try:
            await until(lambda: held_for_budget(first_port), "the first replica is held back")
            await asyncio.sleep(1.0)  # its last spend reaches the topic
            before_kill = llm.stats()["requests"]
        finally:
            first.kill()
        ports = [free_port(), free_port()]
        replicas = [
            ConsumerProcess(
                budget_settings(
                    tmp_path, kafka_bootstrap, llm.base_url, topics, port, usd_per_hour=budget_usd
                ),
                tmp_path / f"replica-{port}.log",
            ).start()
            for port in ports
        ]
        try:
            for port in ports:
                await until(lambda p=port: held_for_budget(p), f"replica on {port} held back", 90)
            await asyncio.sleep(3.0)
            after = llm.stats()["requests"]
            for replica in replicas:
                replica.stop()
        finally:
            for replica in replicas:
                replica.kill()
    periods = await spend_per_period(kafka_bootstrap, topics.group)
    assert len(periods) == 1
    spent = next(iter(periods.values()))
    cost = 15 * 100.0 / 1e6
    print(
        f"\nbudget {budget_usd} USD: {before_kill} requests before the SIGKILL, "
        f"{after - before_kill} after it by two new replicas; spent {spent:.4f} USD "
        f"(overshoot {spent - budget_usd:+.4f})"
    )
    assert spent <= budget_usd + WINDOW * cost
    # What is left is less than one admission, give or take the first replica's last write
    # (coalesced for 0.2 s) if the SIGKILL came before it: each new replica may use that.
    assert after - before_kill <= 4, "a restarted or added replica gets no fresh budget"
