"""The wiring: records in -> windows -> enriched outcomes -> records out -> commits.

Two tasks share one event loop:
- the poller keeps calling `getmany()` at all times (so the member stays in its group, even
  while a long window runs or the provider is down), decodes records, fills the open window,
  closes it on count or time, and pauses every partition while closed windows wait;
- the processor takes closed windows in order, enriches their rows concurrently, produces one
  output or dead letter per record, waits for the broker's acknowledgements, and commits the
  contiguous finished prefix of each partition.
Memory stays flat: at most one window in the processor, `max_pending_windows` waiting, one
filling, and one closed window held while the partitions are paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.errors import KafkaError

from consumer import failpoints
from consumer.config import Settings
from consumer.decode import decode_row
from consumer.enrich.outcome import OutputFields, RowOutcome
from consumer.enrich.runner import WindowEnricher, window_failed_systemically
from consumer.enrich.template import PromptTemplate
from consumer.kafka.clients import build_consumer, build_producer
from consumer.kafka.offsets import OffsetTracker
from consumer.kafka.sink import Sink
from consumer.llm.caller import LLMCaller
from consumer.llm.client import ChatClient
from consumer.llm.limiter import AIMDLimiter
from consumer.records import DeadLetter, Item, OutgoingRecord, SourceRecord, TopicPartition
from consumer.window import CloseReason, Window, WindowAccumulator

log = logging.getLogger("consumer")

_MAX_POLL_WAIT_S = 0.5


def _tp(tp: Any) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


def _header(value: object) -> bytes:
    return str(value).encode("utf-8")


def _source_headers(record: SourceRecord) -> list[tuple[str, bytes]]:
    return [
        ("source.topic", _header(record.topic)),
        ("source.partition", _header(record.partition)),
        ("source.offset", _header(record.offset)),
    ]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, app: ConsumerApp) -> None:
        self._app = app

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._app.on_partitions_revoked({_tp(tp) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions assigned", extra={"partitions": sorted(map(tuple, assigned))})


class ConsumerApp:
    """One consumer process. `await run()` until `request_stop()` (SIGTERM/SIGINT)."""

    def __init__(
        self,
        settings: Settings,
        *,
        consumer: AIOKafkaConsumer | None = None,
        producer: AIOKafkaProducer | None = None,
        client: ChatClient | None = None,
    ) -> None:
        self.settings = settings
        llm = settings.llm
        self._consumer = consumer or build_consumer(settings.kafka)
        compression = settings.delivery.output_compression
        self._producer = producer or build_producer(
            settings.kafka, None if compression == "none" else compression
        )
        self._client = client or ChatClient(llm)
        self.limiter = AIMDLimiter(
            initial=llm.concurrency.initial,
            minimum=llm.concurrency.min,
            maximum=llm.concurrency.max,
            decrease_factor=llm.concurrency.decrease_factor,
            increase_step=llm.concurrency.increase_step,
        )
        template = PromptTemplate(llm)
        self._enricher = WindowEnricher(template, LLMCaller(self._client, self.limiter, llm.retry))
        self._fields = OutputFields(llm.response_field, llm.model_name, template)
        self._template_hash = _header(template.template_hash)
        self._model_header = _header(llm.model_name)
        self._sink = Sink(self._producer)
        self._tracker = OffsetTracker()
        self._accumulator = WindowAccumulator(
            settings.window.max_messages, settings.window.max_wait_ms / 1000.0
        )
        self._closed: deque[Window] = deque()
        self._ready: deque[Window] = deque()
        self._ready_changed = asyncio.Event()
        self._processing: asyncio.Task[None] | None = None
        self._input_done = False
        self._stopping = asyncio.Event()
        self.held_back = False
        self.stats: dict[str, int] = {
            "consumed": 0,
            "produced": 0,
            "dead_lettered": 0,
            "row_errors": 0,
            "windows": 0,
            "commits": 0,
        }

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            log.info("stop requested: finishing the open window, then committing")
            self._stopping.set()
            self._ready_changed.set()

    async def run(self) -> int:
        """Consume until asked to stop; returns the process exit code."""
        kafka = self.settings.kafka
        await self._producer.start()
        try:
            await self._consumer.start()
            try:
                self._consumer.subscribe([kafka.input_topic], listener=_Rebalance(self))
                log.info(
                    "consuming",
                    extra={
                        "input": kafka.input_topic,
                        "output": kafka.output_topic,
                        "dlq": kafka.dead_letter_topic,
                        "group": kafka.group_id,
                    },
                )
                processor = asyncio.create_task(self._process_loop(), name="processor")
                try:
                    await self._poll_loop()
                    await self._drain(processor)
                finally:
                    if not processor.done():
                        processor.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await processor
            finally:
                await self._commit()
                await self._consumer.stop()
        finally:
            await self._producer.stop()
            await self._client.aclose()
        log.info("stopped", extra=self.stats)
        return 0

    # ---- poller -------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while not self._stopping.is_set():
            self._apply_backpressure()
            deadline = self._accumulator.deadline()
            wait = _MAX_POLL_WAIT_S
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            batch = await self._consumer.getmany(
                timeout_ms=int(wait * 1000), max_records=max(1, self._accumulator.room)
            )
            for records in batch.values():
                for record in records:
                    self._accept(record)
            window = self._accumulator.close_if_due()
            if window is not None:
                self._closed.append(window)
            self._hand_over(self.settings.window.max_pending_windows)
        window = self._accumulator.close(CloseReason.SHUTDOWN)
        if window is not None:
            self._closed.append(window)

    def _accept(self, raw: Any) -> None:
        record = SourceRecord(
            topic=raw.topic,
            partition=raw.partition,
            offset=raw.offset,
            key=raw.key,
            value=raw.value,
            timestamp=raw.timestamp,
            headers=tuple(raw.headers or ()),
        )
        decoded = decode_row(record.value, self.settings.kafka.max_row_bytes)
        item = (
            Item(record, dead_letter=decoded)
            if isinstance(decoded, DeadLetter)
            else Item(record, row=decoded)
        )
        self.stats["consumed"] += 1
        self._tracker.track(record.tp, record.offset)
        window = self._accumulator.add(item)
        if window is not None:
            self._closed.append(window)

    def _hand_over(self, capacity: int) -> None:
        while self._closed and len(self._ready) < capacity:
            self._ready.append(self._closed.popleft())
            self._ready_changed.set()

    def _apply_backpressure(self) -> None:
        """Pause every partition while a closed window waits for the processor."""
        assigned = self._consumer.assignment()
        if self._closed or self._stopping.is_set():
            if assigned - self._consumer.paused():
                self._consumer.pause(*assigned)
        elif self._consumer.paused():
            self._consumer.resume(*self._consumer.paused())

    async def _drain(self, processor: asyncio.Task[None]) -> None:
        """Shutdown: hand the last windows over and keep the membership alive while they run."""
        grace_ends = time.monotonic() + self.settings.delivery.shutdown_grace_s
        self._hand_over(len(self._closed) + len(self._ready))
        self._input_done = True
        self._ready_changed.set()
        while not processor.done() and time.monotonic() < grace_ends:
            self._apply_backpressure()
            await self._consumer.getmany(timeout_ms=100)
        if not processor.done():
            log.warning("shutdown grace elapsed: unfinished windows stay uncommitted")
            processor.cancel()

    # ---- processor ----------------------------------------------------------------------

    async def _process_loop(self) -> None:
        while True:
            while not self._ready:
                if self._input_done:
                    return
                self._ready_changed.clear()
                await self._ready_changed.wait()
            window = self._ready.popleft()
            self._processing = asyncio.create_task(self._process_window(window))
            await asyncio.wait([self._processing])
            task, self._processing = self._processing, None
            if task.cancelled():
                log.warning("window abandoned", extra={"window_id": window.id})
            elif task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _process_window(self, window: Window) -> None:
        started = time.monotonic()
        row_items = [item for item in window.items if item.row is not None]
        outcomes = await self._enrich(window, [item.row for item in row_items])  # type: ignore[misc]
        by_item = {id(item): outcome for item, outcome in zip(row_items, outcomes, strict=True)}
        records = [self._outgoing(window, item, by_item.get(id(item))) for item in window.items]
        await self._deliver(window, records)
        failpoints.reach("after_produce")
        for item in window.items:
            self._tracker.finish(item.record.tp, item.record.offset)
        errors = sum(1 for o in outcomes if o.error is not None)
        dead = len(window.items) - len(row_items)
        self.stats["windows"] += 1
        self.stats["produced"] += len(row_items)
        self.stats["dead_lettered"] += dead
        self.stats["row_errors"] += errors
        await self._commit()
        log.info(
            "window done",
            extra={
                "window_id": window.id,
                "close_reason": str(window.close_reason),
                "rows": len(row_items),
                "row_errors": errors,
                "dead_letters": dead,
                "seconds": round(time.monotonic() - started, 3),
                "partitions": _offset_ranges(window.items),
                "limit": round(self.limiter.limit, 1),
            },
        )

    async def _enrich(self, window: Window, rows: list[dict[str, Any]]) -> list[RowOutcome]:
        """Enrich; while the provider (not the rows) is failing, wait and retry those rows."""
        outcomes = await self._enricher.enrich(rows)
        attempt = 0
        while outcomes and window_failed_systemically(outcomes):
            attempt += 1
            self.held_back = True
            first = next(o.error for o in outcomes if o.error is not None)
            retry = self.settings.llm.retry
            delay = min(retry.window_backoff_max_s, 2.0**attempt) * (0.5 + 0.5 * random.random())
            log.warning(
                "window held back: the provider is failing, offsets stay uncommitted",
                extra={
                    "window_id": window.id,
                    "reason": first.reason if first else "",
                    "status_code": first.status_code if first else None,
                    "retry_in_s": round(delay, 1),
                },
            )
            await self._sleep_unless_stopping(delay)
            if self._stopping.is_set():
                raise asyncio.CancelledError("stopping while the provider is failing")
            todo = [i for i, o in enumerate(outcomes) if o.needs_retry_later]
            retried = await self._enricher.enrich([rows[i] for i in todo])
            for index, outcome in zip(todo, retried, strict=True):
                outcomes[index] = outcome
        self.held_back = False
        return outcomes

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _outgoing(self, window: Window, item: Item, outcome: RowOutcome | None) -> OutgoingRecord:
        record = item.record
        headers = _source_headers(record)
        headers.append(("window.id", _header(window.id)))
        if item.dead_letter is not None or outcome is None:
            letter = item.dead_letter or DeadLetter("internal", "no outcome")
            return OutgoingRecord(
                topic=self.settings.kafka.dead_letter_topic,
                key=record.key,
                value=record.value,
                headers=[
                    *record.headers,
                    ("dlq.reason", _header(letter.reason)),
                    ("dlq.message", _header(letter.message)),
                    *headers,
                    ("source.timestamp", _header(record.timestamp)),
                ],
            )
        assert item.row is not None
        headers.append(("llm.model", self._model_header))
        headers.append(("llm.template_hash", self._template_hash))
        value = orjson.dumps(self._fields.apply(item.row, outcome), option=orjson.OPT_NON_STR_KEYS)
        return OutgoingRecord(
            topic=self.settings.kafka.output_topic, key=record.key, value=value, headers=headers
        )

    async def _deliver(self, window: Window, records: list[OutgoingRecord]) -> None:
        """Produce until the broker acknowledged everything; never commit around a failure."""
        attempt = 0
        while True:
            try:
                await self._sink.deliver(records)
                return
            except KafkaError as error:
                attempt += 1
                delay = min(30.0, 0.5 * 2**attempt)
                log.warning(
                    "produce failed, retrying (outputs may repeat, offsets stay uncommitted)",
                    extra={"window_id": window.id, "error": repr(error), "retry_in_s": delay},
                )
                await asyncio.sleep(delay)

    async def _commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        assigned = {_tp(tp) for tp in self._consumer.assignment()}
        wanted = set(only) if only is not None else assigned
        offsets = {
            tp: o for tp, o in self._tracker.committable().items() if tp in wanted & assigned
        }
        if not offsets:
            return
        try:
            await self._consumer.commit(
                {KafkaTopicPartition(tp.topic, tp.partition): o for tp, o in offsets.items()}
            )
        except KafkaError as error:
            log.warning("commit failed; will retry with the next one", extra={"error": repr(error)})
            return
        self._tracker.committed(offsets)
        self.stats["commits"] += 1

    # ---- rebalance ----------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Finish (or abandon) in-flight work within a budget, commit it, let the rest go."""
        if not revoked:
            return
        budget = self.settings.kafka.session_timeout_ms / 1000.0 * 0.6
        processing = self._processing
        if processing is not None and not processing.done():
            done, _ = await asyncio.wait([processing], timeout=budget)
            if not done:
                processing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await processing
        await self._commit(revoked)
        abandoned = processing is not None and processing.cancelled()
        self._rewind(revoked, include_assigned=abandoned)
        log.info("partitions revoked", extra={"partitions": sorted(map(tuple, revoked))})

    def _rewind(self, revoked: set[TopicPartition], include_assigned: bool) -> None:
        """Drop unfinished work of revoked partitions: their next owner reads it again.

        After an abandoned window, partitions that stay assigned lose their unfinished work
        too and are seeked back to their first unfinished offset, so it is read again in order.
        """
        assigned = {_tp(tp) for tp in self._consumer.assignment()}
        dropped = revoked | assigned if include_assigned else revoked
        self._accumulator.drop_partitions(dropped)
        for queue in (self._closed, self._ready):
            for window in list(queue):
                window.items = [i for i in window.items if i.record.tp not in dropped]
                if not window.items:
                    queue.remove(window)
        for tp in dropped - revoked:
            first = self._tracker.first_pending(tp)
            if first is not None:
                self._consumer.seek(KafkaTopicPartition(tp.topic, tp.partition), first)
        self._tracker.forget(dropped)


def _offset_ranges(items: list[Item]) -> dict[str, str]:
    ranges: dict[str, list[int]] = {}
    for item in items:
        key = f"{item.record.topic}/{item.record.partition}"
        bounds = ranges.setdefault(key, [item.record.offset, item.record.offset])
        bounds[0] = min(bounds[0], item.record.offset)
        bounds[1] = max(bounds[1], item.record.offset)
    return {key: f"{low}-{high}" for key, (low, high) in ranges.items()}


async def run_app(settings: Settings) -> int:
    """Run with SIGTERM/SIGINT wired to a graceful stop."""
    app = ConsumerApp(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_stop)
    return await app.run()
