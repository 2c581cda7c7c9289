"""Step 5, deliver: produce a window's records and hand it on only once the broker has them.

Two implementations, chosen once when the chain is built:
- `ProduceStep` (at-least-once): the shared idempotent producer; the commit step follows.
- `TransactionalProduceStep` (exactly-once): per input partition, its records and its offset
  commit in one transaction.

The poison policy lives here. A record the broker will never take (too large, invalid) is
replaced: an output by a dead letter that says why, a dead letter by a small stub (its first
KB and its coordinates), or the consumer stops with a clear error if the settings say so.
Only the records not yet acknowledged are sent again, so a retry never repeats an output;
other broker errors are retried with the shared backoff, offsets uncommitted meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol

from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordTooLargeError,
)

from consumer import failpoints
from consumer.pipeline.encode import STUB_BYTES, EncodedWindow, Encoder
from consumer.pipeline.protocol import Deadline, Rejected, Step, Wakeup, join_in_order
from consumer.records import DeadLetter, OutgoingRecord, TopicPartition
from consumer.retry import Backoff

log = logging.getLogger("consumer")

Fallback = Literal["stub", "stop"]

# Errors no retry can fix for this record.
_REFUSED = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    CorruptRecordException,
    InvalidTopicError,
)


class DeliveryFailed(Exception):
    """A record can be neither produced nor dead-lettered: the consumer must stop."""


class RecordSink(Protocol):
    async def send_all(
        self, records: Sequence[OutgoingRecord], one_by_one: bool = False
    ) -> list[BaseException | None]: ...

    async def recover(self) -> None: ...


class TransactionSink(Protocol):
    async def deliver(
        self,
        tp: TopicPartition,
        records: Sequence[OutgoingRecord],
        next_offset: int,
        group_id: str,
        one_by_one: bool = False,
    ) -> list[BaseException | None]: ...

    async def reset(self, tp: TopicPartition) -> None: ...


class DeliveryEvents(Protocol):
    """What delivery tells the rest of the process (metrics, readiness)."""

    def dead_lettered(self, reason: str) -> None: ...

    def broker_ok(self) -> None: ...

    def broker_error(self, what: str, error: BaseException) -> None: ...

    def partition_advanced(self, tp: TopicPartition) -> None: ...


def _breaks_producer(error: BaseException) -> bool:
    """After this error the idempotent producer's sequence for the partition may be broken.

    A timeout (aiokafka marks it not retriable) only means the broker did not answer in time:
    a new producer would not reach it any sooner.
    """
    return not getattr(error, "retriable", False) and not isinstance(error, KafkaTimeoutError)


def _refused_as_a_batch(failed: list[tuple[int, BaseException]], one_by_one: bool) -> bool:
    """Several records refused together: the broker refuses a whole batch that is over a
    topic's limit, so each must be sent alone before any is called too large."""
    return not one_by_one and sum(1 for _, e in failed if refused(e)) > 1


def refused(error: BaseException) -> bool:
    """The broker (or the client, before sending) will never accept this record."""
    return isinstance(error, _REFUSED) or not isinstance(error, KafkaError | asyncio.TimeoutError)


class Replacements:
    """Turns refused records of one window into what the poison policy says they become."""

    def __init__(self, encoder: Encoder, fallback: Fallback, events: DeliveryEvents) -> None:
        self._encoder = encoder
        self._fallback = fallback
        self._events = events

    def replace(
        self, window: EncodedWindow, index: int, record: OutgoingRecord, error: BaseException
    ) -> OutgoingRecord:
        item = window.items[index]
        why = f"{type(error).__name__}: {error}"
        window_id = window.enriched.window.id
        if record.topic == self._encoder.output_topic:
            letter = DeadLetter("output_rejected", f"the broker refused the output: {why}")
            replacement = self._encoder.dead_letter(window_id, item.record, letter)
        elif self._fallback == "stub" and not (record.stub and not record.value):
            # A stub keeps the first KB; if even that is refused, one with coordinates only.
            letter = _letter_of(record)
            keep = 0 if record.stub else STUB_BYTES
            replacement = self._encoder.stub(window_id, item.record, letter, why, keep)
        else:
            raise DeliveryFailed(
                f"the dead-letter topic {record.topic} refused the record from "
                f"{item.record.topic}/{item.record.partition}@{item.record.offset} ({why}); "
                "stopping without committing it (delivery.dead_letter_fallback: "
                f"{self._fallback})"
            )
        log.warning(
            "record refused by the broker; replaced",
            extra={
                "window_id": window_id,
                "source": f"{item.record.topic}/{item.record.partition}@{item.record.offset}",
                "topic": record.topic,
                "error": why,
                "now": "stub" if replacement.stub else "dead letter",
            },
        )
        self._events.dead_lettered("stub" if replacement.stub else "output_rejected")
        return replacement


