"""The fallback chain end to end: two fake LLM processes (the primary and the fallback, each
with its own faults), the real broker, the consumer as a process.

While every model is down the window is held back (no error rows, nothing committed); once
the fallback answers it enriches the rows, `{rf}_model` naming it; once the primary is back,
a probe finds it and rows go to it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.errors import KafkaError

from tests.support.fake_llm_process import FakeLLM, fake_llm_process
from tests.support.pipeline import (
    ConsumerProcess,
    Topics,
    committed_offsets,
    create_topics,
    publish,
    read_topic,
    rows_to_messages,
    running_consumer,
    settings_file,
    wait_for_commits,
)

PRIMARY = "gpt-4o"
FALLBACK = "gpt-4o-mini"
LONG_OUTAGE = {"status": 503, "seconds": 600}


@pytest.fixture
def primary() -> Iterator[FakeLLM]:
    with fake_llm_process("--latency-ms", "5") as server:
        yield server


@pytest.fixture
def fallback() -> Iterator[FakeLLM]:
    with fake_llm_process("--latency-ms", "5") as server:
        yield server


async def held_back(consumer: ConsumerProcess, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(
            line.get("msg") == "window held back: offsets stay uncommitted"
            for line in consumer.log_lines()
        ):
            return True
        await asyncio.sleep(0.2)
    return False


async def nothing_committed(bootstrap: str, topics: Topics) -> bool:
    try:
        committed = await committed_offsets(bootstrap, topics.group, topics.input)
    except KafkaError:  # the group's coordinator is not known yet: nothing was committed
        return True
    return all(offset <= 0 for offset in committed.values())


async def test_a_fallback_model_answers_while_the_primary_is_down(
    kafka_bootstrap: str, primary: FakeLLM, fallback: FakeLLM, tmp_path: Path
) -> None:
    primary.configure(outage=LONG_OUTAGE)
    fallback.configure(outage=LONG_OUTAGE)
    topics = Topics.unique("fallback")
    await create_topics(kafka_bootstrap, [topics.input], partitions=1)
    first = [{"id": f"a{i}", "text": f"great product {i}"} for i in range(4)]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(first))
    llm = {
        "model": PRIMARY,
        "fallbacks": [{"base_url": f"{fallback.base_url}/v1", "model": FALLBACK}],
        "fallback_after_s": 1.0,
        "fallback_probe_s": 1.0,
    }
    settings = settings_file(tmp_path, kafka_bootstrap, primary.base_url, topics, llm=llm)
    with running_consumer(settings, tmp_path / "consumer.log") as consumer:
        # every model down: held back, no error rows, nothing committed
        assert await held_back(consumer, 30), consumer.log_text()[-3000:]
        for _ in range(300):  # the primary has failed for fallback_after_s: rows go on
            if fallback.stats()["requests"]:
                break
            await asyncio.sleep(0.1)
        assert fallback.stats()["requests"] > 0, "the fallback was tried too"
        assert await read_topic(kafka_bootstrap, topics.output, expect=1, timeout_s=3) == []
        assert await nothing_committed(kafka_bootstrap, topics)

        fallback.configure(outage=None)
        outputs = await read_topic(kafka_bootstrap, topics.output, expect=4, timeout_s=60)
        await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
        assert len(outputs) == 4
        for message in outputs:
            body = message.json()
            assert body["llm_response_error"] is None, body["llm_response_error"]
            assert body["llm_response"] == "POSITIVE"
            assert body["llm_response_model"] == "gpt-4o-mini-2024-07-18"
        assert primary.stats()["by_status"].keys() == {"503"}

        # the primary is back: after a probe, rows go to it again
        primary.configure(outage=None)
        answered_by = []
        for i in range(20):
            await publish(
                kafka_bootstrap, topics.input, rows_to_messages([{"id": f"b{i}", "text": "good"}])
            )
            got = await read_topic(kafka_bootstrap, topics.output, expect=5 + i, timeout_s=30)
            answered_by = [m.json()["llm_response_model"] for m in got[4:]]
            if answered_by[-1] == "gpt-4o-2024-08-06":
                break
        assert consumer.stop() == 0

    assert answered_by[-1] == "gpt-4o-2024-08-06", answered_by
    assert len(answered_by) <= 3, "one probe after fallback_probe_s finds the primary"
    assert "200" in primary.stats()["by_status"]
