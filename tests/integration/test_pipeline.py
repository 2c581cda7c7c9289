"""The contract end to end: real broker, real fake-LLM process, the consumer as a process."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.support.fake_llm_process import FakeLLM, fake_llm_process
from tests.support.pipeline import (
    Message,
    Topics,
    committed_offsets,
    create_topics,
    duplicates,
    publish,
    read_topic,
    rows_to_messages,
    running_consumer,
    settings_file,
    wait_for_commits,
)

CONTRACT_FIELDS = (
    "llm_response",
    "llm_response_model",
    "llm_response_usage",
    "llm_response_template_hash",
    "llm_response_variables_hash",
    "llm_response_error",
)


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeLLM]:
    with fake_llm_process("--latency-ms", "5", "--jitter-ms", "5") as server:
        yield server


def reviews(count: int, start: int = 0) -> list[dict[str, object]]:
    texts = ("I love it, great value", "terrible, it broke", "it is a box")
    return [{"id": f"r{i}", "text": texts[i % 3], "n": i} for i in range(start, start + count)]


def assert_order_kept_per_source_partition(messages: list[Message]) -> None:
    """Within each output partition, each source partition's offsets only go up."""
    last: dict[tuple[int, int], int] = {}
    for message in messages:
        source_partition, source_offset = message.source
        key = (message.partition, source_partition)
        assert source_offset > last.get(key, -1), f"out of order at {message}"
        last[key] = source_offset


