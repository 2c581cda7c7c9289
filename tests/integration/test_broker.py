"""The session broker supports what the consumer relies on, on a single node:
topic creation, idempotent acks=all produce, consumer groups with manual
commits, and transactions (committed visible, aborted hidden)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PARTITIONS = 3
N = 10


async def _drain(
    consumer: AIOKafkaConsumer, want: int, deadline_s: float = 30.0
) -> list[tuple[int, bytes]]:
    """Poll until `want` records arrived or the deadline passed."""
    got: list[tuple[int, bytes]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while len(got) < want and loop.time() < deadline:
        batches = await consumer.getmany(timeout_ms=500)
        for records in batches.values():
            got.extend((r.partition, r.value) for r in records)
    return got


async def test_groups_and_transactions_on_one_node(kafka_bootstrap: str) -> None:
    suffix = uuid.uuid4().hex[:8]
    topic = f"it-broker-{suffix}"
    txn_topic = f"it-broker-txn-{suffix}"
    group = f"it-broker-group-{suffix}"

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1),
                NewTopic(txn_topic, num_partitions=1, replication_factor=1),
            ],
            timeout_ms=15000,
        )
        described = await admin.describe_topics([topic])
        assert len(described[0]["partitions"]) == PARTITIONS
    finally:
        await admin.close()

    # Idempotent producer, acks=all, spread over the 3 partitions by key.
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for i in range(N):
            await producer.send_and_wait(topic, key=f"k{i}".encode(), value=f"v{i}".encode())
    finally:
        await producer.stop()

    # Consumer group with manual commit.
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        got = await _drain(consumer, N)
        assert sorted(v for _, v in got) == sorted(f"v{i}".encode() for i in range(N))
        assert len({p for p, _ in got}) > 1, "keys should spread over several partitions"
        await consumer.commit()
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        committed = [await consumer.committed(tp) or 0 for tp in tps]
        assert sum(committed) == N
    finally:
        await consumer.stop()

    # Transactions: one aborted, then one committed.
    txn = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"it-broker-tx-{suffix}"
    )
    await txn.start()
    try:
        await txn.begin_transaction()
        await txn.send_and_wait(txn_topic, b"aborted")
        await txn.abort_transaction()
        async with txn.transaction():
            await txn.send_and_wait(txn_topic, b"committed-1")
            await txn.send_and_wait(txn_topic, b"committed-2")
    finally:
        await txn.stop()

    reader = AIOKafkaConsumer(
        txn_topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"{group}-txn",
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await reader.start()
    try:
        got = await _drain(reader, 2)
        assert [v for _, v in got] == [b"committed-1", b"committed-2"]
        # Nothing else (in particular not the aborted record) shows up later.
        assert await _drain(reader, 1, deadline_s=1.5) == []
    finally:
        await reader.stop()
