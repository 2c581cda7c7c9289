"""The operator's view on the real broker: /metrics counts what happened, /readyz sees outages."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.support.fake_llm_process import fake_llm_process
from tests.support.pipeline import (
    Topics,
    create_topics,
    publish,
    read_topic,
    rows_to_messages,
    running_consumer,
    scrape,
    settings_file,
    wait_for_commits,
)

SECRET_KEY = "sk-integration-SECRET-4f1c9e"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def observability(port: int) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "lag_interval_s": 0.5}


async def status_of(port: int, path: str) -> int:
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            return (await http.get(f"http://127.0.0.1:{port}{path}")).status_code
    except httpx.TransportError:
        return 0


async def eventually(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Call the async `check` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


async def test_metrics_count_what_was_consumed_produced_and_dead_lettered(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics.unique("metrics")
    await create_topics(kafka_bootstrap, [topics.input], partitions=2)
    rows: list[dict[str, Any]] = [{"id": f"r{i}", "text": "I love it"} for i in range(197)]
    rows.append({"id": "no-text"})  # the template needs row.text: one template_error
    messages = [*rows_to_messages(rows), (b"bad1", b"{not json"), (b"bad2", b"\xff\xfe")]
    await publish(kafka_bootstrap, topics.input, messages)
    port = free_port()
    with fake_llm_process("--latency-ms", "5") as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            window={"max_messages": 40, "max_wait_ms": 300},
            observability=observability(port),
        )
        log_path = tmp_path / "consumer.log"
        with running_consumer(settings, log_path, TEST_LLM_KEY=SECRET_KEY) as consumer:
            outputs = await read_topic(kafka_bootstrap, topics.output, expect=198, timeout_s=90)
            letters = await read_topic(kafka_bootstrap, topics.dlq, expect=2, timeout_s=30)
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)

            async def settled() -> dict[str, float] | None:
                values = await scrape(port)
                lags = [v for k, v in values.items() if k.startswith("llm_consumer_consumer_lag{")]
                done = values.get("llm_consumer_rows_produced_total") == 198
                return values if done and len(lags) == 2 and not any(lags) else None

            values = await eventually(settled, 30, "counters and zero lag")
            assert await status_of(port, "/healthz") == 200
            assert await status_of(port, "/readyz") == 200
            llm_stats = llm.stats()
            assert consumer.stop() == 0

    assert len(outputs) == 198 and len(letters) == 2
    assert values["llm_consumer_rows_consumed_total"] == 200
    assert values["llm_consumer_rows_produced_total"] == 198
    assert values['llm_consumer_row_errors_total{reason="template_error"}'] == 1
    dead = {k: v for k, v in values.items() if k.startswith("llm_consumer_dead_letters_total")}
    assert sum(dead.values()) == 2, dead
    assert values['llm_consumer_dead_letters_total{reason="invalid_json"}'] >= 1
    windows = sum(v for k, v in values.items() if k.startswith("llm_consumer_windows_total"))
    assert windows >= 5  # 200 messages, at most 40 per window
    assert values["llm_consumer_window_rows_sum"] == 200
    assert values["llm_consumer_window_rows_count"] == windows
    ok = 'llm_consumer_llm_request_seconds_count{provider="openai",status="200"}'
    assert values[ok] == 197
    requests = sum(
        v for k, v in values.items() if k.startswith("llm_consumer_llm_request_seconds_count")
    )
    assert requests == llm_stats["requests"]
    prompt = values['llm_consumer_llm_tokens_total{kind="prompt",model="fake-model"}']
    assert prompt > 0
    assert values['llm_consumer_llm_tokens_total{kind="completion",model="fake-model"}'] > 0
    assert values["llm_consumer_commit_seconds_count"] >= 1
    assert values["llm_consumer_last_commit_timestamp_seconds"] > time.time() - 120
    assert values["llm_consumer_limiter_limit"] >= 1
    assert values["llm_consumer_assigned_partitions"] == 2
    assert values["llm_consumer_held_back"] == 0
    # The run's log has the window lines with ids and offsets, and never the key.
    text = log_path.read_text()
    assert SECRET_KEY not in text
    windows_logged = [
        line
        for line in map(orjson.loads, filter(None, text.splitlines()))
        if line.get("msg") == "window done"
    ]
    assert windows_logged and all(w["window_id"] and w["partitions"] for w in windows_logged)


async def test_readyz_fails_while_the_llm_is_down_and_recovers_after(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics.unique("ready")
    await create_topics(kafka_bootstrap, [topics.input], partitions=1)
    port = free_port()
    with fake_llm_process("--latency-ms", "5") as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            window={"max_messages": 10, "max_wait_ms": 200},
            observability=observability(port),
        )
        with running_consumer(settings, tmp_path / "consumer.log") as consumer:

            async def ready() -> bool:
                return await status_of(port, "/readyz") == 200

            async def not_ready() -> bool:
                return await status_of(port, "/readyz") == 503

            await eventually(ready, 60, "ready after partitions are assigned")
            llm.configure(outage={"status": 503, "seconds": 8, "retry_after_s": 0.05})
            rows = [{"id": f"r{i}", "text": "fine"} for i in range(10)]
            await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
            await eventually(not_ready, 20, "/readyz to fail during the outage")
            assert await status_of(port, "/healthz") == 200  # alive, only not ready
            assert (await scrape(port))["llm_consumer_held_back"] == 1
            await eventually(ready, 40, "/readyz to recover after the outage")
            outputs = await read_topic(kafka_bootstrap, topics.output, expect=10, timeout_s=30)
            assert consumer.stop() == 0

    assert len(outputs) == 10
    assert all(m.json()["llm_response_error"] is None for m in outputs)
