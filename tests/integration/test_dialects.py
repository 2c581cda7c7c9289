"""Real provider dialects end to end: real broker, the fake LLM as a process, the consumer too.

Configuration errors (a misspelt model, spent billing) hold the window with no error rows and
the offsets uncommitted; the row's own errors (context too long, a request bigger than the
quota, an empty answer) are error rows while the rest of the window is enriched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaError

from tests.support.fake_llm_process import FakeLLM, fake_llm_process
from tests.support.kafka_broker import free_port
from tests.support.pipeline import (
    ConsumerProcess,
    Topics,
    committed_offsets,
    create_topics,
    publish,
    read_topic,
    readiness,
    rows_to_messages,
    running_consumer,
    settings_file,
    wait_for_commits,
)


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    """One fake per test: these tests reconfigure it."""
    with fake_llm_process("--latency-ms", "5") as server:
        yield server


def rows(count: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"great product {i}"} for i in range(count)]


async def held_back_for(consumer: ConsumerProcess, reason: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in consumer.log_lines():
            held = line.get("msg") == "window held back: offsets stay uncommitted"
            if held and line.get("reason") == reason:
                return True
        await asyncio.sleep(0.2)
    return False


async def nothing_committed(bootstrap: str, topics: Topics) -> bool:
    try:
        committed = await committed_offsets(bootstrap, topics.group, topics.input)
    except KafkaError:  # the group's coordinator is not known yet: nothing was committed
        return True
    return all(offset <= 0 for offset in committed.values())


async def test_a_misspelt_model_holds_the_window_with_no_error_rows_until_it_is_fixed(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    fake_llm.configure(models=["gpt-4o-mini"])
    topics = Topics.unique("badmodel")
    await create_topics(kafka_bootstrap, [topics.input], partitions=1)
    await publish(kafka_bootstrap, topics.input, rows_to_messages(rows(4)))
    port = free_port()
    settings = settings_file(
        tmp_path,
        kafka_bootstrap,
        fake_llm.base_url,
        topics,
        llm={"model": "gpt-4o-mni"},
        observability={"host": "127.0.0.1", "port": port},
    )
    with running_consumer(settings, tmp_path / "consumer.log") as consumer:
        assert await held_back_for(consumer, "model_not_found", 30), consumer.log_text()[-3000:]
        status, body = await readiness(port)
        assert status == 503, body
        assert "model_not_found" in str(body), body  # readiness names the configuration error
        early = await read_topic(kafka_bootstrap, topics.output, expect=1, timeout_s=3)
        assert early == [], "a configuration error must not produce error rows"
        assert await nothing_committed(kafka_bootstrap, topics)
        fake_llm.configure(models=None)  # the deployment appears under the name asked for
        outputs = await read_topic(kafka_bootstrap, topics.output, expect=4, timeout_s=60)
        committed = await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
        assert consumer.stop() == 0

    assert len(outputs) == 4
    for message in outputs:
        body = message.json()
        assert body["llm_response_error"] is None
        assert body["llm_response"] == "POSITIVE"
        assert body["llm_response_model"] == "gpt-4o-mni"  # unknown names are answered as given
    assert committed == {0: 4}


async def test_insufficient_quota_holds_the_window_without_hammering_the_provider(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    fake_llm.configure(quota_exhausted=True)
    topics = Topics.unique("quota")
    await create_topics(kafka_bootstrap, [topics.input], partitions=1)
    row_count = 2
    await publish(kafka_bootstrap, topics.input, rows_to_messages(rows(row_count)))
    retry = {"initial_backoff_s": 0.05, "max_backoff_s": 0.5, "window_backoff_max_s": 60}
    settings = settings_file(
        tmp_path,
        kafka_bootstrap,
        fake_llm.base_url,
        topics,
        llm={"model": "gpt-4o-mini", "retry": retry},
    )
    with running_consumer(settings, tmp_path / "consumer.log") as consumer:
        for _ in range(300):  # the first round starts once the consumer joined its group
            if fake_llm.stats()["requests"]:
                break
            await asyncio.sleep(0.1)
        first_request = time.monotonic()
        await asyncio.sleep(max(0.0, first_request + 12 - time.monotonic()))
        at_12s = fake_llm.stats()["requests"]
        await asyncio.sleep(max(0.0, first_request + 25 - time.monotonic()))
        at_25s = fake_llm.stats()["requests"]
        outputs = await read_topic(kafka_bootstrap, topics.output, expect=1, timeout_s=1)
        assert await held_back_for(consumer, "insufficient_quota", 1), consumer.log_text()[-3000:]
        assert consumer.stop() == 0

    assert outputs == []
    # One request per row per round (billing is never retried within a round), rounds 2 s
    # apart and doubling: at most 5 rounds in the first 25 s, at most 2 after the 12th second.
    assert at_25s <= 5 * row_count, (at_12s, at_25s)
    assert at_25s - at_12s <= 2 * row_count, (at_12s, at_25s)
    assert fake_llm.stats()["by_status"].keys() == {"429"}


async def test_a_rows_own_errors_are_error_rows_while_the_rest_is_enriched(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    topics = Topics.unique("rowerrors")
    await create_topics(kafka_bootstrap, [topics.input], partitions=1)
    texts = {
        "a": "great product",
        "long": "a very long review [[fake:context_length]]",
        "big": "a huge review [[fake:request_too_large]]",
        "think": "a puzzling review [[fake:empty_length]]",
        "b": "awful product",
    }
    batch = [{"id": key, "text": text} for key, text in texts.items()]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(batch))
    settings = settings_file(
        tmp_path, kafka_bootstrap, fake_llm.base_url, topics, llm={"model": "gpt-4o-mini"}
    )
    with running_consumer(settings, tmp_path / "consumer.log") as consumer:
        outputs = await read_topic(kafka_bootstrap, topics.output, expect=5, timeout_s=60)
        await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
        assert consumer.stop() == 0

    bodies = {m.key: m.json() for m in outputs}
    assert bodies[b"a"]["llm_response"] == "POSITIVE"
    assert bodies[b"b"]["llm_response"] == "NEGATIVE"
    assert bodies[b"a"]["llm_response_model"] == "gpt-4o-mini-2024-07-18"
    expected = {b"long": "context_length_exceeded", b"big": "request_too_large"}
    expected[b"think"] = "empty_answer"
    for key, reason in expected.items():
        error = bodies[key]["llm_response_error"]
        assert (error["reason"], error["retryable"], error["attempts"]) == (reason, False, 1)
    assert fake_llm.stats()["requests"] == 5, "row errors are never retried"


async def test_a_reasoning_model_gets_max_completion_tokens_and_no_temperature(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    topics = Topics.unique("reasoning")
    await create_topics(kafka_bootstrap, [topics.input], partitions=1)
    await publish(kafka_bootstrap, topics.input, rows_to_messages(rows(2)))
    llm = {"model": "o3-mini", "reasoning_effort": "low", "max_tokens": 300}
    settings = settings_file(tmp_path, kafka_bootstrap, fake_llm.base_url, topics, llm=llm)
    with running_consumer(settings, tmp_path / "consumer.log") as consumer:
        outputs = await read_topic(kafka_bootstrap, topics.output, expect=2, timeout_s=60)
        assert consumer.stop() == 0

    sent = fake_llm.stats()["last_request"]
    assert sent["max_completion_tokens"] == 300
    assert sent["reasoning_effort"] == "low"
    assert "max_tokens" not in sent and "temperature" not in sent
    for message in outputs:
        body = message.json()
        assert body["llm_response_error"] is None, body["llm_response_error"]
        assert body["llm_response_model"] == "o3-mini-2025-01-31"
        assert body["llm_response_usage"]["reasoning_tokens"] == 64
