"""Produces a window's outputs and dead letters, and returns only once the broker has them all."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer

from consumer.records import OutgoingRecord


class Sink:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def deliver(self, records: Sequence[OutgoingRecord]) -> None:
        """Send everything, then wait for every acknowledgement; raises if any send failed.

        Sends are queued in order before any is awaited, so the producer batches them and
        keeps per-partition order (idempotence keeps it across its own retries).
        """
        futures = [
            await self._producer.send(
                record.topic, value=record.value, key=record.key, headers=record.headers
            )
            for record in records
        ]
        if futures:
            await asyncio.gather(*futures)
