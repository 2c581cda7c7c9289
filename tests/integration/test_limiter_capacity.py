"""The limiter finds a hidden capacity end to end: real broker, fake LLM with capacity 20."""

from __future__ import annotations

from pathlib import Path

from tests.support.fake_llm_process import fake_llm_process
from tests.support.pipeline import (
    Topics,
    create_topics,
    duplicates,
    publish,
    read_topic,
    rows_to_messages,
    running_consumer,
    settings_file,
    wait_for_commits,
)

ROWS = 500
CAPACITY = 20


async def test_500_rows_against_capacity_20_all_end_enriched_and_the_limit_settles_near_it(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics.unique("capacity")
    await create_topics(kafka_bootstrap, [topics.input, topics.output], partitions=2)
    texts = ("great value, I love it", "terrible, it broke", "it is a box")
    rows = [{"id": f"c{i}", "text": texts[i % 3]} for i in range(ROWS)]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    with fake_llm_process("--capacity", str(CAPACITY), "--latency-ms", "50") as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            window={"max_messages": 100, "max_wait_ms": 500},
        )
        with running_consumer(settings, tmp_path / "consumer.log") as consumer:
            outputs = await read_topic(kafka_bootstrap, topics.output, expect=ROWS, timeout_s=120)
            await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
            assert consumer.stop() == 0
        stats = llm.stats()

    log = consumer.log_text()[-3000:]
    assert len(outputs) == ROWS, log
    assert duplicates(outputs) == 0
    bodies = [message.json() for message in outputs]
    errors = [body["llm_response_error"] for body in bodies if body["llm_response_error"]]
    assert errors == [], errors[:3]
    assert all(body["llm_response"] in ("POSITIVE", "NEGATIVE", "NEUTRAL") for body in bodies)
    # the server never saw more than its capacity admitted, and the limiter did hit it
    assert stats["max_in_flight"] <= CAPACITY
    assert stats["rejected_429"] > 0
    windows = [line for line in consumer.log_lines() if line.get("msg") == "window done"]
    assert windows, log
    final_limit = windows[-1]["limit"]
    assert 10 <= final_limit <= 40, [w["limit"] for w in windows]
