"""Exactly-once delivery: one Kafka transaction per input partition and window.

Outputs, dead letters and the input offset commit go into the same transaction, so a
read_committed reader sees each input row's output exactly once, across crashes and rebalances.

aiokafka implements only TxnOffsetCommit v0 (no KIP-447 group-metadata fencing), so zombies are
fenced the older way, as Kafka Streams did before KIP-447 and Faust does: one transactional
producer per input partition with a stable id `<prefix>.<topic>.<partition>`. Whoever is
assigned a partition starts its producer, and InitProducerId bumps the epoch, which fences any
previous owner still holding that id and aborts its open transaction.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka import TopicPartition as KafkaTopicPartition

from consumer import failpoints
from consumer.config import KafkaSettings
from consumer.kafka.clients import build_producer
from consumer.kafka.sink import send_each
from consumer.records import OutgoingRecord, TopicPartition

log = logging.getLogger(__name__)


def transactional_id(prefix: str, tp: TopicPartition) -> str:
    return f"{prefix}.{tp.topic}.{tp.partition}"


class TransactionalSink:
    """Owns one transactional producer per assigned input partition."""

    def __init__(
        self, settings: KafkaSettings, compression: str | None, id_prefix: str | None
    ) -> None:
        self._settings = settings
        self._compression = compression
        self._prefix = id_prefix or settings.group_id
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}

    async def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Start (and so fence any zombie of) the producer of each newly assigned partition."""
        for tp in partitions:
            if tp in self._producers:
                continue
            producer = build_producer(
                self._settings, self._compression, transactional_id(self._prefix, tp)
            )
            try:
                await producer.start()
            except BaseException:
                await producer.stop()  # one that failed to start still holds its client
                raise
            self._producers[tp] = producer

    async def release(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            producer = self._producers.pop(tp, None)
            if producer is not None:
                await producer.stop()

    async def reset(self, tp: TopicPartition) -> None:
        """Replace a producer left in an error state; the new one aborts what the old left open."""
        await self.release([tp])
        await self.assign([tp])

    async def close(self) -> None:
        await self.release(list(self._producers))

    async def deliver(
        self,
        tp: TopicPartition,
        records: Sequence[OutgoingRecord],
        next_offset: int,
        group_id: str,
        one_by_one: bool = False,
    ) -> list[BaseException | None]:
        """Produce `records` and commit `next_offset` for `tp` atomically.

        Returns each record's error, all None when the transaction committed; when any record
        failed the transaction is aborted (none of them is visible). Raises for a failure of
        the transaction itself (fenced, broker unreachable), also after aborting.
        """
        producer = self._producers.get(tp)
        if producer is None:  # its restart failed (broker away): start it again first
            await self.assign([tp])
            producer = self._producers[tp]
        await producer.begin_transaction()
        try:
            results = await send_each(producer, records, one_by_one)
            if any(result is not None for result in results):
                await producer.abort_transaction()
                return results
            await producer.send_offsets_to_transaction(
                {KafkaTopicPartition(tp.topic, tp.partition): next_offset}, group_id
            )
            failpoints.reach("in_transaction")
            await producer.commit_transaction()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.abort_transaction()
            raise
        return results