async def test_a_thousand_rows_over_three_partitions_give_a_thousand_outputs(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    topics = Topics.unique("thousand")
    await create_topics(kafka_bootstrap, [topics.input, topics.output], partitions=3)
    rows = reviews(1000)
    positions = await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    settings = settings_file(
        tmp_path, kafka_bootstrap, fake_llm.base_url, topics, window={"max_messages": 100}
    )
    with running_consumer(settings, tmp_path / "consumer.log") as consumer:
        outputs = await read_topic(kafka_bootstrap, topics.output, expect=1000, timeout_s=120)
        committed = await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
        assert consumer.stop() == 0

    assert len(outputs) == 1000, consumer.log_text()[-3000:]
    assert duplicates(outputs) == 0
    by_source = {m.source: m for m in outputs}
    for row, position in zip(rows, positions, strict=True):
        message = by_source[position]
        body = message.json()
        assert message.key == str(row["id"]).encode()
        assert {k: body[k] for k in row} == row
        for name in CONTRACT_FIELDS:
            assert name in body, name
        assert body["llm_response"] in {"POSITIVE", "NEGATIVE", "NEUTRAL"}
        assert body["llm_response_error"] is None
        assert body["llm_response_usage"]["total_tokens"] > 0
        assert message.headers["source.topic"] == topics.input
        assert message.headers["llm.template_hash"] == body["llm_response_template_hash"]
    assert_order_kept_per_source_partition(outputs)
    ends = defaultdict(int)
    for partition, offset in positions:
        ends[partition] = max(ends[partition], offset + 1)
    assert committed == dict(ends)


async def test_windows_close_on_time_when_idle_and_on_count(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    topics = Topics.unique("windows")
    await create_topics(kafka_bootstrap, [topics.input], partitions=1)
    settings = settings_file(
        tmp_path,
        kafka_bootstrap,
        fake_llm.base_url,
        topics,
        window={"max_messages": 5, "max_wait_ms": 1500},
    )
    with running_consumer(settings, tmp_path / "consumer.log") as consumer:
        await publish(kafka_bootstrap, topics.input, rows_to_messages(reviews(3)))
        idle = await read_topic(kafka_bootstrap, topics.output, expect=3, timeout_s=60)
        assert len(idle) == 3, "an idle window of 3 rows must close on its timer"
        await publish(kafka_bootstrap, topics.input, rows_to_messages(reviews(10, start=3)))
        outputs = await read_topic(kafka_bootstrap, topics.output, expect=13, timeout_s=60)
        assert consumer.stop() == 0

    windows = [line for line in consumer.log_lines() if line.get("msg") == "window done"]
    reasons = [(w["close_reason"], w["rows"]) for w in windows]
    assert reasons[0] == ("time", 3)
    assert ("count", 5) in reasons
    assert len({m.headers["window.id"] for m in idle}) == 1
    sizes = defaultdict(int)
    for message in outputs[3:]:
        sizes[message.headers["window.id"]] += 1
    assert max(sizes.values()) == 5


async def test_a_400_on_row_2_of_3_gives_one_error_row_and_two_enriched_rows(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    topics = Topics.unique("rowerror")
    await create_topics(kafka_bootstrap, [topics.input], partitions=1)
    rows = [
        {"id": "a", "text": "great product"},
        {"id": "b", "text": "invalid request [[fake:400]]"},
        {"id": "c", "text": "awful product"},
    ]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    settings = settings_file(tmp_path, kafka_bootstrap, fake_llm.base_url, topics)
    with running_consumer(settings, tmp_path / "consumer.log") as consumer:
        outputs = await read_topic(kafka_bootstrap, topics.output, expect=3, timeout_s=60)
        await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
        assert consumer.stop() == 0

    bodies = {m.key: m.json() for m in outputs}
    assert bodies[b"a"]["llm_response"] == "POSITIVE"
    assert bodies[b"c"]["llm_response"] == "NEGATIVE"
    failed = bodies[b"b"]
    assert failed["llm_response"] is None
    assert failed["llm_response_error"]["reason"] == "bad_request"
    assert failed["llm_response_error"]["status_code"] == 400
    assert failed["llm_response_error"]["retryable"] is False
    assert failed["llm_response_error"]["attempts"] == 1
    assert await committed_offsets(kafka_bootstrap, topics.group, topics.input) == {0: 3}


async def test_429s_and_503s_are_retried_until_the_window_is_fully_enriched(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    topics = Topics.unique("retries")
    await create_topics(kafka_bootstrap, [topics.input], partitions=1)
    rows = [
        {"id": f"r{i}", "text": f"good {i} {directive}"}
        for i, directive in enumerate(
            ["[[fake:429x2]]", "[[fake:503x2]]", "", "[[fake:500x1]]", "[[fake:429x3]]", ""]
        )
    ]
    await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    settings = settings_file(tmp_path, kafka_bootstrap, fake_llm.base_url, topics)
    with running_consumer(settings, tmp_path / "consumer.log") as consumer:
        outputs = await read_topic(kafka_bootstrap, topics.output, expect=6, timeout_s=60)
        assert consumer.stop() == 0

    assert len(outputs) == 6
    for message in outputs:
        body = message.json()
        assert body["llm_response_error"] is None, body
        assert body["llm_response"] == "POSITIVE"


async def test_template_errors_are_row_errors_and_bad_input_goes_to_the_dlq(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    topics = Topics.unique("badinput")
    await create_topics(kafka_bootstrap, [topics.input], partitions=1)
    messages: list[tuple[bytes | None, bytes | None]] = [
        (b"good-1", orjson.dumps({"id": 1, "text": "great"})),
        (b"no-text", orjson.dumps({"id": 2, "body": "the template needs row.text"})),
        (b"not-json", b"this is { not json"),
        (b"array", b"[1, 2, 3]"),
        (b"bad-utf8", b'{"text": "\xff\xfe"}'),
        (b"good-2", orjson.dumps({"id": 3, "text": "awful"})),
    ]
    await publish(kafka_bootstrap, topics.input, messages)
    settings = settings_file(tmp_path, kafka_bootstrap, fake_llm.base_url, topics)
    with running_consumer(settings, tmp_path / "consumer.log") as consumer:
        outputs = await read_topic(kafka_bootstrap, topics.output, expect=3, timeout_s=60)
        dead = await read_topic(kafka_bootstrap, topics.dlq, expect=3, timeout_s=30)
        await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
        late = [(b"good-3", orjson.dumps({"id": 4, "text": "good"}))]
        await publish(kafka_bootstrap, topics.input, late)
        after = await read_topic(kafka_bootstrap, topics.output, expect=4, timeout_s=30)
        assert consumer.stop() == 0

    bodies = {m.key: m.json() for m in outputs}
    assert bodies[b"good-1"]["llm_response"] == "POSITIVE"
    assert bodies[b"good-2"]["llm_response"] == "NEGATIVE"
    error = bodies[b"no-text"]["llm_response_error"]
    assert error["reason"] == "template_error"
    assert "text" in error["message"]
    reasons = {m.key: m.headers["dlq.reason"] for m in dead}
    assert reasons == {
        b"not-json": "invalid_json",
        b"array": "not_an_object",
        b"bad-utf8": "invalid_utf8",
    }
    originals = dict(messages)
    for letter in dead:
        assert letter.value == originals[letter.key], "DLQ keeps the bytes untouched"
        assert letter.headers["source.topic"] == topics.input
        assert letter.headers["dlq.message"]
    assert len(after) == 4, "the consumer keeps running after bad input"


async def test_sigkill_after_produce_before_commit_loses_nothing_on_restart(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    topics = Topics.unique("crash")
    await create_topics(kafka_bootstrap, [topics.input], partitions=3)
    rows = reviews(300)
    positions = await publish(kafka_bootstrap, topics.input, rows_to_messages(rows))
    settings = settings_file(
        tmp_path, kafka_bootstrap, fake_llm.base_url, topics, window={"max_messages": 40}
    )
    log = tmp_path / "consumer.log"
    with running_consumer(settings, log, LLM_CONSUMER_FAILPOINTS="after_produce:3") as crashing:
        assert crashing.wait(90) == -9, "the failpoint kills the process after window 3"
    before = await read_topic(kafka_bootstrap, topics.output, expect=120, timeout_s=30)
    committed = await committed_offsets(kafka_bootstrap, topics.group, topics.input)
    assert len(before) == 120
    assert sum(committed.values()) == 80, "window 3 was produced but not committed"

    with running_consumer(settings, log) as restarted:
        outputs = await read_topic(
            kafka_bootstrap, topics.output, expect=340, timeout_s=120, settle_s=2
        )
        await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
        assert restarted.stop() == 0

    seen = {m.source for m in outputs}
    missing = [p for p in positions if p not in seen]
    repeated = duplicates(outputs)
    print(
        f"\ncrash/restart: inputs {len(rows)}, outputs {len(outputs)}, "
        f"missing {len(missing)}, duplicates {repeated}"
    )
    assert missing == []
    assert repeated == 40, "exactly the produced-but-uncommitted window is repeated"