def _letter_of(record: OutgoingRecord) -> DeadLetter:
    """The reason a dead letter carries, read back from its headers."""
    headers = dict(record.headers)
    reason = headers.get("dlq.reason", b"output_rejected").decode("utf-8", "replace")
    return DeadLetter(reason, headers.get("dlq.message", b"").decode("utf-8", "replace"))


class OneAtATime:
    """The shape of steps that work on one window at a time (both deliveries, the state
    flush): one in flight, handed on once done; `_process` is the work."""

    def __init__(self, next_step: Step[EncodedWindow], wakeup: Wakeup) -> None:
        self._next = next_step
        self._wakeup = wakeup
        self._task: asyncio.Task[EncodedWindow] | None = None
        self._done: EncodedWindow | None = None

    def submit(self, value: EncodedWindow) -> None:
        if self._task is not None or self._done is not None:
            raise Rejected
        self._task = asyncio.create_task(self._process(value), name=type(self).__name__)
        self._task.add_done_callback(lambda _: self._wakeup.set())

    async def _process(self, window: EncodedWindow) -> EncodedWindow:
        raise NotImplementedError

    def poll(self) -> None:
        self._forward()
        self._next.poll()

    def close(self) -> None:
        self._next.close()

    async def join(self, deadline: Deadline) -> None:
        await join_in_order(self._forward_and_poll, self._pending, self._wakeup, deadline)
        await self._next.join(deadline)

    def terminate(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._task = self._done = None
        self._next.terminate()

    def _pending(self) -> asyncio.Future[Any] | None:
        return self._task

    def _forward_and_poll(self) -> bool:
        done = self._forward()
        self._next.poll()
        return done

    def _forward(self) -> bool:
        if self._task is not None and self._task.done():
            task, self._task = self._task, None
            self._done = task.result()  # DeliveryFailed (or a bug) stops the consumer here
        if self._done is not None:
            try:
                self._next.submit(self._done)
            except Rejected:
                return False
            self._done = None
        return self._task is None


class _Delivery(OneAtATime):
    """What both delivery steps share: the poison policy, and waiting out broker errors."""

    def __init__(
        self,
        replacements: Replacements,
        events: DeliveryEvents,
        backoff: Backoff,
        next_step: Step[EncodedWindow],
        wakeup: Wakeup,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        super().__init__(next_step, wakeup)
        self._replacements = replacements
        self._events = events
        self._backoff = backoff
        self._sleep = sleep

    def _replace_refused(
        self,
        window: EncodedWindow,
        records: list[OutgoingRecord],
        failed: list[tuple[int, BaseException]],
    ) -> bool:
        """Replace the records no retry can fix; True if some failures are worth a wait."""
        for index, failure in failed:
            if refused(failure):
                records[index] = self._replacements.replace(window, index, records[index], failure)
        return not all(refused(e) for _, e in failed)

    async def _wait(
        self,
        window: EncodedWindow,
        attempt: int,
        what: str,
        error: BaseException,
        wait: bool = True,
        **context: object,
    ) -> None:
        self._events.broker_error(what, error)
        delay = self._backoff.delay(attempt) if wait else 0.0
        log.warning(
            what,
            extra={
                "window_id": window.enriched.window.id,
                **context,
                "error": repr(error),
                "retry_in_s": round(delay, 2),
            },
        )
        if delay:
            await self._sleep(delay)


class ProduceStep(_Delivery):
    """At-least-once: the window's records through the shared idempotent producer."""

    def __init__(
        self,
        sink: RecordSink,
        replacements: Replacements,
        events: DeliveryEvents,
        backoff: Backoff,
        next_step: Step[EncodedWindow],
        wakeup: Wakeup,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(replacements, events, backoff, next_step, wakeup, sleep)
        self._sink = sink

    async def _process(self, window: EncodedWindow) -> EncodedWindow:
        records = list(window.records)
        pending = list(range(len(records)))
        attempt = 0
        recover = False
        one_by_one = False
        while pending:
            if recover:
                try:
                    await self._sink.recover()
                    recover = False
                except KafkaError as error:
                    attempt += 1
                    await self._wait(window, attempt, "producer restart failed", error)
                    continue
            results = await self._sink.send_all([records[i] for i in pending], one_by_one)
            failed = [(i, e) for i, e in zip(pending, results, strict=True) if e is not None]
            if not failed:
                break
            attempt += 1
            # Any refusal or lost sequence: a fresh producer, so later records go through.
            recover = any(_breaks_producer(e) for _, e in failed)
            pending = [i for i, _ in failed]
            if _refused_as_a_batch(failed, one_by_one):
                one_by_one = True  # which of them is too large on its own?
                continue
            worth_waiting = self._replace_refused(window, records, failed)
            if worth_waiting:
                await self._wait(window, attempt, "produce failed, retrying", failed[0][1])
        self._events.broker_ok()
        failpoints.reach("after_produce")
        return EncodedWindow(window.enriched, records)


class TransactionalProduceStep(_Delivery):
    """Exactly-once: per input partition, its records and its next offset in one transaction."""

    def __init__(
        self,
        transactions: TransactionSink,
        group_id: str,
        replacements: Replacements,
        events: DeliveryEvents,
        backoff: Backoff,
        next_step: Step[EncodedWindow],
        wakeup: Wakeup,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(replacements, events, backoff, next_step, wakeup, sleep)
        self._transactions = transactions
        self._group_id = group_id

    async def _process(self, window: EncodedWindow) -> EncodedWindow:
        records = list(window.records)
        by_partition: dict[TopicPartition, list[int]] = {}
        for index, item in enumerate(window.items):
            by_partition.setdefault(item.record.tp, []).append(index)
        for tp, indexes in by_partition.items():
            next_offset = max(window.items[i].record.offset for i in indexes) + 1
            await self._transact(window, tp, indexes, records, next_offset)
        return EncodedWindow(window.enriched, records)

    async def _transact(
        self,
        window: EncodedWindow,
        tp: TopicPartition,
        indexes: list[int],
        records: list[OutgoingRecord],
        next_offset: int,
    ) -> None:
        attempt = 0
        one_by_one = False
        while True:
            try:
                results = await self._transactions.deliver(
                    tp, [records[i] for i in indexes], next_offset, self._group_id, one_by_one
                )
            except ProducerFenced:
                log.warning(
                    "fenced: another member owns this partition now; its work is dropped",
                    extra={"window_id": window.enriched.window.id, "partition": tuple(tp)},
                )
                return
            except KafkaError as error:
                attempt += 1
                await self._wait(
                    window, attempt, "transaction failed, retrying", error, partition=tuple(tp)
                )
                await self._reset(tp)
                continue
            failed = [(i, e) for i, e in zip(indexes, results, strict=True) if e is not None]
            if not failed:
                self._events.broker_ok()
                self._events.partition_advanced(tp)
                return
            # The transaction was aborted: every record of it is sent again in the next one.
            attempt += 1
            if _refused_as_a_batch(failed, one_by_one):
                one_by_one = True  # which of them is too large on its own?
                await self._reset(tp)
                continue
            worth_waiting = self._replace_refused(window, records, failed)
            await self._wait(
                window,
                attempt,
                "transaction aborted, retrying",
                failed[0][1],
                wait=worth_waiting,
                partition=tuple(tp),
            )
            await self._reset(tp)

    async def _reset(self, tp: TopicPartition) -> None:
        try:
            await self._transactions.reset(tp)
        except KafkaError as error:
            log.warning("transactional producer restart failed", extra={"error": repr(error)})
