"""Fault scenarios: crash, rebalance, provider outage, broker restart, bad input, exactly-once.

Each publishes a known set of rows, injects its fault while the consumer (a real process) is
running against the real broker and the real fake-LLM process, then reads the output and DLQ
topics and checks by source partition/offset that every input is there. Missing must be 0;
duplicates are counted (and must be 0 in exactly-once mode, for a read_committed reader).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support.fake_llm_process import FakeLLM, fake_llm_process
from tests.support.kafka_broker import (
    BrokerHandle,
    private_local_broker,
    start_local_broker,
    stop_local_broker,
)
from tests.support.ledger import account
from tests.support.pipeline import (
    ConsumerProcess,
    Message,
    Topics,
    committed_offsets,
    create_topics,
    publish,
    read_topic,
    rows_to_messages,
    settings_file,
    wait_for_commits,
)

pytestmark = pytest.mark.faults

FAST_GROUP = {"session_timeout_ms": 6_000, "heartbeat_interval_ms": 1_000}


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeLLM]:
    with fake_llm_process("--latency-ms", "20", "--jitter-ms", "10") as server:
        yield server


def rows(count: int) -> list[dict[str, Any]]:
    texts = ("great and reliable", "broken on arrival", "a plain box")
    return [{"id": f"k{i % 97}", "n": i, "text": texts[i % 3]} for i in range(count)]


async def everything(
    bootstrap: str, topics: Topics, expected: int, timeout_s: float = 240
) -> tuple[list[Message], list[Message]]:
    """Read outputs and dead letters until together they cover `expected` inputs."""
    deadline = time.monotonic() + timeout_s
    outputs: list[Message] = []
    dead: list[Message] = []
    while time.monotonic() < deadline:
        outputs = await read_topic(
            bootstrap, topics.output, expect=expected, timeout_s=10, settle_s=3
        )
        dead = await read_topic(bootstrap, topics.dlq, expect=1, timeout_s=1)
        if len({m.source for m in [*outputs, *dead]}) >= expected:
            break
        await asyncio.sleep(1)
    return outputs, dead


def consumer(settings: Path, log: Path, **env: str) -> ConsumerProcess:
    return ConsumerProcess(settings, log, env).start()


async def kill_repeatedly(
    settings: Path, log: Path, kills: int, rng: random.Random
) -> ConsumerProcess:
    """SIGKILL the consumer `kills` times at random moments; returns the last, running one."""
    proc = consumer(settings, log)
    for _ in range(kills):
        await asyncio.sleep(rng.uniform(2.0, 5.0))
        proc.kill()
        proc = consumer(settings, log)
    return proc


@pytest.mark.parametrize("mode", ["at_least_once", "exactly_once"])
async def test_sigkill_at_random_moments_loses_nothing(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path, mode: str
) -> None:
    topics = Topics.unique(f"kill-{mode}")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=3)
    positions = await publish(kafka_bootstrap, topics.input, rows_to_messages(rows(5000)))
    settings = settings_file(
        tmp_path,
        kafka_bootstrap,
        fake_llm.base_url,
        topics,
        kafka=FAST_GROUP,
        window={"max_messages": 100, "max_wait_ms": 500},
        llm={"concurrency": {"initial": 4, "max": 4}},
        delivery={"mode": mode, "shutdown_grace_s": 15},
    )
    log = tmp_path / "consumer.log"
    last = await kill_repeatedly(settings, log, kills=5, rng=random.Random(42))
    try:
        produced_before_last_run = sum(
            1 for line in log.read_text().splitlines() if "window done" in line
        )
        assert produced_before_last_run * 100 < 5000, "the kills must land while work remains"
        outputs, dead = await everything(kafka_bootstrap, topics, len(positions))
        await wait_for_commits(kafka_bootstrap, topics.group, topics.input, timeout_s=60)
        assert last.stop() == 0
    finally:
        last.kill()
    entry = account(f"1. SIGKILL x5, 5000 rows ({mode})", positions, outputs, dead)
    assert entry.missing == 0, entry.missing_examples
    if mode == "exactly_once":
        assert entry.duplicates == 0


@pytest.mark.parametrize("mode", ["at_least_once", "exactly_once"])
async def test_members_joining_and_leaving_mid_run_lose_nothing(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path, mode: str
) -> None:
    topics = Topics.unique(f"rebalance-{mode}")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=6)
    positions = await publish(kafka_bootstrap, topics.input, rows_to_messages(rows(4000)))
    settings = settings_file(
        tmp_path,
        kafka_bootstrap,
        fake_llm.base_url,
        topics,
        kafka={**FAST_GROUP, "rebalance_timeout_ms": 20_000},
        window={"max_messages": 100, "max_wait_ms": 500},
        llm={"concurrency": {"initial": 4, "max": 4}},
        delivery={"mode": mode},
    )
    first = consumer(settings, tmp_path / "a.log")
    second = consumer(settings, tmp_path / "b.log")
    third: ConsumerProcess | None = None
    try:
        await asyncio.sleep(4)
        third = consumer(settings, tmp_path / "c.log")
        await asyncio.sleep(4)
        assert first.stop() == 0, "a member leaving mid-run exits cleanly"
        outputs, dead = await everything(kafka_bootstrap, topics, len(positions))
        await wait_for_commits(kafka_bootstrap, topics.group, topics.input, timeout_s=60)
        assert second.stop() == 0
        assert third.stop() == 0
    finally:
        for proc in (first, second, third):
            if proc is not None:
                proc.kill()
    logs = "".join((tmp_path / f"{n}.log").read_text() for n in "abc")
    assert "partitions revoked" in logs, "the scenario must actually rebalance"
    assert "CommitFailedError" not in logs
    entry = account(f"2. join + leave mid-run, 4000 rows ({mode})", positions, outputs, dead)
    assert entry.missing == 0, entry.missing_examples
    if mode == "exactly_once":
        assert entry.duplicates == 0


async def test_a_provider_outage_holds_windows_back_without_error_rows(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics.unique("outage")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=3)
    positions = await publish(kafka_bootstrap, topics.input, rows_to_messages(rows(2000)))
    with fake_llm_process("--latency-ms", "50") as llm:
        settings = settings_file(
            tmp_path,
            kafka_bootstrap,
            llm.base_url,
            topics,
            kafka=FAST_GROUP,
            window={"max_messages": 50},
            llm={
                "concurrency": {"initial": 4, "max": 4},
                "retry": {
                    "max_attempts": 3,
                    "initial_backoff_s": 0.05,
                    "max_backoff_s": 0.2,
                    "window_backoff_max_s": 2,
                },
            },
        )
        proc = consumer(settings, tmp_path / "consumer.log")
        try:
            await read_topic(kafka_bootstrap, topics.output, expect=100, timeout_s=60)
            llm.configure(retry_after_s=None, outage={"status": 503, "seconds": 20})
            # Windows answered before the outage may still be committing when it starts (up to
            # max_pending_windows of them): measure from when a window is seen held back.
            for _ in range(100):
                if "window held back" in proc.log_text():
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            before = await committed_offsets(kafka_bootstrap, topics.group, topics.input)
            await asyncio.sleep(8)
            during = await committed_offsets(kafka_bootstrap, topics.group, topics.input)
            outputs, dead = await everything(kafka_bootstrap, topics, len(positions))
            assert proc.stop() == 0
        finally:
            proc.kill()
    log = proc.log_text()
    assert "window held back" in log
    assert sum(during.values()) - sum(before.values()) <= 50, "commits stall during the outage"
    errors = [m.json()["llm_response_error"] for m in outputs]
    errors = [error for error in errors if error is not None]
    assert errors == [], f"an outage must not produce error rows: {errors[:3]}"
    entry = account("3. LLM answers 503 for 20 s", positions, outputs, dead)
    assert entry.missing == 0, entry.missing_examples


@pytest.mark.skipif(shutil.which("java") is None, reason="stopping a broker needs the local one")
async def test_a_broker_restart_under_the_consumer_loses_nothing(
    fake_llm: FakeLLM, tmp_path: Path
) -> None:
    with private_local_broker() as broker:
        await _broker_restart_scenario(broker, fake_llm, tmp_path)


async def _broker_restart_scenario(broker: BrokerHandle, llm: FakeLLM, tmp_path: Path) -> None:
    bootstrap = broker.bootstrap
    topics = Topics.unique("broker")
    await create_topics(bootstrap, [topics.input, topics.output, topics.dlq], partitions=3)
    positions = await publish(bootstrap, topics.input, rows_to_messages(rows(3000)))
    settings = settings_file(
        tmp_path,
        bootstrap,
        llm.base_url,
        topics,
        kafka=FAST_GROUP,
        window={"max_messages": 50},
        llm={"concurrency": {"initial": 4, "max": 8}},
    )
    proc = consumer(settings, tmp_path / "consumer.log")
    try:
        await read_topic(bootstrap, topics.output, expect=300, timeout_s=60)
        stop_local_broker(broker)
        await asyncio.sleep(10)
        start_local_broker(broker, keep_data=True)
        outputs, dead = await everything(bootstrap, topics, len(positions))
        await wait_for_commits(bootstrap, topics.group, topics.input, timeout_s=60)
        assert proc.stop() == 0
    finally:
        proc.kill()
    entry = account("4. broker stopped 10 s mid-run", positions, outputs, dead)
    assert entry.missing == 0, entry.missing_examples


async def test_bad_input_of_every_kind_ends_as_dead_letters_or_row_errors(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    topics = Topics.unique("bad")
    await create_topics(kafka_bootstrap, [topics.input, topics.output, topics.dlq], partitions=1)
    bad: list[tuple[bytes | None, bytes | None, str]] = [
        (b"not-json", b"{oops", "invalid_json"),
        (b"array", b"[1,2]", "not_an_object"),
        (b"number", b"42", "not_an_object"),
        (b"utf8", b'{"text": "caf\xe9"}', "invalid_utf8"),
        (b"huge", orjson.dumps({"text": "x" * 5000}), "too_large"),
        (b"empty", b"", "empty"),
        (b"tombstone", None, "tombstone"),
    ]
    row_errors = {
        b"context": (
            orjson.dumps({"text": "long [[fake:context_length]]"}),
            "context_length_exceeded",
        ),
        b"filtered": (
            orjson.dumps({"text": "bad words [[fake:content_filter]]"}),
            "content_filter",
        ),
        b"no-text": (orjson.dumps({"body": "no text field"}), "template_error"),
    }
    messages: list[tuple[bytes | None, bytes | None]] = []
    good = 0
    for index in range(60):
        if index % 6 == 5 and bad:
            key, value, _ = bad.pop()
            messages.append((key, value))
        elif index % 6 == 2 and row_errors:
            key, (value, _) = row_errors.popitem()
            messages.append((key, value))
        else:
            good += 1
            messages.append((f"good-{index}".encode(), orjson.dumps({"text": f"great {index}"})))
    messages.extend((key, value) for key, value, _ in bad)
    messages.extend((key, value) for key, (value, _) in row_errors.items())
    positions = await publish(kafka_bootstrap, topics.input, messages)
    settings = settings_file(
        tmp_path,
        kafka_bootstrap,
        fake_llm.base_url,
        topics,
        kafka={"max_row_bytes": 2000},
        window={"max_messages": 20},
    )
    proc = consumer(settings, tmp_path / "consumer.log")
    try:
        outputs, dead = await everything(kafka_bootstrap, topics, len(positions))
        await wait_for_commits(kafka_bootstrap, topics.group, topics.input)
        assert proc.stop() == 0
    finally:
        proc.kill()
    reasons = {m.key: m.headers["dlq.reason"] for m in dead}
    assert reasons == {
        b"not-json": "invalid_json",
        b"array": "not_an_object",
        b"number": "not_an_object",
        b"utf8": "invalid_utf8",
        b"huge": "too_large",
        b"empty": "empty",
        b"tombstone": "tombstone",
    }
    errors = {
        m.key: m.json()["llm_response_error"]["reason"]
        for m in outputs
        if m.json()["llm_response_error"] is not None
    }
    assert errors == {
        b"context": "context_length_exceeded",
        b"filtered": "content_filter",
        b"no-text": "template_error",
    }
    entry = account("5. bad input of every kind", positions, outputs, dead)
    assert entry.missing == 0 and entry.duplicates == 0


@pytest.mark.parametrize("mode", ["at_least_once", "exactly_once"])
async def test_a_dead_letter_too_large_for_the_dlq_becomes_a_stub_and_the_partition_moves_on(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path, mode: str
) -> None:
    topics = Topics.unique(f"dlqstub-{mode}")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(topics.input, 1, 1),
                NewTopic(topics.dlq, 1, 1, topic_configs={"max.message.bytes": "2500"}),
            ]
        )
    finally:
        await admin.close()
    poison = b"not json " + b"x" * 4000
    positions = await publish(
        kafka_bootstrap,
        topics.input,
        [
            (b"a", orjson.dumps({"text": "good"})),
            (b"poison", poison),
            (b"b", orjson.dumps({"text": "good too"})),
        ],
    )
    settings = settings_file(
        tmp_path, kafka_bootstrap, fake_llm.base_url, topics, delivery={"mode": mode}
    )
    proc = consumer(settings, tmp_path / "consumer.log")
    try:
        committed = await wait_for_commits(kafka_bootstrap, topics.group, topics.input, 60)
        dead = await read_topic(kafka_bootstrap, topics.dlq, expect=1, timeout_s=30)
        outputs = await read_topic(kafka_bootstrap, topics.output, expect=2, timeout_s=30)
        assert proc.stop() == 0
    finally:
        proc.kill()
    assert committed == {0: 3}
    assert len(dead) == 1
    stub = dead[0]
    assert stub.value == poison[:1024]
    assert stub.headers["dlq.reason"] == "invalid_json"
    assert stub.headers["dlq.truncated"] == "true"
    assert stub.headers["dlq.original_value_bytes"] == str(len(poison))
    assert stub.source == positions[1]
    assert "record refused by the broker; replaced" in proc.log_text()
    entry = account(f"6. dead letter too large for the DLQ ({mode})", positions, outputs, dead)
    assert entry.missing == 0 and entry.duplicates == 0


async def test_with_fallback_stop_a_refused_dead_letter_stops_the_consumer_uncommitted(
    kafka_bootstrap: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    topics = Topics.unique("dlqstop")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(topics.input, 1, 1),
                NewTopic(topics.dlq, 1, 1, topic_configs={"max.message.bytes": "500"}),
            ]
        )
    finally:
        await admin.close()
    positions = await publish(
        kafka_bootstrap,
        topics.input,
        [(b"a", orjson.dumps({"text": "good"})), (b"poison", b"not json " + b"x" * 2000)],
    )
    settings = settings_file(
        tmp_path,
        kafka_bootstrap,
        fake_llm.base_url,
        topics,
        window={"max_messages": 1},
        delivery={"dead_letter_fallback": "stop"},
    )
    proc = consumer(settings, tmp_path / "consumer.log")
    try:
        code = proc.wait(60)
    finally:
        proc.kill()
    assert code == 1
    committed = await committed_offsets(kafka_bootstrap, topics.group, topics.input)
    assert committed.get(0, 0) <= positions[1][1], "the unproduced dead letter was committed"
    log = proc.log_text()
    assert "dead-letter topic" in log and "dead_letter_fallback: stop" in log
