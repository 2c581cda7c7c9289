"""The consumer at the edge: aiokafka's records and partitions are converted here, once.

Nothing past this module sees an aiokafka type: records become `SourceRecord`, partitions
`TopicPartition`, and the rebalance listener calls plain async callbacks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTopicPartition

from consumer.records import SourceRecord, TopicPartition

PartitionsCallback = Callable[[set[TopicPartition]], Awaitable[None]]


def _ours(partitions: Iterable[Any]) -> set[TopicPartition]:
    return {TopicPartition(tp.topic, tp.partition) for tp in partitions}


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_assigned: PartitionsCallback, on_revoked: PartitionsCallback) -> None:
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._on_revoked(_ours(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._on_assigned(_ours(assigned))


class KafkaSource:
    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer

    async def start(self) -> None:
        try:
            await self.consumer.start()
        except BaseException:
            await self.consumer.stop()  # one that failed to start still holds its client
            raise

    async def stop(self) -> None:
        await self.consumer.stop()

    def subscribe(
        self, topic: str, on_assigned: PartitionsCallback, on_revoked: PartitionsCallback
    ) -> None:
        self.consumer.subscribe([topic], listener=_Listener(on_assigned, on_revoked))

    async def fetch(self, timeout_s: float, max_records: int) -> list[SourceRecord]:
        batch = await self.consumer.getmany(
            timeout_ms=int(timeout_s * 1000), max_records=max_records
        )
        return [
            SourceRecord(
                topic=raw.topic,
                partition=raw.partition,
                offset=raw.offset,
                key=raw.key,
                value=raw.value,
                timestamp=raw.timestamp,
                headers=tuple(raw.headers or ()),
            )
            for records in batch.values()
            for raw in records
        ]

    def assignment(self) -> set[TopicPartition]:
        return _ours(self.consumer.assignment())

    def pause_all(self) -> None:
        assigned = self.consumer.assignment()
        if assigned - self.consumer.paused():
            self.consumer.pause(*assigned)

    def resume_all(self) -> None:
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*paused)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        await self.consumer.commit(
            {KafkaTopicPartition(tp.topic, tp.partition): o for tp, o in offsets.items()}
        )
