"""The shared idempotent producer: every record's own result, and recovery after a refusal.

A batch the broker refused (too large, invalid) leaves the idempotent producer's sequence for
that partition broken: later batches get OutOfOrderSequenceNumber. `recover()` replaces the
producer, so the records behind a refused one go through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumer.records import OutgoingRecord


async def send_each(
    producer: AIOKafkaProducer, records: Sequence[OutgoingRecord], one_by_one: bool = False
) -> list[BaseException | None]:
    """Queue every record in order, then wait for all; the error of each, None when acked.

    Sends are queued before any is awaited, so the producer batches them and keeps
    per-partition order. `one_by_one` waits for each record before the next, so each goes in
    a batch of its own: the broker refuses a whole batch that is over a topic's limit, and
    this tells which of its records is too large on its own.
    """
    futures: list[asyncio.Future[object] | BaseException] = []
    for record in records:
        try:
            sent = await producer.send(
                record.topic, value=record.value, key=record.key, headers=record.headers
            )
            if one_by_one:
                await asyncio.gather(sent, return_exceptions=True)
            futures.append(sent)
        except Exception as error:  # refused before sending: too large, no metadata
            futures.append(error)
    waiting = [f for f in futures if isinstance(f, asyncio.Future)]
    if waiting:
        await asyncio.gather(*waiting, return_exceptions=True)
    return [_error_of(f) for f in futures]


def _error_of(sent: asyncio.Future[object] | BaseException) -> BaseException | None:
    if isinstance(sent, BaseException):
        return sent
    if sent.cancelled():  # the producer was stopped under it: not acknowledged
        cancelled: BaseException = KafkaError("the send was cancelled")
        return cancelled
    error = sent.exception()
    return error if isinstance(error, BaseException) else None


class ProducerSink:
    def __init__(self, build: Callable[[], AIOKafkaProducer]) -> None:
        self._build = build
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        producer = self._build()
        try:
            await producer.start()
        except BaseException:
            await producer.stop()  # a producer that failed to start still holds its client
            raise
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def send_all(
        self, records: Sequence[OutgoingRecord], one_by_one: bool = False
    ) -> list[BaseException | None]:
        if self._producer is None:
            raise RuntimeError("the producer is not running (recover() it first)")
        return await send_each(self._producer, records, one_by_one)

    async def recover(self) -> None:
        """A new producer (new id, fresh sequences); raises if the broker cannot be reached."""
        with contextlib.suppress(Exception):
            await self.stop()
        await self.start()
